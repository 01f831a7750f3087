"""Feature statistics and FID: one implementation for one process, many processes and the caches.

Feature statistics are float64 sums (``n``, ``Σf``, ``Σ f fᵀ``) in a frozen :class:`FeatureStats`: the sums of
two sets add (``a + b`` is the statistic of the union), the mean and covariance are derived, and the square root of
a reference covariance is computed once per object. A distributed job computes each rank's statistics with
:func:`feature_stats` and sums them with :func:`reduce_feature_stats` (one ``trainer.strategy.reduce(...,
reduce_op="sum")``), so a DDP run gives exactly the statistic of the union of all ranks' images.

Why not a torchmetrics ``Metric`` (``dist_reduce_fx="sum"`` states)? The same statistics are also a cache entry
(reference sets, per-seed sets of the paired evaluator) and are compared with many generated sets; a frozen value
keeps the cached ``Σ^½`` valid, adds without a process group (tests, shards), and the Lightning strategy reduces it
under every strategy (identity on one device, one ``all_reduce`` under DDP and ``ddp_spawn``) without gathering a
copy per rank.

The distance is computed in float64 from the statistics (:func:`frechet_distance`, the formula of torchmetrics and
of the original TF FID). Reference statistics of real data are computed once and cached on disk, keyed by dataset,
extractor and a hash of the extractor's weights (:func:`reference_stats`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..io import atomic_torch_save, load_torch_file
from .features import FeatureExtractor

__all__ = [
    "FeatureStats",
    "FIDResult",
    "feature_stats",
    "reduce_feature_stats",
    "frechet_distance",
    "fid_from_stats",
    "fid_of",
    "check_stats",
    "reference_key",
    "reference_stats",
    "default_cache_dir",
]


def default_cache_dir() -> Path:
    """``$VRG_CACHE_DIR`` or ``~/.cache/vrg-lightning``."""
    return Path(os.environ.get("VRG_CACHE_DIR", Path.home() / ".cache" / "vrg-lightning"))


@dataclass(frozen=True)
class FeatureStats:
    """Float64 sufficient statistics of a feature set: ``n``, ``Σf`` (``sum``) and ``Σ f fᵀ`` (``cov_sum``).

    ``features``/``weights_hash`` name the extractor; statistics of different extractors never mix.

    Example:
        >>> f = torch.arange(12.0).reshape(6, 2)
        >>> whole = FeatureStats.of(f, "x")
        >>> halves = FeatureStats.of(f[:4], "x") + FeatureStats.of(f[4:], "x")
        >>> halves.n, torch.equal(halves.cov_sum, whole.cov_sum), whole.mean_cov()[0].tolist()
        (6, True, [5.0, 6.0])
    """

    n: int
    sum: Tensor
    cov_sum: Tensor
    features: str
    weights_hash: str = ""

    @classmethod
    def zeros(cls, num_features: int, features: str, weights_hash: str = "") -> FeatureStats:
        """The statistics of no images (the neutral element of ``+``)."""
        d = int(num_features)
        return cls(0, torch.zeros(d, dtype=torch.float64), torch.zeros(d, d, dtype=torch.float64), features,
                   weights_hash)

    @classmethod
    def of(cls, features: Tensor, name: str, weights_hash: str = "") -> FeatureStats:
        """Statistics of a feature matrix ``[N, d]`` (summed in float64)."""
        f = features.detach().to(torch.float64)
        if f.ndim != 2:
            raise ValueError(f"features must be a matrix [N, d]; got shape {tuple(features.shape)}.")
        return cls(f.shape[0], f.sum(0).cpu(), (f.T @ f).cpu(), name, weights_hash)

    def __add__(self, other: FeatureStats) -> FeatureStats:
        if not isinstance(other, FeatureStats):
            return NotImplemented
        if (other.features, other.weights_hash, other.sum.shape) != (self.features, self.weights_hash,
                                                                     self.sum.shape):
            raise ValueError(f"Cannot add {other.features!r} statistics ({other.sum.numel()} features) to "
                             f"{self.features!r} statistics ({self.sum.numel()} features).")
        return FeatureStats(self.n + other.n, self.sum + other.sum, self.cov_sum + other.cov_sum, self.features,
                            self.weights_hash)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (the format of the cache files)."""
        return {"n": self.n, "sum": self.sum, "cov_sum": self.cov_sum, "features": self.features,
                "weights_hash": self.weights_hash}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FeatureStats:
        """Inverse of :meth:`to_dict`."""
        return cls(int(d["n"]), torch.as_tensor(d["sum"], dtype=torch.float64),
                   torch.as_tensor(d["cov_sum"], dtype=torch.float64), str(d["features"]),
                   str(d.get("weights_hash", "")))

    def mean_cov(self) -> tuple[Tensor, Tensor]:
        """Mean and unbiased covariance ``(Σffᵀ - n μμᵀ) / (n - 1)``; needs ``n >= 2``."""
        if self.n < 2:
            raise ValueError(f"FID needs at least 2 images per set; got {self.n}.")
        mu = self.sum / self.n
        cov = (self.cov_sum - self.n * torch.outer(mu, mu)) / (self.n - 1)
        return mu, cov

    @cached_property
    def cov_root(self) -> Tensor:
        """``Σ^½`` (symmetric PSD square root), computed once per (frozen) statistics object: reference statistics
        are compared with many generated sets."""
        return _sqrtm_psd(self.mean_cov()[1])


