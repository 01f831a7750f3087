"""Guided error profiles of a latent, text-conditioned model (:class:`~.latent.LatentDenoiser`).

Under classifier-free guidance at scale w the solver integrates ε̂_w = ε̂_∅ + w (ε̂_c - ε̂_∅), so the profile VRG
optimises against is that of ε̂_w: the probe (:func:`vrg_lightning.probe.probe_profile`, stratified and seeded)
measures e_w = ε̂_w(x_t, ᾱ) - ε against the noise ε actually added to data latents x₀ with their own captions. The
same seed gives every scale the same (x₀, t, ε) set, so the profiles of several scales are paired.

Data: :class:`LatentCaptions`, latents ``[N, C, h, w]`` with prompt embeddings ``[N, L, D]`` (one per latent), from
a ``.pt`` file (``{"latents", "prompt_embeds"}``, read with ``weights_only=True``) or encoded from images and captions
by the model's VAE and text encoder.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

__all__ = ["LATENT_KEYS", "LatentCaptions", "GuidedPrediction", "probe_guided"]

LATENT_KEYS = ("latents", "prompt_embeds")


class LatentCaptions(Dataset):
    """Latents and the embeddings of their captions; item ``i`` is ``(latents[i], i)`` (the index selects the
    caption, as a class label would, so the probe passes it through).

    Raises:
        ValueError: not float tensors ``[N, C, h, w]`` / ``[N, L, D]``, or of different lengths.
    """

    def __init__(self, latents: Tensor, prompt_embeds: Tensor) -> None:
        for name, t, ndim in (("latents", latents, 4), ("prompt_embeds", prompt_embeds, 3)):
            if not torch.is_tensor(t) or t.ndim != ndim or not t.is_floating_point() or t.shape[0] < 1:
                got = f"shape {tuple(t.shape)} {t.dtype}" if torch.is_tensor(t) else type(t).__name__
                raise ValueError(f"{name} must be a float tensor of {ndim} dims with N >= 1 rows; got {got}.")
        if latents.shape[0] != prompt_embeds.shape[0]:
            raise ValueError(f"latents ({latents.shape[0]}) and prompt_embeds ({prompt_embeds.shape[0]}) must have "
                             "one caption per latent; got different lengths.")
        self.latents, self.prompt_embeds = latents.float().contiguous(), prompt_embeds.float().contiguous()

    def __len__(self) -> int:
        return self.latents.shape[0]

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.latents[i], int(i)

    @classmethod
    @torch.no_grad()
    def from_images(cls, denoiser: Any, images: Tensor, captions: Sequence[str], *, seed: int = 0,
                    batch_size: int = 16) -> LatentCaptions:
        """Encode images in [-1, 1] ``[N, 3, H, W]`` (VAE, seeded) and their ``N`` captions (text encoder).

        Raises:
            ValueError: a different number of images and captions, captions that are not strings.
        """
        if not isinstance(captions, Sequence) or isinstance(captions, str) or \
                not all(isinstance(c, str) for c in captions):
            raise ValueError(f"captions must be a list of strings, one per image; got {type(captions).__name__}.")
        n = images.shape[0] if torch.is_tensor(images) and images.ndim == 4 else None
        if n != len(captions):
            got = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
            raise ValueError(f"images [N, 3, H, W] and captions must be as many; got images {got} and "
                             f"{len(captions)} captions.")
        g = torch.Generator().manual_seed(seed)
        z, e = [], []
        for a in range(0, n, batch_size):
            z.append(denoiser.encode(images[a:a + batch_size], generator=g))
            e.append(denoiser.encode_prompt(list(captions[a:a + batch_size])))
        return cls(torch.cat(z), torch.cat(e))

    @classmethod
    def load(cls, path: str | os.PathLike) -> LatentCaptions:
        """From a ``.pt`` dict with :data:`LATENT_KEYS` (``torch.load(weights_only=True)``).

        Raises:
            FileNotFoundError, ValueError: no such file, unreadable, keys missing, bad shapes or lengths.
        """
        from ..io import load_torch_file

        obj = load_torch_file(path, "latents file")
        missing = [k for k in LATENT_KEYS if not isinstance(obj, dict) or k not in obj]
        if missing:
            raise ValueError(f"latents file {str(path)!r} must be a dict with {', '.join(LATENT_KEYS)}; it lacks "
                             f"{', '.join(missing)}.")
        try:
            return cls(obj["latents"], obj["prompt_embeds"])
        except ValueError as exc:
            raise ValueError(f"latents file {str(path)!r}: {exc}") from exc

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the ``.pt`` dict atomically (an existing file only with ``overwrite=True``)."""
        from ..io import atomic_torch_save

        atomic_torch_save(path, {"latents": self.latents, "prompt_embeds": self.prompt_embeds}, overwrite=overwrite)
        return Path(path)


class GuidedPrediction(nn.Module):
    """ε̂_w of a latent denoiser with caption ``labels`` (indices into ``prompt_embeds``): the callable the probe
    measures. ``num_classes`` is the caption count (so the probe passes the indices), ``sample_shape`` the model's."""

    def __init__(self, denoiser: nn.Module, prompt_embeds: Tensor, guidance_scale: float) -> None:
        super().__init__()
        self.denoiser, self.guidance_scale = denoiser, float(guidance_scale)
        self.register_buffer("prompt_embeds", prompt_embeds, persistent=False)
        self.num_classes, self.sample_shape = int(prompt_embeds.shape[0]), tuple(denoiser.sample_shape)

    def forward(self, x: Tensor, alpha_bar: Tensor, class_labels: Tensor | None = None) -> Tensor:
        if class_labels is None:
            raise ValueError("GuidedPrediction needs caption indices (class_labels); the probe data gives them.")
        emb = self.prompt_embeds[class_labels.to(self.prompt_embeds.device)]
        return self.denoiser.eps_fn(emb, self.guidance_scale)(x, alpha_bar)


@torch.no_grad()
def probe_guided(denoiser: nn.Module, data: LatentCaptions, guidance_scales: Sequence[float], **probe: Any
                 ) -> dict[float, Any]:
    """One :class:`~vrg_lightning.profile.ErrorProfile` per guidance scale: the probe of ε̂_w - ε on ``data``
    (``meta["guidance_scale"] = w``), the same seeded (x₀, t, ε) set for every scale.

    Args:
        denoiser: a :class:`~.latent.LatentDenoiser` (``eps_fn`` with prompt embeddings, ``schedule``).
        data: latents with their caption embeddings.
        guidance_scales: the scales w (1: the conditional prediction; 0: the unconditional one).
        **probe: :func:`~vrg_lightning.probe.probe_profile` settings (``num_samples``, ``num_bins``, ``seed``,
            ``batch_size``, ``rank``, ``world_size``, ``device``).

    Raises:
        ValueError: no scales, a scale that is not a finite number, data that is not :class:`LatentCaptions`.
    """
    from ..probe import probe_profile

    if not isinstance(data, LatentCaptions):
        raise ValueError(f"data must be LatentCaptions (latents with prompt embeddings); got {type(data).__name__}.")
    scales = [float(w) for w in guidance_scales]
    if not scales or not all(torch.isfinite(torch.tensor(scales))):
        raise ValueError(f"guidance_scales must be one or more finite numbers; got {list(guidance_scales)!r}.")
    out = {}
    for w in scales:
        prof = probe_profile(GuidedPrediction(denoiser, data.prompt_embeds, w), data, denoiser.schedule, **probe)
        prof.meta["guidance_scale"] = w
        out[w] = prof
    return out
