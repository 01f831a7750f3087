"""Paired FID: trajectories compared from the same initial noise per seed, with one statistics cache.

:class:`FIDEvaluator` is the one paired evaluator: the FID of ``(solver, trajectory, seed)`` from
:func:`vrg_lightning.sampling.generate` (the noise of sample ``i`` of seed ``s`` depends only on ``(s, i)``, so two
trajectories sampled with one seed start from the same noise). Each evaluation's FID is memoised and, with
``cache_dir``, its feature statistics are kept on disk (atomic files), keyed by everything that determines them:
the model (its weights and config), the features (name and weights hash), the solver, the trajectory's ᾱ values,
the seed, the number of images and the guidance scale. Tuning (:mod:`.tune`) and ``vrg sample --compare``
(:func:`paired_compare`) both use it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..io import atomic_torch_save, load_torch_file
from .features import FeatureExtractor, hash_state_dict
from .fid import FeatureStats, check_stats, feature_stats, fid_from_stats

__all__ = ["trajectory_key", "model_key", "FIDEvaluator", "CompareRow", "paired_compare"]


def trajectory_key(alpha_bar: Sequence[float] | Tensor) -> str:
    """sha256 (16 hex digits) of a trajectory's ᾱ values, each written with 17 significant digits (exact).

    Example:
        >>> trajectory_key([0.9, 0.5]) == trajectory_key((0.9, 0.5)) != trajectory_key([0.9, 0.5000001])
        True
    """
    values = alpha_bar.tolist() if torch.is_tensor(alpha_bar) else alpha_bar
    return hashlib.sha256(",".join(f"{float(v):.17g}" for v in values).encode()).hexdigest()[:16]


def model_key(model: nn.Module) -> str:
    """Hash (16 hex digits) of a model's weights (:func:`~.features.hash_state_dict`) and, when it has one, of its
    ``config()`` (schedule, prediction type, classes: what turns the same weights into other images)."""
    config = model.config() if callable(getattr(model, "config", None)) else None
    text = hash_state_dict(model) + json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class FIDEvaluator:
    """FID of ``(solver, trajectory, seed)`` against ``reference``, each seed from the same initial noise.

    Args:
        denoiser: a :class:`~vrg_lightning.denoiser.Denoiser` (what :func:`vrg_lightning.sampling.generate` takes).
        extractor: the FID features; ``reference``: real-image statistics of the same features.
        num_samples: images per FID.
        batch_size: images per solver call (does not change the images).
        guidance_scale: classifier-free guidance weight (class-conditional models).
        device: where to sample (default: the denoiser's device).
        cache_dir: folder of the per-evaluation statistics files (``None``: FIDs memoised in memory only).

    Attributes:
        sampled_images: images generated (not loaded from a cache); ``nfe``: model evaluations x images.
    """

    def __init__(self, denoiser: Any, extractor: FeatureExtractor, reference: FeatureStats, num_samples: int, *,
                 batch_size: int = 256, guidance_scale: float = 1.0, device: torch.device | str | None = None,
                 cache_dir: str | os.PathLike | None = None, progress: bool = False) -> None:
        for name, v, lo in (("num_samples", num_samples, 2), ("batch_size", batch_size, 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an integer >= {lo}; got {v!r}.")
        check_stats(reference, extractor)
        self.denoiser, self.extractor, self.reference = denoiser, extractor, reference
        self.num_samples, self.batch_size, self.guidance_scale = num_samples, batch_size, float(guidance_scale)
        self.device, self.progress = device, progress
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        features = re.sub(r"[^A-Za-z0-9_.-]+", "_", extractor.name)
        self.tag = f"m{model_key(denoiser)[:12]}-{features}-{extractor.weights_hash}"
        self.memo: dict[str, float] = {}  # FIDs by key; statistics live on disk only
        self.sampled_images = 0
        self.nfe = 0

    def key(self, solver: str, alpha_bar: Sequence[float] | Tensor, seed: int) -> str:
        """The cache key (and file stem) of one evaluation."""
        return (f"{self.tag}-{solver}-{trajectory_key(alpha_bar)}-s{int(seed)}-n{self.num_samples}"
                f"-g{self.guidance_scale:g}")

    def _load(self, path: Path) -> FeatureStats | None:
        try:
            stats = FeatureStats.from_dict(load_torch_file(path, "Statistics cache file"))
            check_stats(stats, self.extractor)
        except (OSError, ValueError, KeyError, RuntimeError, TypeError):
            return None  # unreadable or foreign file: evaluate again and replace it
        return stats if stats.n == self.num_samples else None

    def stats(self, solver: str, alpha_bar: Sequence[float] | Tensor, seed: int) -> FeatureStats:
        """Feature statistics of ``num_samples`` images of ``seed`` sampled over ``alpha_bar`` (from the disk cache
        when there; sampled and stored otherwise)."""
        from ..sampling import generate
        from ..solvers import num_evaluations

        path = None if self.cache_dir is None else self.cache_dir / f"{self.key(solver, alpha_bar, seed)}.pt"
        stats = None if path is None or not path.is_file() else self._load(path)
        if stats is None:
            ab = torch.as_tensor(alpha_bar, dtype=torch.float64)
            images = generate(self.denoiser, ab, solver, self.num_samples, int(seed), batch_size=self.batch_size,
                              guidance_scale=self.guidance_scale, device=self.device, progress=self.progress)
            self.sampled_images += self.num_samples
            self.nfe += self.num_samples * num_evaluations(solver, ab.numel())
            stats = feature_stats(images, self.extractor, batch_size=max(self.batch_size, 256))
            if path is not None:
                atomic_torch_save(path, stats.to_dict())
        return stats

    def fid(self, solver: str, alpha_bar: Sequence[float] | Tensor, seed: int) -> float:
        """FID of one ``(solver, trajectory, seed)`` (memoised: reruns of a cell cost nothing)."""
        k = self.key(solver, alpha_bar, seed)
        if k not in self.memo:
            self.memo[k] = fid_from_stats(self.stats(solver, alpha_bar, seed), self.reference)
        return self.memo[k]

    def fids(self, solver: str, alpha_bar: Sequence[float] | Tensor, seeds: Sequence[int]) -> list[float]:
        """FIDs over ``seeds`` (paired with any other trajectory's FIDs over the same seeds)."""
        return [self.fid(solver, alpha_bar, s) for s in seeds]


@dataclass(frozen=True)
class CompareRow:
    """Base trajectory vs its VRG version: FID per seed (same initial noise), paired difference, cpe."""

    solver: str
    steps: int
    base: str
    features: str
    seeds: tuple[int, ...]
    fid_base: tuple[float, ...]
    fid_vrg: tuple[float, ...]
    difference: dict[str, Any]
    cpe_base: float | None
    cpe_vrg: float | None
    objective: str
    alpha_bar_base: tuple[float, ...]
    alpha_bar_vrg: tuple[float, ...]
    entry: dict[str, Any] | None = None
    num_samples: int = 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("seeds", "fid_base", "fid_vrg", "alpha_bar_base", "alpha_bar_vrg"):
            d[k] = list(d[k])
        return d


def paired_compare(
    denoiser: Any,
    solver: str,
    base_alpha_bar: Tensor,
    vrg_alpha_bar: Tensor,
    *,
    extractor: FeatureExtractor,
    reference: FeatureStats,
    seeds: Sequence[int] = (0, 1, 2),
    num_samples: int = 1000,
    batch_size: int = 64,
    guidance_scale: float = 1.0,
    device: torch.device | str | None = None,
    mse: Callable[[Tensor], Tensor] | None = None,
    objective: str = "paper",
    base: str = "",
    entry: Mapping[str, Any] | None = None,
    confidence: float = 0.95,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = False,
) -> CompareRow:
    """FID of a base trajectory and its VRG version over ``seeds``, each pair from the same initial noise.

    The paired difference ``FID_vrg - FID_base`` (mean over seeds, t-interval; negative = VRG better) comes from
    :func:`~vrg_lightning.evaluation.stats.paired_difference`. ``cache_dir`` keeps each evaluation's statistics
    (:class:`FIDEvaluator`), so an interrupted comparison resumes and a changed model or trajectory is evaluated
    again.
    """
    from ..trajectories import validate_trajectory
    from ..variance import cpe
    from .stats import paired_difference

    if not seeds:
        raise ValueError("seeds must hold at least one seed; got an empty list.")
    ev = FIDEvaluator(denoiser, extractor, reference, num_samples, batch_size=batch_size,
                      guidance_scale=guidance_scale, device=device, cache_dir=cache_dir, progress=progress)
    trajs = {"base": validate_trajectory(base_alpha_bar), "vrg": validate_trajectory(vrg_alpha_bar)}
    fids: dict[str, list[float]] = {"base": [], "vrg": []}
    for seed in seeds:  # seed-major: an interrupted comparison has complete pairs
        for kind, ab in trajs.items():
            fids[kind].append(ev.fid(solver, ab, int(seed)))
    diff = paired_difference(fids["base"], fids["vrg"], confidence)
    cb = cv = None
    if mse is not None:
        kw = {"solver": solver} if objective == "solver" else {}
        cb, cv = (float(cpe(trajs[k], mse, objective, **kw)) for k in ("base", "vrg"))
    return CompareRow(solver, trajs["base"].numel(), base, extractor.name, tuple(int(s) for s in seeds),
                      tuple(fids["base"]), tuple(fids["vrg"]), diff.to_dict(), cb, cv, objective,
                      tuple(trajs["base"].tolist()), tuple(trajs["vrg"].tolist()), dict(entry) if entry else None,
                      num_samples)
