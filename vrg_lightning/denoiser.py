"""``Denoiser``: a diffusers ``UNet2DModel`` seen as an ε-predictor of the noise level ᾱ.

==============  ===============================================================
symbol          meaning
==============  ===============================================================
``alpha_bar``   ᾱ of the input ``x_t = √ᾱ x_0 + √(1-ᾱ) ε`` (float, 0-d or ``[B]``)
``t``           continuous timestep ``schedule.alpha_bar_to_t(ᾱ)`` fed to the UNet
``epsilon``     the UNet predicts ε
``v``           the UNet predicts v = √ᾱ ε - √(1-ᾱ) x_0  (Salimans & Ho 2022); ε = √ᾱ v + √(1-ᾱ) x_t
==============  ===============================================================

Class conditioning uses ``UNet2DModel(num_class_embeds=num_classes + 1)``; label ``num_classes`` is the
null label of classifier-free guidance (Ho & Salimans 2022): ε = ε_∅ + w (ε_c - ε_∅).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .schedule import NoiseSchedule

__all__ = ["Denoiser", "PREDICTION_TYPES", "DIGITS_UNET", "plain_config", "load_diffusers_dir"]

PREDICTION_TYPES = ("epsilon", "v_prediction")

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


class Denoiser(nn.Module):
    """ε-prediction wrapper around a ``UNet2DModel``.

    Args:
        unet_config: ``UNet2DModel`` keyword arguments (default :data:`DIGITS_UNET`); ``num_class_embeds`` is set
            from ``num_classes``.
        schedule: the training noise schedule (default: linear 1e-4..0.02, T=1000).
        prediction_type: ``"epsilon"`` or ``"v_prediction"``.
        num_classes: number of classes for class conditioning, or ``None``.
        unet: an existing ``UNet2DModel`` to wrap instead of building one from ``unet_config``.

    Example:
        >>> d = Denoiser(dict(DIGITS_UNET, block_out_channels=[8, 8, 8], norm_num_groups=4, attention_head_dim=8))
        >>> d(torch.zeros(2, 1, 16, 16), torch.tensor(0.5)).shape
        torch.Size([2, 1, 16, 16])
    """

    def __init__(
        self,
        unet_config: Mapping[str, Any] | None = None,
        schedule: NoiseSchedule | None = None,
        prediction_type: str = "epsilon",
        num_classes: int | None = None,
        unet: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}; got {prediction_type!r}.")
        if num_classes is not None and (not isinstance(num_classes, int) or isinstance(num_classes, bool)
                                        or num_classes < 1):
            raise ValueError(f"num_classes must be a positive integer or None; got {num_classes!r}.")
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
        self.schedule = schedule or NoiseSchedule()
        self.prediction_type = prediction_type
        self.num_classes = num_classes

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
        return cls(dict(config["unet"]), NoiseSchedule.from_dict(config["schedule"]),
                   str(config.get("prediction_type", "epsilon")), config.get("num_classes"))

    # --- evaluation ---------------------------------------------------------------------------
    def null_labels(self, batch: int, device: torch.device | str) -> Tensor | None:
        """The classifier-free-guidance null label for a batch (``None`` for unconditional models)."""
        if self.num_classes is None:
            return None
        return torch.full((batch,), self.num_classes, dtype=torch.long, device=device)

    def model_output(self, x: Tensor, t: Tensor, class_labels: Tensor | None = None) -> Tensor:
        """Raw UNet output (ε or v, per ``prediction_type``) at float timesteps ``t`` (0-d or ``[B]``)."""
        if class_labels is None:
            class_labels = self.null_labels(x.shape[0], x.device)
        elif self.num_classes is None:
            raise ValueError("class_labels were given but this Denoiser is unconditional (num_classes=None).")
        return self.unet(x, t, class_labels=class_labels).sample

    def forward(self, x: Tensor, alpha_bar: Tensor, class_labels: Tensor | None = None) -> Tensor:
        """ε̂(x, ᾱ): the noise prediction, same shape and dtype as ``x``.

        Args:
            x: noisy images ``[B, C, H, W]``.
            alpha_bar: ᾱ, a 0-d tensor (whole batch) or ``[B]``.
            class_labels: ``[B]`` integer labels; ``None`` means the null label for conditional models.
        """
        ab = torch.as_tensor(alpha_bar, dtype=torch.float64)  # t is computed where ᾱ lives (CPU: no GPU sync)
        if ab.ndim > 1 or (ab.ndim == 1 and ab.numel() != x.shape[0]):
            raise ValueError(f"alpha_bar must be 0-d or of shape [{x.shape[0]}]; got shape {tuple(ab.shape)}.")
        t = self.schedule.alpha_bar_to_t(ab.reshape(-1)).reshape(ab.shape).to(x.device, non_blocking=True)
        out = self.model_output(x, t, class_labels)
        if self.prediction_type == "v_prediction":
            ab = ab.to(x.device, non_blocking=True)
            shape = (-1,) + (1,) * (x.ndim - 1)
            a = ab.reshape(shape) if ab.ndim else ab
            out = (a.sqrt() * out.double() + (1 - a).sqrt() * x.double())
        return out.to(x.dtype)

    def eps_fn(self, class_labels: Tensor | None = None,
               guidance_scale: float = 1.0) -> Callable[[Tensor, Tensor], Tensor]:
        """The solver callable ``(x, alpha_bar_0d) -> ε̂`` (docs/ARCHITECTURE.md), with CFG if ``guidance_scale != 1``.

        Guidance needs a conditional model and ``class_labels``; the conditional and null passes run as one batch.
        """
        w = float(guidance_scale)
        if w != 1.0 and (self.num_classes is None or class_labels is None):
            raise ValueError(f"guidance_scale={w} needs a class-conditional model and class_labels.")

        def fn(x: Tensor, alpha_bar: Tensor) -> Tensor:
            if w == 1.0:
                return self(x, alpha_bar, class_labels)
            labels = class_labels.to(x.device)
            null = self.null_labels(x.shape[0], x.device)
            ab = torch.as_tensor(alpha_bar)
            ab = ab if ab.ndim == 0 else torch.cat([ab, ab])
            eps = self(torch.cat([x, x]), ab, torch.cat([labels, null]))
            cond, uncond = eps.chunk(2)
            return uncond + w * (cond - uncond)

        return fn


def load_diffusers_dir(directory: str | os.PathLike) -> tuple[Denoiser, dict[str, Any]]:
    """``(denoiser, source)`` from a local diffusers folder (nothing is downloaded): a ``UNet2DModel`` in ``DIR`` or
    ``DIR/unet`` and its ``scheduler_config.json`` in ``DIR/scheduler`` or ``DIR``; ``source`` records the paths.

    Raises:
        FileNotFoundError: no such folder, UNet config or scheduler config.
        ValueError: a class-conditional UNet (not supported).
    """
    import json
    from pathlib import Path

    from diffusers import UNet2DModel

    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"The diffusers folder {str(directory)!r} does not exist or is not a folder.")
    unet_dir = d / "unet" if (d / "unet" / "config.json").is_file() else d
    if not (unet_dir / "config.json").is_file():
        raise FileNotFoundError(f"No UNet config.json in {str(d)!r} or {str(d / 'unet')!r}.")
    sched_file = next((p for p in (d / "scheduler" / "scheduler_config.json", d / "scheduler_config.json")
                       if p.is_file()), None)
    if sched_file is None:
        raise FileNotFoundError(f"No scheduler_config.json in {str(d / 'scheduler')!r} or {str(d)!r}.")
    cfg = json.loads(sched_file.read_text())
    unet = UNet2DModel.from_pretrained(str(unet_dir), local_files_only=True)
    if getattr(unet.config, "num_class_embeds", None):
        raise ValueError(f"{str(d)!r} holds a class-conditional UNet (num_class_embeds); only unconditional "
                         "diffusers UNet2DModels are supported.")
    den = Denoiser(schedule=NoiseSchedule.from_config(cfg), prediction_type=str(cfg.get("prediction_type", "epsilon")),
                   unet=unet)
    return den, {"diffusers_dir": str(d.resolve()), "scheduler_config": str(sched_file.resolve())}
