"""The probe: a ``no_grad`` measurement of a denoiser's error profile on a fixed, stratified set of noised samples
(images or any other shape).

Sample ``i < num_samples`` goes to bin ``i mod (#bins)`` (bins of :meth:`ErrorProfile.for_schedule`), at an integer
timestep uniform within the bin, on data item ``perm[i mod len(dataset)]`` with noise ε; all are drawn from generators
seeded by ``(seed, i // PROBE_CHUNK)``. Rank ``r`` of ``W`` evaluates chunks ``r, r + W, …``, so the probed
(image, t, noise) set, and the sum of all ranks' profiles, do not depend on the number of processes.
Used by :class:`~vrg_lightning.callbacks.VRGProfiler` (probe mode) and ``vrg profile``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from .profile import ErrorProfile
from .schedule import NoisePath, add_noise, alpha_bar_to_lambda

__all__ = ["PROBE_CHUNK", "PROBE_SAMPLES", "PROBE_BINS", "PROBE_BATCH", "probe_profile", "probe_batches"]

PROBE_CHUNK = 64  # samples per noise generator (the unit that ranks share)
PROBE_SAMPLES, PROBE_BINS, PROBE_BATCH = 4096, 100, 256  # defaults of the callback, `vrg profile` and probe_profile


def _bin_timesteps(profile: ErrorProfile, schedule: NoisePath) -> list[Tensor]:
    t = torch.arange(schedule.num_train_timesteps)
    b = profile.bin_index(schedule.index_to_lambda(t.double()))
    return [t[b == k] for k in range(profile.num_bins) if bool((b == k).any())]


def _check_int(name: str, value: Any, lo: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name} must be an integer >= {lo}; got {value!r}.")


def probe_batches(
    dataset: Dataset, schedule: NoisePath, profile: ErrorProfile, *, num_samples: int, seed: int,
    batch_size: int, rank: int, world_size: int, use_labels: bool = True,
):
    """Yield this rank's probe batches ``(x0, eps, t, labels)`` (CPU; ``labels`` ``None`` without labels)."""
    n_data = len(dataset)  # type: ignore[arg-type]
    if n_data < 1:
        raise ValueError("The probe dataset is empty.")
    t_of_bin = _bin_timesteps(profile, schedule)
    perm = torch.randperm(n_data, generator=torch.Generator().manual_seed(seed))
    chunks = list(range(rank, math.ceil(num_samples / PROBE_CHUNK), world_size))
    per_batch = max(1, batch_size // PROBE_CHUNK)
    for start in range(0, len(chunks), per_batch):
        xs, ys, ts, es = [], [], [], []
        for c in chunks[start:start + per_batch]:
            i = torch.arange(c * PROBE_CHUNK, min((c + 1) * PROBE_CHUNK, num_samples))
            g = torch.Generator().manual_seed(seed * 1_000_003 + c)
            u = torch.rand(i.numel(), generator=g, dtype=torch.float64)
            bins = (i % len(t_of_bin)).tolist()
            ts.append(torch.stack([t_of_bin[b][int(v * t_of_bin[b].numel())]
                                   for b, v in zip(bins, u.tolist(), strict=True)]))
            items = [dataset[int(perm[k % n_data])] for k in i.tolist()]
            x = torch.stack([it[0] if isinstance(it, (tuple, list)) else it for it in items]).float()
            xs.append(x)
            if use_labels and isinstance(items[0], (tuple, list)) and len(items[0]) > 1:
                ys.append(torch.as_tensor([int(it[1]) for it in items]))
            es.append(torch.randn(x.shape, generator=g))
        yield torch.cat(xs), torch.cat(es), torch.cat(ts), (torch.cat(ys) if len(ys) == len(xs) else None)


@torch.no_grad()
def probe_profile(
    denoiser: Callable[..., Tensor],
    dataset: Dataset,
    schedule: NoisePath,
    *,
    num_samples: int = PROBE_SAMPLES,
    num_bins: int = PROBE_BINS,
    seed: int = 0,
    batch_size: int = PROBE_BATCH,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str | None = None,
    use_labels: bool = True,
) -> ErrorProfile:
    """Measure the error profile of ``denoiser(x, alpha_bar[B], class_labels) -> ε̂`` on this rank's probe shard.

    Args:
        denoiser: ε̂ from noised samples, their ᾱ and class labels (``None`` for unconditional models; a
            ``num_classes`` attribute that is not ``None`` makes the probe pass the dataset's labels; a
            ``sample_shape`` attribute is checked against the data).
        dataset: samples (or ``(sample, label)`` pairs) in the model's data range, any shape.
        num_samples, num_bins, seed, batch_size: the probe set (module docstring).
        rank, world_size: this process's share.
        device: where the denoiser runs and the sums are kept (default CPU).

    Returns:
        This rank's :class:`ErrorProfile` on CPU (add the ranks' profiles, or reduce their sums, for the full one).

    Raises:
        ValueError: a bad count, data whose sample shape is not the denoiser's, or a denoiser whose every
            prediction was non-finite.
    """
    for name, v in (("num_samples", num_samples), ("batch_size", batch_size), ("world_size", world_size)):
        _check_int(name, v, 1)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}); got {rank!r}.")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    profile = ErrorProfile.for_schedule(schedule, num_bins)
    profile.source = "probe"
    profile.meta.update(num_samples=num_samples, seed=seed, rank=rank, world_size=world_size)
    profile.to(dev)
    conditional = getattr(denoiser, "num_classes", None) is not None
    want = getattr(denoiser, "sample_shape", None)
    skipped, seen = torch.zeros((), dtype=torch.long, device=dev), 0
    for x0, eps, t, labels in probe_batches(dataset, schedule, profile, num_samples=num_samples, seed=seed,
                                            batch_size=batch_size, rank=rank, world_size=world_size,
                                            use_labels=use_labels):
        if want is not None and tuple(x0.shape[1:]) != tuple(want):
            raise ValueError(f"The probe data has samples of shape {tuple(x0.shape[1:])} but the model's sample_shape "
                             f"is {tuple(want)}; give data of the model's shape (or the model's sample shape).")
        x0, eps = x0.to(dev), eps.to(dev)
        ab = schedule.alphas_cumprod[t].to(dev)
        xt, _, _ = add_noise(x0, eps, ab)
        eps_hat = denoiser(xt, ab, labels.to(dev) if conditional and labels is not None else None)
        skipped += profile.update(alpha_bar_to_lambda(ab), eps_hat.float() - eps)
        seen += x0.shape[0]
    if seen and int(skipped) == seen:
        raise ValueError(f"Every one of the {seen} probe predictions was non-finite (NaN or inf): nothing to measure; "
                         "check the model and its weights.")
    return profile.to("cpu")
