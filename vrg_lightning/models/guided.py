"""Guided error profiles of a conditional model: a latent, text-conditioned one (:class:`~.latent.LatentDenoiser`)
or any class-conditional denoiser of the protocol.

Under classifier-free guidance at scale w the solver integrates ε̂_w = ε̂_∅ + w (ε̂_c - ε̂_∅), so the profile VRG
optimises against is that of ε̂_w: the probe (:func:`vrg_lightning.probe.probe_profile`, stratified and seeded)
measures e_w = ε̂_w(x_t, ᾱ) - ε against the noise ε actually added to data x₀ with their own captions (or labels).
Since e_w = (1-w) e_∅ + w e_c, one pass that evaluates both predictions at each (x_t, ε) and keeps the mixed power
sums Σ e_∅^i e_c^j (:class:`GuidedMoments`) gives the profile of every scale exactly (:func:`probe_guided`, the
default); the per-scale probe (``single_pass=False``) measures the same seeded (x₀, t, ε) set once per scale.

Data: :class:`LatentCaptions`, latents ``[N, C, h, w]`` with prompt embeddings ``[N, L, D]`` (one per latent), from
a ``.pt`` file (``{"latents", "prompt_embeds"}``, read with ``weights_only=True``) or encoded from images and captions
by the model's VAE and text encoder.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from ..profile import ErrorProfile

__all__ = ["LATENT_KEYS", "LatentCaptions", "GuidedPrediction", "GuidedMoments", "POWERS", "probe_guided",
           "probe_guided_moments"]

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
    def from_images(cls, denoiser: Any, images: Tensor | Dataset, captions: Sequence[str], *, seed: int = 0,
                    batch_size: int = 16) -> LatentCaptions:
        """Encode images in [-1, 1] ``[N, 3, H, W]`` (VAE, seeded) and their ``N`` captions (text encoder);
        ``images`` may also be a dataset of ``[3, H, W]`` images or ``(image, label)`` items, read batch by batch.

        Raises:
            ValueError: a different number of images and captions, captions that are not strings.
        """
        if not isinstance(captions, Sequence) or isinstance(captions, str) or \
                not all(isinstance(c, str) for c in captions):
            raise ValueError(f"captions must be a list of strings, one per image; got {type(captions).__name__}.")
        tensor = torch.is_tensor(images)
        n = (images.shape[0] if images.ndim == 4 else None) if tensor else len(images)
        if n != len(captions):
            got = tuple(images.shape) if tensor else f"{n} of {type(images).__name__}"
            raise ValueError(f"images [N, 3, H, W] and captions must be as many; got images {got} and "
                             f"{len(captions)} captions.")
        from .base import device_dtype

        g, (dev, dtype) = torch.Generator().manual_seed(seed), device_dtype(denoiser)
        z, e = [], []
        for a in range(0, n, batch_size):  # encoded on the model's device, kept on CPU
            batch = images[a:a + batch_size] if tensor else torch.stack(
                [_image(images[i]) for i in range(a, min(n, a + batch_size))])
            z.append(denoiser.encode(batch.to(dev, dtype), generator=g).cpu())
            e.append(denoiser.encode_prompt(list(captions[a:a + batch_size])).cpu())
        return cls(torch.cat(z), torch.cat(e))

    @classmethod
    def from_folder(cls, denoiser: Any, folder: str | os.PathLike, captions: str | os.PathLike, *, seed: int = 0,
                    batch_size: int = 16) -> LatentCaptions:
        """Encode an image folder (:class:`~vrg_lightning.data.ImageFolderDataset`: recursive, sorted, resized and
        centre-cropped to the VAE's input size) with a text file of one caption per line, line ``i`` for the
        ``i``-th file in sorted order (an empty line is the empty prompt).

        Raises:
            FileNotFoundError: no such folder or captions file.
            ValueError: a non-square latent, no images, or as many captions as images not given.
        """
        from ..data import ImageFolderDataset

        _, h, w = denoiser.sample_shape
        if h != w:
            raise ValueError(f"folder images are square; the model's latents are {h}x{w}: give a .pt of latents.")
        factor = 2 ** (len(denoiser.vae.config.block_out_channels) - 1)
        images = ImageFolderDataset(folder, image_size=h * factor, channels=3)
        path = Path(captions)
        if not path.is_file():
            raise FileNotFoundError(f"The captions file {str(path)!r} does not exist or is not a file.")
        lines = path.read_text(encoding="utf-8").splitlines()
        if len(lines) != len(images):
            raise ValueError(f"captions {str(path)!r} has {len(lines)} lines but folder {str(folder)!r} has "
                             f"{len(images)} images: give one caption per image, in sorted file order.")
        return cls.from_images(denoiser, images, lines, seed=seed, batch_size=batch_size)

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
    """ε̂_w of a guided denoiser: the callable the per-scale probe measures. Labels are caption indices into
    ``prompt_embeds`` (a latent, text-conditioned model) or, with ``prompt_embeds=None``, class labels of a
    class-conditional model; ``num_classes`` is the caption or class count (so the probe passes the labels)."""

    def __init__(self, denoiser: nn.Module, prompt_embeds: Tensor | None, guidance_scale: float) -> None:
        super().__init__()
        self.denoiser, self.guidance_scale = denoiser, float(guidance_scale)
        self.register_buffer("prompt_embeds", prompt_embeds, persistent=False)
        self.num_classes = int(prompt_embeds.shape[0]) if prompt_embeds is not None else denoiser.num_classes
        self.sample_shape = tuple(denoiser.sample_shape)

    def forward(self, x: Tensor, alpha_bar: Tensor, class_labels: Tensor | None = None) -> Tensor:
        if class_labels is None:
            raise ValueError("GuidedPrediction needs caption indices or class labels (class_labels); the probe data "
                             "gives them.")
        return self.denoiser.eps_fn(_condition(self.prompt_embeds, class_labels), self.guidance_scale)(x, alpha_bar)


def _image(item: Any) -> Tensor:
    """The image of a dataset item (``image`` or ``(image, label)``)."""
    return item[0] if isinstance(item, (tuple, list)) else item


def _condition(prompt_embeds: Tensor | None, labels: Tensor) -> Tensor:
    """What the model is conditioned on: the caption embeddings of the indices ``labels``, or the class labels."""
    return labels if prompt_embeds is None else prompt_embeds[labels.to(prompt_embeds.device)]


def _both_predictions(denoiser: nn.Module, x: Tensor, alpha_bar: Tensor, cond: Tensor) -> tuple[Tensor, Tensor]:
    """``(ε̂_∅, ε̂_c)`` at the same ``x`` in one batch where the model has null labels (or an empty prompt)."""
    b = x.shape[0]
    null_emb = getattr(denoiser, "null_embedding", None)
    null = null_emb.expand(b, -1, -1) if null_emb is not None else denoiser.null_labels(b, x.device)
    if null is None:
        return denoiser(x, alpha_bar, None), denoiser(x, alpha_bar, cond)
    ab = alpha_bar if alpha_bar.ndim == 0 else torch.cat([alpha_bar, alpha_bar])
    uncond, text = denoiser(torch.cat([x, x]), ab, torch.cat([null.to(cond), cond])).chunk(2)
    return uncond, text


GUIDED_FORMAT, GUIDED_VERSION = "vrg-guided-moments", 1
POWERS = tuple((i, k - i) for k in range(1, 5) for i in range(k, -1, -1))  # (power of e_∅, power of e_c)


class GuidedMoments:
    """Per-bin float64 sums of the unconditional and conditional errors at the same (x_t, ε): one probe pass gives
    the :class:`~vrg_lightning.profile.ErrorProfile` of every guidance scale.

    With e_∅ = ε̂_∅ - ε and e_c = ε̂_c - ε, the guided error is e_w = (1-w) e_∅ + w e_c, so its k-th power sum is
    Σ e_w^k = Σ_i C(k, i) (1-w)^i w^(k-i) Σ e_∅^i e_c^(k-i): the sums of :data:`POWERS` (i + j = 1..4, 14 rows;
    k = 2: M_∅ = Σe_∅², M_c = Σe_c² and the cross moment C = Σe_∅e_c, MSE_w = (1-w)² M_∅ + w² M_c + 2w(1-w) C)
    determine all four moments of :meth:`profile` exactly. Rows: ``count, lam_sum, n`` (as the profile's), then
    :data:`POWERS`; sums add across batches and ranks (``+``).

    Args:
        template: an empty profile whose bins (and meta) the guided profiles take.
        sums: ``[3 + 14, bins]`` (default zeros).

    Example:
        >>> from vrg_lightning.schedule import NoiseSchedule
        >>> g = GuidedMoments(ErrorProfile.for_schedule(NoiseSchedule(), 4))
        >>> _ = g.update(torch.zeros(3), torch.ones(3, 2), torch.full((3, 2), 2.0))
        >>> [float(g.profile(w).mse[2]) for w in (0.0, 1.0, 3.0)]  # e_w = 1 + w
        [1.0, 4.0, 16.0]
    """

    def __init__(self, template: ErrorProfile, sums: Tensor | None = None) -> None:
        rows = 3 + len(POWERS)
        self.template = template.empty_like(source="probe")
        bins = template.num_bins
        self.sums = torch.zeros(rows, bins, dtype=torch.float64, device=template.sums.device) if sums is None else \
            torch.as_tensor(sums, dtype=torch.float64).to(template.sums.device).clone()
        if tuple(self.sums.shape) != (rows, bins):
            raise ValueError(f"GuidedMoments sums must have shape ({rows}, {bins}); got {tuple(self.sums.shape)}.")

    def update(self, lam: Tensor, e_uncond: Tensor, e_cond: Tensor) -> Tensor:
        """Add a batch of the two errors (``[B, ...]`` each) at levels ``lam`` ``[B]``; non-finite samples are left
        out. Returns the number left out (0-d)."""
        dev = self.sums.device
        lam = lam.detach().to(dev, torch.float64).reshape(-1)
        a, c = (e.detach().to(dev, torch.float64).flatten(1) for e in (e_uncond, e_cond))
        if a.shape != c.shape or a.shape[0] != lam.shape[0]:
            raise ValueError(f"e_uncond {tuple(a.shape)}, e_cond {tuple(c.shape)} and lam {tuple(lam.shape)} must "
                             "hold the same samples.")
        pa, pc = [torch.ones_like(a)], [torch.ones_like(c)]
        for _ in range(4):
            pa.append(pa[-1] * a)
            pc.append(pc[-1] * c)
        rows = torch.stack([torch.ones_like(lam), lam, torch.full_like(lam, float(a.shape[1]))]
                           + [(pa[i] * pc[j]).sum(1) for i, j in POWERS])
        ok = torch.isfinite(rows).all(0)
        rows = torch.where(ok, rows, torch.zeros_like(rows))
        idx = torch.where(ok, self.template.bin_index(torch.where(ok, lam, torch.zeros_like(lam))), 0)
        self.sums.index_add_(1, idx, rows)
        return (~ok).sum()

    def profile(self, guidance_scale: float) -> ErrorProfile:
        """The profile of e_w at ``guidance_scale`` = w (``meta["guidance_scale"]``), all four moments exact."""
        w = float(guidance_scale)
        if not math.isfinite(w):
            raise ValueError(f"guidance_scale must be a finite number; got {guidance_scale!r}.")
        moment = dict(zip(POWERS, self.sums[3:], strict=True))
        s = [sum(math.comb(k, i) * (1 - w) ** i * w ** (k - i) * moment[(i, k - i)] for i in range(k + 1))
             for k in range(1, 5)]
        meta = dict(self.template.meta, guidance_scale=w, guided="single_pass")
        return ErrorProfile(self.template.lambda_edges, sums=torch.stack([*self.sums[:3], *s]), source="probe",
                            meta=meta)

    def __add__(self, other: GuidedMoments) -> GuidedMoments:
        if not torch.equal(self.template.lambda_edges.cpu(), other.template.lambda_edges.cpu()):
            raise ValueError("Cannot merge GuidedMoments with different bin edges.")
        return GuidedMoments(self.template, self.sums + other.sums.to(self.sums.device))

    def to_dict(self) -> dict[str, Any]:
        """Plain tensors and dicts (``torch.load(weights_only=True)``)."""
        return {"format": GUIDED_FORMAT, "version": GUIDED_VERSION, "profile": self.template.to_dict(),
                "sums": self.sums.cpu().clone()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GuidedMoments:
        """Inverse of :meth:`to_dict`.

        Raises:
            ValueError: not a guided-moments dict, or of a newer version than this toolkit reads.
        """
        if not isinstance(d, Mapping) or d.get("format") != GUIDED_FORMAT:
            raise ValueError(f"not a {GUIDED_FORMAT} dict; got format {getattr(d, 'get', dict().get)('format')!r}.")
        if int(d.get("version", 0)) > GUIDED_VERSION:
            raise ValueError(f"{GUIDED_FORMAT} version {d['version']} is newer than this toolkit reads "
                             f"({GUIDED_VERSION}); upgrade vrg-lightning.")
        return cls(ErrorProfile.from_dict(d["profile"]), d["sums"])


def _guided_data(denoiser: nn.Module, data: Any) -> Tensor | None:
    """The caption embeddings of ``data`` (``None`` for class labels), after checking what the model needs.

    Raises:
        ValueError: captions for a model without prompt embeddings, or labelled data for an unconditional model.
    """
    if isinstance(data, LatentCaptions):
        if getattr(denoiser, "null_embedding", None) is None:
            raise ValueError(f"LatentCaptions (caption embeddings) need a text-conditioned model (a LatentDenoiser); "
                             f"got {type(denoiser).__name__}.")
        return data.prompt_embeds
    if getattr(denoiser, "num_classes", None) is None:
        raise ValueError(f"guided profiles need a conditional model: LatentCaptions for a LatentDenoiser, or a "
                         f"(sample, label) dataset for a class-conditional one; {type(denoiser).__name__} has "
                         "num_classes=None.")
    return None


@torch.no_grad()
def probe_guided_moments(denoiser: nn.Module, data: Any, *, num_samples: int = 4096, num_bins: int = 100,
                         seed: int = 0, batch_size: int = 256, rank: int = 0, world_size: int = 1,
                         device: torch.device | str | None = None) -> GuidedMoments:
    """One probe pass (the stratified, seeded set of :func:`~vrg_lightning.probe.probe_profile`, same seeds) that
    measures ε̂_∅ and ε̂_c at every (x_t, ε): :class:`GuidedMoments` (this rank's share, on CPU).

    Args:
        denoiser: a :class:`~.latent.LatentDenoiser` with ``data`` :class:`LatentCaptions`, or a class-conditional
            denoiser of the protocol with a ``(sample, label)`` dataset.
        num_samples, num_bins, seed, batch_size, rank, world_size, device: as
            :func:`~vrg_lightning.probe.probe_profile`.

    Raises:
        ValueError: a model that cannot be guided with ``data``, data of another sample shape, or no finite
            prediction.
    """
    from ..probe import probe_batches
    from ..schedule import add_noise, alpha_bar_to_lambda

    embeds = _guided_data(denoiser, data)
    for name, v in (("num_samples", num_samples), ("batch_size", batch_size), ("world_size", world_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1; got {v!r}.")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}); got {rank!r}.")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    schedule, want = denoiser.schedule, tuple(denoiser.sample_shape)
    template = ErrorProfile.for_schedule(schedule, num_bins)
    template.meta.update(num_samples=num_samples, seed=seed, rank=rank, world_size=world_size)
    moments = GuidedMoments(template.to(dev))
    emb = None if embeds is None else embeds.to(dev)
    skipped, seen = 0, 0
    for x0, eps, t, labels in probe_batches(data, schedule, template, num_samples=num_samples, seed=seed,
                                            batch_size=batch_size, rank=rank, world_size=world_size):
        if tuple(x0.shape[1:]) != want:
            raise ValueError(f"The probe data has samples of shape {tuple(x0.shape[1:])} but the model's sample_shape "
                             f"is {want}.")
        if labels is None:
            raise ValueError("guided profiles need labelled data: (sample, label) items (LatentCaptions give caption "
                             "indices).")
        x0, eps, ab = x0.to(dev), eps.to(dev), schedule.alphas_cumprod[t].to(dev)
        xt, _, _ = add_noise(x0, eps, ab)
        uncond, cond = _both_predictions(denoiser, xt, ab, _condition(emb, labels.to(dev)))
        skipped += int(moments.update(alpha_bar_to_lambda(ab), uncond.float() - eps, cond.float() - eps))
        seen += x0.shape[0]
    if seen and skipped == seen:
        raise ValueError(f"Every one of the {seen} probe predictions was non-finite (NaN or inf): nothing to measure.")
    moments.template.to("cpu")
    moments.sums = moments.sums.cpu()
    return moments


@torch.no_grad()
def probe_guided(denoiser: nn.Module, data: Any, guidance_scales: Sequence[float], *, single_pass: bool = True,
                 **probe: Any) -> dict[float, ErrorProfile]:
    """One :class:`~vrg_lightning.profile.ErrorProfile` per guidance scale: the probe of ε̂_w - ε on ``data``
    (``meta["guidance_scale"] = w``), the same seeded (x₀, t, ε) set for every scale.

    Args:
        denoiser: a :class:`~.latent.LatentDenoiser` (``data``: :class:`LatentCaptions`) or a class-conditional
            denoiser (``data``: ``(sample, label)`` items).
        guidance_scales: the scales w (1: the conditional prediction; 0: the unconditional one).
        single_pass: one pass for every scale (:func:`probe_guided_moments`, 2 model evaluations per sample);
            ``False``: one probe per scale (``2 x scales`` evaluations; the check of the single pass).
        **probe: :func:`~vrg_lightning.probe.probe_profile` settings (``num_samples``, ``num_bins``, ``seed``,
            ``batch_size``, ``rank``, ``world_size``, ``device``).

    Raises:
        ValueError: no scales, a scale that is not a finite number, a model that cannot be guided with ``data``.
    """
    from ..probe import probe_profile

    scales = [float(w) for w in guidance_scales]
    if not scales or not all(math.isfinite(w) for w in scales):
        raise ValueError(f"guidance_scales must be one or more finite numbers; got {list(guidance_scales)!r}.")
    embeds = _guided_data(denoiser, data)
    if single_pass:
        moments = probe_guided_moments(denoiser, data, **probe)
        return {w: moments.profile(w) for w in scales}
    out = {}
    for w in scales:
        prof = probe_profile(GuidedPrediction(denoiser, embeds, w), data, denoiser.schedule, **probe)
        prof.meta["guidance_scale"] = w
        out[w] = prof
    return out
