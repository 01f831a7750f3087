"""``Denoiser``: a diffusers ``UNet2DModel`` seen as an ε-predictor of the noise level ᾱ.

==============  ===============================================================
symbol          meaning
==============  ===============================================================
``alpha_bar``   ᾱ of the input ``x_t = √ᾱ x_0 + √(1-ᾱ) ε`` (float, 0-d or ``[B]``)
``t``           the path's time ``schedule.alpha_bar_to_t(ᾱ)`` fed to the UNet (discrete VP: the timestep)
``epsilon``     the UNet predicts ε
``v``           the UNet predicts v = √ᾱ ε - √(1-ᾱ) x_0  (Salimans & Ho 2022); ε = √ᾱ v + √(1-ᾱ) x_t
``sample``      the UNet predicts x_0
``flow``        the UNet predicts the velocity ε - x_0 (rectified flow)
==============  ===============================================================

It is the ``UNet2DModel`` adapter of the denoiser protocol (:mod:`vrg_lightning.models`): forward, guidance and
the ε conversion are :class:`~vrg_lightning.models.base.EpsModel`'s. Class conditioning uses
``UNet2DModel(num_class_embeds=num_classes + 1)``; label ``num_classes`` is the null label of classifier-free
guidance (Ho & Salimans 2022): ε = ε_∅ + w (ε_c - ε_∅).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .models.base import PREDICTION_TYPES, EpsModel
from .schedule import NoisePath, NoiseSchedule

__all__ = ["Denoiser", "PREDICTION_TYPES", "DIGITS_UNET", "plain_config"]  # + load_diffusers_dir (moved)

#: Default UNet for 16×16×1 digits: three resolutions (16, 8, 4), attention only at 4×4 (last block, mid block).
#: 0.17 M parameters: [8, 16, 32] channels sample ~2.9× faster than [16, 32, 64] (5,100 vs 1,770 image evaluations
#: per second on 2 CPU cores, ``benchmarks/model_speed.py``), which is what lets ``benchmarks/quality.py --grid full``
#: and ``vrg tune`` run on a laptop CPU; see docs/BENCHMARKS.md (Quality, full grid) for the choice.
DIGITS_UNET: dict[str, Any] = {
    "sample_size": 16,
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": [8, 16, 32],
    "down_block_types": ["DownBlock2D", "DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D", "UpBlock2D"],
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "attention_head_dim": 16,
}


def plain_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A diffusers config as a plain dict: private ``_keys`` dropped, tuples turned into lists."""

    def plain(v: Any) -> Any:
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        if isinstance(v, Mapping):
            return {str(k): plain(x) for k, x in v.items()}
        return v

    return {str(k): plain(v) for k, v in config.items() if not str(k).startswith("_")}


class Denoiser(EpsModel):
    """The ``UNet2DModel`` adapter of the denoiser protocol (:mod:`vrg_lightning.models.base`), on any noise path.

    Args:
        unet_config: ``UNet2DModel`` keyword arguments (default :data:`DIGITS_UNET`); ``num_class_embeds`` is set
            from ``num_classes``.
        schedule: the training noise path (default: discrete VP, linear 1e-4..0.02, T=1000).
        prediction_type: one of :data:`PREDICTION_TYPES` that the path defines.
        num_classes: number of classes for class conditioning, or ``None``.
        unet: an existing ``UNet2DModel`` to wrap instead of building one from ``unet_config``.

    Example:
        >>> d = Denoiser(dict(DIGITS_UNET, block_out_channels=[8, 8, 8], norm_num_groups=4, attention_head_dim=8))
        >>> d(torch.zeros(2, 1, 16, 16), torch.tensor(0.5)).shape, d.sample_shape
        (torch.Size([2, 1, 16, 16]), (1, 16, 16))
    """

    clip_range = 1.0  # images in [-1, 1]

    def __init__(
        self,
        unet_config: Mapping[str, Any] | None = None,
        schedule: NoisePath | None = None,
        prediction_type: str = "epsilon",
        num_classes: int | None = None,
        unet: nn.Module | None = None,
    ) -> None:
        super().__init__(schedule or NoiseSchedule(), prediction_type, num_classes)
        if unet is None:
            from diffusers import UNet2DModel

            cfg = plain_config(DIGITS_UNET if unet_config is None else unet_config)
            cfg["num_class_embeds"] = None if num_classes is None else num_classes + 1
            unet = UNet2DModel(**cfg)
        else:
            embeds = getattr(unet.config, "num_class_embeds", None)
            if embeds != (None if num_classes is None else num_classes + 1):
                raise ValueError(f"unet.config.num_class_embeds={embeds!r} does not fit num_classes={num_classes!r}; "
                                 "it must be num_classes + 1 (the last label is the null label), or None.")
        self.unet = unet

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """``(C, H, W)`` of the UNet's samples."""
        cfg = self.unet.config
        size = cfg.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return int(cfg.in_channels), int(h), int(w)

    # --- configuration ------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """Plain dict that rebuilds the architecture with :meth:`from_config` (weights not included)."""
        unet_cfg = plain_config(self.unet.config)
        unet_cfg.pop("num_class_embeds", None)
        return {"unet": unet_cfg, "schedule": self.schedule.to_dict(), "prediction_type": self.prediction_type,
                "num_classes": self.num_classes}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Denoiser:
        """Rebuild (randomly initialised) from :meth:`config`'s dict."""
        missing = [k for k in ("unet", "schedule") if k not in config]
        if missing:
            raise ValueError(f"Denoiser config lacks {missing}; expected keys unet, schedule, prediction_type, "
                             "num_classes.")
        return cls(dict(config["unet"]), NoisePath.from_dict(config["schedule"]),
                   str(config.get("prediction_type", "epsilon")), config.get("num_classes"))

    def describe(self) -> str:
        return "the UNet2DModel"

    # --- evaluation ---------------------------------------------------------------------------
    def null_labels(self, batch: int, device: torch.device | str) -> Tensor | None:
        """The classifier-free-guidance null label for a batch (``None`` for unconditional models)."""
        if self.num_classes is None:
            return None
        return torch.full((batch,), self.num_classes, dtype=torch.long, device=device)

    def model_output(self, x: Tensor, t: Tensor, class_labels: Tensor | None = None) -> Tensor:
        """Raw UNet output (per ``prediction_type``) at float timesteps ``t`` (0-d or ``[B]``)."""
        if class_labels is None:
            class_labels = self.null_labels(x.shape[0], x.device)
        elif self.num_classes is None:
            raise ValueError("class_labels were given but this Denoiser is unconditional (num_classes=None).")
        return self.unet(x, t, class_labels=class_labels).sample


def __getattr__(name: str) -> Any:  # the diffusers-folder adapter's earlier home
    if name == "load_diffusers_dir":
        from .models.diffusers import load_diffusers_dir

        return load_diffusers_dir
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
