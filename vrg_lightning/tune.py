"""Validated selection of sampling trajectories by paired FID: VRG must never make sampling worse.

For each (solver, steps, base) "cell", :func:`make_candidates` builds the base trajectory and its alternatives:
VRG at several ``lp`` with both objectives, start free or pinned (``kind="vrg"``), and, for DDIM-like solvers, the
damped + discretisation-aware variant of :mod:`vrg_lightning.discretization` (``kind="disc"``). :func:`tune_cell`
then decides in two stages, each pair of FIDs from the same initial noise (:func:`vrg_lightning.sampling.generate`):

1. screening on ``screen_seeds``: among the candidates whose mean paired difference ``FID_cand - FID_base`` is
   negative, the one with the lowest upper confidence bound (``rank_by="upper"``, the default: large *and* consistent
   gains, which the confirmation can then resolve) or the lowest mean (``rank_by="mean"``; also the tie-break and the
   rule when a single screening seed gives no interval);
2. confirmation on fresh ``confirm_seeds``: that candidate replaces the base only if the upper end of the
   confidence interval of its paired difference is below 0 (``stats.paired_difference``). Selecting the best of K
   and testing it on the same seeds would be biased; new seeds make the test honest.

The result is one schema entry per cell whose ``validated`` section records the decision and its evidence; when
the base is kept, the entry's ``alpha_bar`` *is* the base, so ``vrg sample --trajectory vrg`` samples the base.
:func:`tune_checkpoint` (``vrg tune``) writes a new checkpoint; :func:`tune_vrg` is shared with
``VRGProfiler(tune_at_fit_end=True)``.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["PIN_CHOICES", "TuneSettings", "Candidate", "FIDEvaluator", "make_candidates", "tune_cell", "tune_vrg",
           "measure_curvature", "tune_checkpoint", "reference_for"]

PIN_CHOICES = ("free", "pinned", "both")


@dataclass(frozen=True)
class TuneSettings:
    """What ``vrg tune`` tries and how much evidence it gathers (frozen; ``to_dict``/``from_dict``).

    The defaults are the settings of ``benchmarks/quality.py --grid full`` (docs/BENCHMARKS.md, Quality): free
    start (the paper's lambda penalty; pinned starts were worse there), 4 lps, both objectives, 256 images, 3
    screening and 5 confirmation seeds. ``configs/digits.yaml`` shows a cheap setting for tuning at fit end.

    Args:
        solvers, steps, bases: the cells (every combination).
        lps, objectives: VRG candidates per cell; ``objective="solver"`` for ``ddim``/``dpmsolver1`` equals
            ``paper`` (deduplicated).
        pin_start: ``"free"``, ``"pinned"`` or ``"both"`` (start held exactly / by ``reg_lambda``).
        reg_lambda, trust, mse_mode: optimizer settings (:class:`~vrg_lightning.optimize.OptimizeSettings`).
        fix: add the damped + discretisation-aware candidates (DDIM-like solvers only).
        num_samples: images per FID; screen_seeds / confirm_seeds: the two disjoint seed sets.
        features: FID features (``digits``, ``pixels``, ``inception``; ``auto``: :func:`default_features`).
        confidence: of the paired-difference interval.
        rank_by: screening rule, ``"upper"`` (lowest upper confidence bound) or ``"mean"`` (lowest mean).
        batch_size: images per solver call.
        curvature_samples, curvature_steps: the many-step paths that measure dε/dσ (``fix``).
    """

    solvers: tuple[str, ...] = ("ddim",)
    steps: tuple[int, ...] = (10, 20)
    bases: tuple[str, ...] = ("time_uniform", "time_quadratic", "logSNR")
    lps: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3)
    objectives: tuple[str, ...] = ("paper", "solver")
    pin_start: str = "free"
    reg_lambda: float = 100.0
    trust: str = "alpha"
    mse_mode: str = "fit"
    fix: bool = True
    num_samples: int = 256
    screen_seeds: tuple[int, ...] = (0, 1, 2)
    confirm_seeds: tuple[int, ...] = (100, 101, 102, 103, 104)
    features: str = "auto"
    confidence: float = 0.95
    rank_by: str = "upper"
    batch_size: int = 256
    curvature_samples: int = 32
    curvature_steps: int = 100

    def __post_init__(self) -> None:
        from .optimize import OptimizeSettings
        from .solvers import SOLVERS
        from .trajectories import BASES
        from .variance import OBJECTIVES

        for name, allowed in (("solvers", SOLVERS), ("bases", tuple(b for b in BASES if b != "list")),
                              ("objectives", OBJECTIVES)):
            vals = tuple(getattr(self, name))
            bad = [v for v in vals if v not in allowed]
            if not vals or bad:
                raise ValueError(f"{name} must be a non-empty list of {', '.join(allowed)}; got {list(vals)!r}.")
            object.__setattr__(self, name, vals)
        for name in ("steps", "screen_seeds", "confirm_seeds"):
            vals = tuple(getattr(self, name))
            lo = 1 if name == "steps" else 0
            if not vals or any(isinstance(v, bool) or not isinstance(v, int) or v < lo for v in vals):
                raise ValueError(f"{name} must be a non-empty list of integers >= {lo}; got {list(vals)!r}.")
            object.__setattr__(self, name, vals)
        if set(self.screen_seeds) & set(self.confirm_seeds):
            raise ValueError(f"screen_seeds {list(self.screen_seeds)} and confirm_seeds {list(self.confirm_seeds)} "
                             "must be disjoint (the confirmation needs fresh noise).")
        if len(self.confirm_seeds) < 2:
            raise ValueError(f"confirm_seeds needs >= 2 seeds for a confidence interval; got "
                             f"{list(self.confirm_seeds)}.")
        if self.pin_start not in PIN_CHOICES:
            raise ValueError(f"pin_start must be one of {', '.join(PIN_CHOICES)}; got {self.pin_start!r}.")
        object.__setattr__(self, "lps", tuple(float(v) for v in self.lps))
        for lp in self.lps:
            OptimizeSettings(lp=lp, reg_lambda=self.reg_lambda, trust=self.trust, mse_mode=self.mse_mode)
        for name in ("num_samples", "batch_size", "curvature_samples", "curvature_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 2:
                raise ValueError(f"{name} must be an integer >= 2; got {v!r}.")
        if self.rank_by not in ("upper", "mean"):
            raise ValueError(f"rank_by must be 'upper' or 'mean'; got {self.rank_by!r}.")
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence must lie in (0, 1); got {self.confidence!r}.")

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TuneSettings:
        names = {f.name for f in fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names})

    def pins(self) -> tuple[bool, ...]:
        return {"free": (False,), "pinned": (True,), "both": (False, True)}[self.pin_start]


@dataclass(frozen=True)
class Candidate:
    """A trajectory to try in a cell: ``kind`` ``base``, ``vrg`` or ``disc``; ``info`` holds plain settings/costs."""

    label: str
    kind: str
    alpha_bar: tuple[float, ...]
    info: dict[str, Any]

    @property
    def tensor(self) -> Tensor:
        return torch.tensor(self.alpha_bar, dtype=torch.float64)


def _key(alpha_bar: Sequence[float]) -> str:
    return hashlib.sha256(",".join(f"{float(v):.17g}" for v in alpha_bar).encode()).hexdigest()[:16]


def make_candidates(
    schedule: Any, profile: Any, solver: str, steps: int, base: str, settings: TuneSettings,
    curvature: Any = None, cache: dict | None = None,
) -> list[Candidate]:
    """The base of a cell first, then its distinct alternatives (identical trajectories appear once).

    ``cache`` (a dict) shares optimizer results between cells (the paper objective does not depend on the solver).
    """
    from .discretization import DISC_SOLVERS, optimize_disc
    from .optimize import OptimizeSettings, optimize_trajectory
    from .trajectories import make_trajectory

    cache = {} if cache is None else cache
    mse_fn = profile.mse_function(settings.mse_mode)
    base_ab = make_trajectory(schedule, base, int(steps))
    out = [Candidate(f"base:{base}", "base", tuple(base_ab.tolist()), {"objective": None})]
    seen = {_key(out[0].alpha_bar)}

    def add(c: Candidate) -> None:
        k = _key(c.alpha_bar)
        if k not in seen:
            seen.add(k)
            out.append(c)

    ddim_like = solver in DISC_SOLVERS
    for pin in settings.pins():
        for lp in settings.lps:
            vrg_results = []
            for obj in settings.objectives:
                eff = "paper" if obj == "solver" and ddim_like else obj
                st = OptimizeSettings(lp=lp, reg_lambda=settings.reg_lambda, objective=eff, solver=solver,
                                      mse_mode=settings.mse_mode, trust=settings.trust, pin_start=pin)
                key = ("vrg", steps, base, eff, lp, pin, solver if eff == "solver" else "")
                if key not in cache:
                    cache[key] = optimize_trajectory(base_ab, mse_fn, st)
                r = cache[key]
                vrg_results.append(r.alpha_bar)
                add(Candidate(f"vrg:{obj}:lp={lp:g}:{'pinned' if pin else 'free'}", "vrg", tuple(r.alpha_bar.tolist()),
                              {"objective": obj, "lp": lp, "pin_start": pin, "reg_lambda": settings.reg_lambda,
                               "trust": settings.trust, "mse_mode": settings.mse_mode, "cpe_before": r.cpe_before,
                               "cpe_after": r.cpe_after, "loss": r.loss, "seconds": r.seconds}))
            if settings.fix and ddim_like and curvature is not None:
                st = OptimizeSettings(lp=lp, reg_lambda=settings.reg_lambda, solver=solver, mse_mode=settings.mse_mode,
                                      trust=settings.trust, pin_start=pin)
                key = ("disc", steps, base, lp, pin)
                if key not in cache:
                    cache[key] = optimize_disc(base_ab, mse_fn, curvature, st, damping=True,
                                               data_var=curvature.data_var)
                r = cache[key]
                add(Candidate(f"disc:lp={lp:g}:{'pinned' if pin else 'free'}", "disc", tuple(r["alpha_bar"]),
                              {"objective": "disc", "lp": lp, "pin_start": pin, "reg_lambda": settings.reg_lambda,
                               "trust": settings.trust, "mse_mode": settings.mse_mode, "damping": True,
                               "disc_mode": r["disc_mode"], "cpe_before": r["cpe_before"], "cpe_after": r["cpe_after"],
                               "disc_before": r["disc_before"], "disc_after": r["disc_after"], "loss": r["loss"],
                               "seconds": r["seconds"]}))
    return out


def default_features(features: str, channels: int) -> str:
    """Resolve ``auto`` FID features: the digits classifier for 1-channel images, raw pixels otherwise."""
    if features != "auto":
        return features
    return "digits" if channels == 1 else "pixels"


class FIDEvaluator:
    """FID of (solver, trajectory, seed) with the same noise per seed; feature statistics are kept in memory and,
    with ``cache_dir``, on disk (atomic files), so reruns and overlapping evaluations cost nothing."""

    def __init__(self, denoiser: Any, extractor: Any, reference: Any, num_samples: int, *, batch_size: int = 256,
                 cache_dir: str | os.PathLike | None = None) -> None:
        self.denoiser, self.extractor, self.reference = denoiser, extractor, reference
        self.num_samples, self.batch_size = num_samples, batch_size
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        from .metrics import _hash_state_dict

        self.memo: dict[str, float] = {}
        # statistics depend on the model and the features, not only on (solver, trajectory, seed): key them by both
        self.tag = f"m{_hash_state_dict(denoiser)[:12]}-{extractor.name}-{getattr(extractor, 'weights_hash', '')}"
        self.sampled_images = 0  # images generated (not loaded from a cache)
        self.nfe = 0  # model evaluations x images generated

    def fid(self, solver: str, alpha_bar: Sequence[float], seed: int) -> float:
        from .metrics import FeatureStats, feature_stats, fid_from_stats
        from .sampling import generate
        from .solvers import num_evaluations

        k = f"{self.tag}-{solver}-{_key(alpha_bar)}-s{int(seed)}-n{self.num_samples}"
        if k in self.memo:
            return self.memo[k]
        path = None if self.cache_dir is None else self.cache_dir / f"{k}.pt"
        if path is not None and path.is_file():
            stats = FeatureStats.from_dict(torch.load(path, weights_only=True))
        else:
            ab = torch.tensor(list(alpha_bar), dtype=torch.float64)
            images = generate(self.denoiser, ab, solver, self.num_samples, int(seed), batch_size=self.batch_size)
            self.sampled_images += self.num_samples
            self.nfe += self.num_samples * num_evaluations(solver, ab.numel())
            stats = feature_stats(images, self.extractor, batch_size=max(self.batch_size, 256))
            if path is not None:
                from .io import atomic_torch_save

                atomic_torch_save(path, stats.to_dict())
        self.memo[k] = fid_from_stats(stats, self.reference)
        return self.memo[k]

    def fids(self, solver: str, alpha_bar: Sequence[float], seeds: Sequence[int]) -> list[float]:
        return [self.fid(solver, alpha_bar, s) for s in seeds]


def tune_cell(evaluator: FIDEvaluator, solver: str, candidates: Sequence[Candidate], settings: TuneSettings) -> tuple[
        Candidate, dict[str, Any]]:
    """Screen ``candidates[1:]`` against ``candidates[0]`` (the base), confirm the best on fresh seeds.

    Returns:
        ``(chosen, validated)``: the chosen candidate (the base unless the confirmation is significant) and the
        plain ``validated`` record (module docstring).
    """
    from .stats import paired_difference

    base = candidates[0]
    if base.kind != "base":
        raise ValueError(f"candidates[0] must be the base; got a {base.kind!r} candidate ({base.label}).")
    fb = evaluator.fids(solver, base.alpha_bar, settings.screen_seeds)
    screen = []
    for c in candidates[1:]:
        fc = evaluator.fids(solver, c.alpha_bar, settings.screen_seeds)
        d = paired_difference(fb, fc, settings.confidence)
        screen.append({"label": c.label, "kind": c.kind, "fid": fc, "paired_diff": d.mean, "ci_low": d.ci_low,
                       "ci_high": d.ci_high, "relative": d.relative,
                       "cpe_before": c.info.get("cpe_before"), "cpe_after": c.info.get("cpe_after")})
    record: dict[str, Any] = {
        "selected": False, "num_samples": evaluator.num_samples, "seeds": list(settings.confirm_seeds),
        "screen_seeds": list(settings.screen_seeds), "features": evaluator.extractor.name,
        "confidence": settings.confidence, "candidate": None, "fid_base_screen": fb, "screen": screen,
        "num_candidates": len(candidates) - 1,
    }
    better = [i for i in range(len(screen)) if screen[i]["paired_diff"] < 0]
    rule = ((lambda i: (screen[i]["ci_high"], screen[i]["paired_diff"])) if settings.rank_by == "upper"
            else (lambda i: screen[i]["paired_diff"]))
    best = min(better, key=rule, default=None)
    record["rank_by"] = settings.rank_by
    if best is None:
        record.update({"reason": "no candidate had a lower mean FID than the base on the screening seeds; base kept",
                       "fid_base": sum(fb) / len(fb), "fid_candidate": None, "paired_diff": None, "ci_low": None,
                       "ci_high": None, "seeds": list(settings.screen_seeds)})
        return base, record
    fcb = evaluator.fids(solver, base.alpha_bar, settings.confirm_seeds)
    record.update({"fid_base": sum(fcb) / len(fcb), "fid_base_seeds": fcb})
    cand = candidates[best + 1]
    fcc = evaluator.fids(solver, cand.alpha_bar, settings.confirm_seeds)
    d = paired_difference(fcb, fcc, settings.confidence)
    record.update({"candidate": cand.label, "fid_candidate": sum(fcc) / len(fcc), "fid_candidate_seeds": fcc,
                   "paired_diff": d.mean, "ci_low": d.ci_low, "ci_high": d.ci_high, "relative": d.relative})
    if d.significant_improvement:
        record.update({"selected": True, "reason": f"{cand.label} lowered FID by {-d.mean:.4g} "
                       f"({-100 * d.relative:.1f}%), {settings.confidence:.0%} CI upper bound {d.ci_high:.4g} < 0 "
                       f"on {len(fcc)} fresh seeds"})
        return cand, record
    record["reason"] = (f"best screened candidate {cand.label} not confirmed on fresh seeds (paired diff "
                        f"{d.mean:.4g}, {settings.confidence:.0%} CI [{d.ci_low:.4g}, {d.ci_high:.4g}] reaches 0); "
                        "base kept")
    return base, record


def measure_curvature(denoiser: Any, settings: TuneSettings, seed: int = 12345) -> Any:
    """:func:`vrg_lightning.discretization.estimate_curvature` on ``curvature_samples`` paths of the model."""
    from .discretization import estimate_curvature
    from .sampling import initial_noise
    from .trajectories import make_trajectory

    ab = make_trajectory(denoiser.schedule, "logSNR", settings.curvature_steps)
    x, labels = initial_noise(seed, 0, settings.curvature_samples, _shape(denoiser), denoiser.num_classes)
    p = next(denoiser.parameters())
    eps_fn = denoiser.eps_fn(None if labels is None else labels.to(p.device))
    return estimate_curvature(eps_fn, x.to(p.device, p.dtype), ab)


def _shape(denoiser: Any) -> tuple[int, int, int]:
    from .sampling import image_shape

    return image_shape(denoiser)


def _entry(solver: str, steps: int, base: str, chosen: Candidate, base_c: Candidate, record: dict[str, Any],
           profile_source: str) -> dict[str, Any]:
    info = chosen.info
    return {"solver": solver, "steps": int(steps), "base": base, "objective": info.get("objective") or "base",
            "kind": chosen.kind, "lp": info.get("lp"), "reg_lambda": info.get("reg_lambda"),
            "trust": info.get("trust"), "pin_start": info.get("pin_start"), "mse_mode": info.get("mse_mode"),
            "alpha_bar": list(chosen.alpha_bar), "base_alpha_bar": list(base_c.alpha_bar),
            "cpe_before": info.get("cpe_before"), "cpe_after": info.get("cpe_after"), "loss": info.get("loss"),
            "seconds": info.get("seconds"), "profile_source": profile_source, "validated": record}


def tune_vrg(
    denoiser: Any, vrg: Mapping[str, Any], settings: TuneSettings, extractor: Any, reference: Any, *,
    cache_dir: str | os.PathLike | None = None, log: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """A new ``vrg`` section: one validated entry per (solver, steps, base) of ``settings``; stored entries of other
    cells are kept. Adds ``vrg["curvature"]`` (``fix``) and ``vrg["tune"]`` (settings, cost)."""
    from .profile import ErrorProfile

    t0 = time.perf_counter()
    schedule = denoiser.schedule
    profile = ErrorProfile.from_dict(vrg["profile"])
    curvature = measure_curvature(denoiser, settings) if settings.fix else None
    ev = FIDEvaluator(denoiser, extractor, reference, settings.num_samples, batch_size=settings.batch_size,
                      cache_dir=cache_dir)
    cells = {(s, int(n), b) for s in settings.solvers for n in settings.steps for b in settings.bases}
    kept = [dict(e) for e in vrg.get("entries", []) if (e.get("solver"), int(e.get("steps", 0)), e.get("base"))
            not in cells]
    new, cache = [], {}
    for solver in settings.solvers:
        for n in settings.steps:
            for base in settings.bases:
                cands = make_candidates(schedule, profile, solver, n, base, settings, curvature, cache)
                chosen, rec = tune_cell(ev, solver, cands, settings)
                new.append(_entry(solver, n, base, chosen, cands[0], rec, profile.source))
                if log is not None:
                    log(f"{solver}/{n}/{base}: {'SELECTED ' + chosen.label if rec['selected'] else 'base kept'} "
                        f"- {rec['reason']}")
    out = dict(vrg)
    out["entries"] = kept + new
    if curvature is not None:
        out["curvature"] = curvature.to_dict()
    out["tune"] = {"settings": settings.to_dict(), "seconds": time.perf_counter() - t0,
                   "images_sampled": ev.sampled_images, "image_evaluations": ev.nfe}
    return out


def reference_for(dataset: str, extractor: Any, shape: tuple[int, int, int], *, num: int | None = None,
                  cache_dir: str | os.PathLike | None = None) -> Any:
    """Cached reference statistics of a dataset's real images (``digits``, ``patches``, ``cifar10``, ``folder:..``)."""
    from .data import load_real_images
    from .metrics import reference_key, reference_stats

    def images() -> Tensor:
        x = load_real_images(dataset, num, image_size=shape[-1], channels=shape[0])
        if tuple(x.shape[1:]) != tuple(shape):
            raise ValueError(f"reference {dataset!r} images have shape {tuple(x.shape[1:])}; the model makes {shape}.")
        return x

    return reference_stats(reference_key(dataset, shape, num), extractor, images, cache_dir=cache_dir, progress=False)


def tune_checkpoint(ckpt: str | os.PathLike, out: str | os.PathLike, settings: TuneSettings, reference: str, *,
                    cache_dir: str | os.PathLike | None = None, log: Callable[[str], None] | None = print,
                    inception_weights: str | None = None, force: bool = False) -> dict[str, Any]:
    """``vrg tune``: read ``ckpt``, tune, write the whole checkpoint with the new ``vrg`` section to ``out``
    (atomically; ``out`` must differ from ``ckpt``). Returns the new ``vrg`` section."""
    from .checkpoint import VRG_KEY, load_checkpoint_file, load_denoiser, read_vrg
    from .io import atomic_torch_save
    from .metrics import build_features

    if Path(out).resolve() == Path(ckpt).resolve():
        raise ValueError(f"--out {str(out)!r} is the input checkpoint; tuning never overwrites its input. "
                         "Give another path.")
    if Path(out).exists() and (not force or Path(out).samefile(ckpt)):
        raise FileExistsError(f"--out {str(out)!r} already exists; pass --force to replace it (never the input).")
    raw = load_checkpoint_file(ckpt)
    denoiser, _ = load_denoiser(raw)
    vrg = read_vrg(raw)
    shape = _shape(denoiser)
    ext = build_features(default_features(settings.features, shape[0]), image_shape=shape,
                         inception_weights=inception_weights)
    ref = reference_for(reference, ext, shape, cache_dir=cache_dir)
    new = tune_vrg(denoiser, vrg, settings, ext, ref, log=log,
                   cache_dir=None if cache_dir is None else Path(cache_dir) / "tune-stats")
    new["tune"]["reference"] = reference
    new["tune"]["input"] = str(ckpt)
    raw[VRG_KEY] = {**raw[VRG_KEY], **new}
    atomic_torch_save(out, raw)
    return new


def median(values: Sequence[float]) -> float:
    """Median (NaN for none)."""
    v = sorted(values)
    if not v:
        return math.nan
    m = len(v) // 2
    return v[m] if len(v) % 2 else 0.5 * (v[m - 1] + v[m])
