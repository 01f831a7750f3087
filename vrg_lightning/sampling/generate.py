"""The one generator: :func:`generate` samples a denoiser over a trajectory from the per-index noise of
:mod:`~vrg_lightning.sampling.seeds`. ``vrg sample``'s job, compare mode, tuning and
:meth:`DiffusionModule.generate <vrg_lightning.module.DiffusionModule.generate>` (TensorBoard grids) all call it, so
one seed gives the same images everywhere."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..models.base import device_dtype
from ..solvers import sample as solver_sample
from ..trajectories import validate_trajectory
from .seeds import initial_noise

__all__ = ["sample_shape", "image_shape", "generate"]


def sample_shape(denoiser: Any) -> tuple[int, ...]:
    """The shape of one sample of a denoiser (:mod:`vrg_lightning.models.base`): ``(C, H, W)`` for images, any
    shape otherwise.

    Raises:
        ValueError: the object has no ``sample_shape``.
    """
    shape = getattr(denoiser, "sample_shape", None)
    if shape is None:
        raise ValueError(f"{type(denoiser).__name__} has no sample_shape; give a denoiser of the protocol in "
                         "vrg_lightning.models (load_model builds one).")
    return tuple(int(s) for s in shape)


image_shape = sample_shape  # the earlier name (models were UNets)


@torch.no_grad()
def generate(
    denoiser: Any,
    alpha_bar: Tensor,
    solver: str,
    num_samples: int,
    seed: int,
    *,
    start: int = 0,
    batch_size: int = 64,
    guidance_scale: float = 1.0,
    device: torch.device | str | None = None,
    progress: bool = False,
    labels: Tensor | Sequence[Any] | None = None,
    **solver_options: Any,
) -> Tensor:
    """Samples ``start .. start+num_samples-1`` of ``seed`` in one process (float32, CPU), of any sample shape, clamped
    to ``[-r, r]`` with ``r = denoiser.clip_range`` (1 for the toolkit's UNets: images in [-1, 1]; ``None``: not
    clamped).

    The starting noise and labels depend only on ``(seed, index)``; the solver runs in the denoiser's dtype. Images
    equal the distributed job's for the same seed and indices. With the same batch size and threads per process
    they are bit-identical; across batch sizes, float32 kernels round differently (about 1e-5 after the
    cancellation in ``x₀ = x̃ - σ ε̂`` at σ_max ≈ 157), while a float64 denoiser (``denoiser.double()``,
    ``--precision 64-true``) agrees to ~1e-13.

    Args:
        denoiser: a denoiser (:mod:`vrg_lightning.models.base`: ``eps_fn``, ``num_classes``, ``sample_shape``).
        alpha_bar: the trajectory (ᾱ, cleanest first).
        solver: one of :data:`vrg_lightning.solvers.SOLVERS`.
        num_samples, seed, start: which samples (indices ``start..start+num_samples-1`` of ``seed``).
        batch_size: samples per solver call.
        guidance_scale: classifier-free guidance weight (class-conditional models).
        device: where to run (default: the denoiser's device).
        progress: a tqdm bar over the batches.
        labels: what sample ``start + k`` is conditioned on, ``labels[k]`` (``num_samples`` of them: class labels
            ``[N]``, prompts as a list of strings or embeddings ``[N, L, D]`` for a
            :class:`~vrg_lightning.models.LatentDenoiser`), used instead of the seeded class labels; the noise is
            still that of ``(seed, index)``.
        **solver_options: passed to :func:`vrg_lightning.solvers.sample`.

    Raises:
        ValueError: ``num_samples``/``start`` not an integer >= 0, ``batch_size`` not >= 1, ``labels`` not one per
            sample, an invalid trajectory or solver, or a trajectory outside a VE model's σ range.
    """
    from tqdm.auto import tqdm

    for name, v, lo in (("num_samples", num_samples, 0), ("batch_size", batch_size, 1), ("start", start, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an integer >= {lo}; got {v!r}.")
    if labels is not None and (isinstance(labels, str) or not hasattr(labels, "__len__")
                               or len(labels) != num_samples):
        got = f"{len(labels)} of them" if hasattr(labels, "__len__") and not isinstance(labels, str) else \
            type(labels).__name__
        raise ValueError(f"labels must hold one label (class, prompt or embedding) per sample, num_samples="
                         f"{num_samples}; got {got}.")
    own_device, dtype = device_dtype(denoiser)
    dev = torch.device(device) if device is not None else own_device
    ab = validate_trajectory(alpha_bar).cpu()  # CPU coefficients and timesteps: no GPU sync per step
    path = getattr(denoiser, "schedule", None)
    if path is not None and hasattr(path, "check_covers"):
        path.check_covers(ab)  # a VE model is undefined outside its σ range
    shape = sample_shape(denoiser)
    clip = getattr(denoiser, "clip_range", 1.0)
    out = []
    for a in tqdm(range(start, start + num_samples, batch_size), desc=f"sampling {solver}", disable=not progress,
                  leave=False):
        b = min(a + batch_size, start + num_samples)
        x, y = initial_noise(seed, a, b, shape, None if labels is not None else denoiser.num_classes)
        if labels is not None:
            y = labels[a - start:b - start]
        eps_fn = denoiser.eps_fn(y.to(dev) if torch.is_tensor(y) else y, guidance_scale)
        x = x.to(dev, dtype)
        x = solver_sample(solver, eps_fn, x, ab, **solver_options)
        out.append((x if clip is None else x.clamp(-clip, clip)).float().cpu())
    return torch.cat(out) if out else torch.empty(0, *shape)