@dataclass(frozen=True)
class FIDResult:
    """An FID value and the features that produced it; ``str()`` gives ``FID[features]=value``."""

    value: float
    features: str
    num_images: int
    num_reference: int

    @classmethod
    def from_stats(cls, fake: FeatureStats, real: FeatureStats) -> FIDResult:
        """The FID of ``fake`` against ``real`` (:func:`fid_from_stats`) with its labels."""
        return cls(fid_from_stats(fake, real), fake.features, fake.n, real.n)

    @property
    def label(self) -> str:
        return f"FID[{self.features}]"

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.label, "value": self.value, "features": self.features,
                "num_images": self.num_images, "num_reference": self.num_reference}

    def __str__(self) -> str:
        return f"{self.label}={self.value:.4f}"


def check_stats(stats: FeatureStats, extractor: FeatureExtractor) -> None:
    """Raise ``ValueError`` unless ``stats`` were computed with ``extractor``'s features (name and size)."""
    if stats.features != extractor.name or stats.sum.numel() != extractor.num_features:
        raise ValueError(
            f"Reference statistics were computed with {stats.features!r} ({stats.sum.numel()} features); "
            f"they cannot be compared with {extractor.name!r} ({extractor.num_features} features)."
        )


def _batches(images: Tensor | Iterable[Tensor], batch_size: int) -> Iterator[Tensor]:
    if torch.is_tensor(images):
        for i in range(0, images.shape[0], batch_size):
            yield images[i : i + batch_size]
    else:
        yield from images


@torch.no_grad()
def feature_stats(
    images: Tensor | Iterable[Tensor],
    extractor: FeatureExtractor,
    *,
    batch_size: int = 256,
    progress: bool = False,
    desc: str = "features",
) -> FeatureStats:
    """Float64 statistics of ``extractor`` features over ``images`` (a tensor or an iterable of batches).

    The extractor runs on its own device (move it there first); sums accumulate in float64 on that device (CPU for
    MPS, which has no float64). No images give ``n = 0`` (zero sums), so every rank of a job can take part in
    :func:`reduce_feature_stats`.
    """
    from tqdm.auto import tqdm

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}.")
    total = -(-images.shape[0] // batch_size) if torch.is_tensor(images) else None
    device = next(iter(extractor.parameters()), torch.empty(0)).device
    acc = torch.device("cpu") if device.type == "mps" else device
    d = int(extractor.num_features)
    n, s, c = 0, torch.zeros(d, dtype=torch.float64, device=acc), torch.zeros(d, d, dtype=torch.float64, device=acc)
    for batch in tqdm(_batches(images, batch_size), total=total, desc=desc, disable=not progress, leave=False):
        f = extractor(batch.to(device)).to(acc, torch.float64)
        s += f.sum(0)
        c.addmm_(f.T, f)
        n += f.shape[0]
    return FeatureStats(n, s.cpu(), c.cpu(), extractor.name, extractor.weights_hash)


def reduce_feature_stats(stats: FeatureStats, strategy: Any) -> FeatureStats:
    """The statistics summed over all processes of a Lightning ``strategy`` (collective: call it on every rank).

    One ``strategy.reduce(t, reduce_op="sum")`` over ``[n, Σf, Σffᵀ]`` in float64 on ``strategy.root_device``;
    a single-process strategy returns ``stats`` unchanged. Counts stay exact up to 2⁵³ images.
    """
    if int(getattr(strategy, "world_size", 1)) <= 1:
        return stats
    d = stats.sum.numel()
    flat = torch.cat([torch.tensor([float(stats.n)], dtype=torch.float64), stats.sum.reshape(-1),
                      stats.cov_sum.reshape(-1)]).to(strategy.root_device)
    total = strategy.reduce(flat, reduce_op="sum").cpu()  # Lightning's DDP reduce works in place on ``flat``
    return FeatureStats(int(round(float(total[0]))), total[1 : 1 + d].clone(), total[1 + d :].reshape(d, d).clone(),
                        stats.features, stats.weights_hash)


def _sqrtm_psd(cov: Tensor) -> Tensor:
    w, v = torch.linalg.eigh((cov + cov.T) / 2)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def frechet_distance(mu1: Tensor, cov1: Tensor, mu2: Tensor, cov2: Tensor, root2: Tensor | None = None) -> float:
    """``‖μ₁-μ₂‖² + tr(Σ₁ + Σ₂ - 2(Σ₁Σ₂)^½)`` in float64.

    ``tr (Σ₁Σ₂)^½`` is computed as ``Σ √eig(R Σ₁ R)`` with ``R = Σ₂^½``: two symmetric eigen-decompositions,
    several times faster and more accurate than the general eigenvalues of ``Σ₁Σ₂`` (same value). ``root2``: ``R``
    computed before (the reference's, reused across many FIDs).
    """
    mu1, cov1, mu2, cov2 = (t.to(torch.float64) for t in (mu1, cov1, mu2, cov2))
    root = _sqrtm_psd(cov2) if root2 is None else root2
    m = root @ cov1 @ root
    tr_sqrt = torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum()
    return float((mu1 - mu2).square().sum() + cov1.trace() + cov2.trace() - 2 * tr_sqrt)


def fid_from_stats(fake: FeatureStats, real: FeatureStats) -> float:
    """FID between two sets of feature statistics (see :func:`frechet_distance`)."""
    if fake.features != real.features:
        raise ValueError(f"Cannot compare {fake.features!r} features with {real.features!r} features.")
    mu1, c1 = fake.mean_cov()
    mu2, c2 = real.mean_cov()
    return frechet_distance(mu1, c1, mu2, c2, real.cov_root)


def fid_of(
    images: Tensor | Iterable[Tensor],
    features: FeatureExtractor,
    reference: FeatureStats,
    *,
    batch_size: int = 256,
    progress: bool = False,
) -> FIDResult:
    """FID of ``images`` (in [-1, 1]) against precomputed reference statistics.

    Example:
        >>> from vrg_lightning.evaluation import build_features
        >>> g = torch.Generator().manual_seed(0)
        >>> ext = build_features("pixels", image_shape=(1, 2, 2))
        >>> ref = feature_stats(torch.rand(64, 1, 2, 2, generator=g) * 2 - 1, ext)
        >>> str(fid_of(torch.rand(64, 1, 2, 2, generator=g) * 2 - 1, ext, ref)).startswith("FID[pixels]=")
        True
    """
    check_stats(reference, features)
    stats = feature_stats(images, features, batch_size=batch_size, progress=progress, desc="FID features")
    return FIDResult.from_stats(stats, reference)


def reference_key(dataset: str, shape: Sequence[int], num: int | None = None) -> str:
    """Cache key of a dataset's reference statistics: the dataset (a ``folder:`` path resolved), the image shape the
    model makes (datasets are resized to it) and the number of images. Features are keyed by :func:`reference_stats`.

    Example:
        >>> reference_key("digits", (1, 16, 16), 500)
        'digits-1x16x16-n500'
    """
    if dataset.startswith("folder:"):
        dataset = "folder:" + str(Path(dataset[len("folder:"):]).resolve())
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", dataset).strip("_")
    return f"{safe}-{'x'.join(str(int(d)) for d in shape)}-n{num or 'all'}"


def reference_stats(
    dataset: str,
    extractor: FeatureExtractor,
    images: Callable[[], Tensor | Iterable[Tensor]],
    *,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 256,
    progress: bool = True,
) -> FeatureStats:
    """Reference statistics of real data, computed once and cached (atomically) on disk.

    The cache file is ``<cache_dir>/fid-stats/<dataset>--<features>--<weights hash>.pt``; ``images`` is called
    only on a cache miss.
    """
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in dataset)
    name = f"{safe}--{extractor.name}--{extractor.weights_hash}.pt"
    path = Path(cache_dir or default_cache_dir()) / "fid-stats" / name
    if path.is_file():
        try:
            stats = FeatureStats.from_dict(load_torch_file(path, "Reference statistics file"))
            check_stats(stats, extractor)
            return stats
        except (ValueError, KeyError, RuntimeError, TypeError):
            pass  # unreadable or stale entry: recompute and replace it
    stats = feature_stats(images(), extractor, batch_size=batch_size, progress=progress,
                          desc=f"reference stats ({dataset})")
    atomic_torch_save(path, stats.to_dict())
    return stats
