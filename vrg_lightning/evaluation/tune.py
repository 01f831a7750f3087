"""Validated selection of sampling trajectories by paired FID: VRG must never make sampling worse.

For each (solver, steps, base) "cell", :func:`make_candidates` builds the base trajectory and its alternatives:
VRG at several ``lp`` with both objectives, start free or pinned (``kind="vrg"``), and, for DDIM-like solvers, the
damped + discretisation-aware variant of :mod:`vrg_lightning.optimize.discretization` (``kind="disc"``), and for
``settings.peers`` each peer's trajectory (``kind="peer"``) and VRG on top of it (:mod:`.candidates`).
:func:`tune_cell` then decides in two stages, each pair of FIDs from the same initial noise (:class:`FIDEvaluator`):

1. screening on ``screen_seeds``: among the candidates whose mean paired difference ``FID_cand - FID_base`` is
   negative, the one with the lowest upper confidence bound (``rank_by="upper"``, the default: large *and* consistent
   gains, which the confirmation can then resolve) or the lowest mean (``rank_by="mean"``; also the tie-break and the
   rule when a single screening seed gives no interval);
2. confirmation on fresh ``confirm_seeds``: that candidate replaces the base only if the upper end of the
   confidence interval of its paired difference is below 0 (:func:`~.stats.paired_difference`). Selecting the best
   of K and testing it on the same seeds would be biased; new seeds make the test honest.

The result is one schema entry per cell whose ``validated`` section records the decision and its evidence; when
the base is kept, the entry's ``alpha_bar`` *is* the base, so ``vrg sample --trajectory vrg`` samples the base;
when a peer or VRG on a peer wins, the entry adds the ``peer`` and its ``base_provenance``.
:func:`tune_checkpoint` (``vrg tune``) writes a new checkpoint; :func:`tune_vrg` is shared with
``VRGProfiler(tune_at_fit_end=True)``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from ..models.spec import is_spec
from ..optimize.settings import TrajectoryGrid, grid_fields
from ..peers import PEERS
from .candidates import _COSTS, Candidate, make_candidates
from .features import FEATURES, FeatureExtractor, build_features, default_features
from .fid import FeatureStats, feature_stats
from .paired import FIDEvaluator
from .reference import reference_for

__all__ = ["PIN_CHOICES", "RANK_CHOICES", "TUNE_GRID", "TuneSettings", "Candidate", "make_candidates", "tune_cell",
           "tune_on_dataset", "tune_in_fit",
           "tune_vrg", "measure_curvature", "reference_for", "checkpoint_settings", "tune_checkpoint"]

PIN_CHOICES = ("free", "pinned", "both")
RANK_CHOICES = ("upper", "mean")
TUNE_GRID = TrajectoryGrid(lps=(0.01, 0.03, 0.1, 0.3), objectives=("paper", "solver"))
GRID_KEYS = tuple(f.name for f in grid_fields() if f.name != "pin_start")  # tune's pin_start chooses the starts


def _ints(name: str, values: Any, lo: int) -> tuple[int, ...]:
    vals = (values,) if isinstance(values, int) else tuple(values)
    if not vals or any(isinstance(v, bool) or not isinstance(v, int) or v < lo for v in vals):
        raise ValueError(f"{name} must be a non-empty list of integers >= {lo}; got {list(vals)!r}.")
    return vals


@dataclass(frozen=True)
class TuneSettings:
    """What ``vrg tune`` tries and how much evidence it gathers (frozen; flat ``to_dict``/``from_dict``).

    The defaults are the settings of ``benchmarks/quality.py --grid full`` (docs/BENCHMARKS.md, Quality): free
    start (the paper's lambda penalty; pinned starts were worse there), 4 lps, both objectives, 256 images, 3
    screening and 5 confirmation seeds. ``configs/digits.yaml`` shows a cheap setting for tuning at fit end.

    Args:
        grid: the cells and the VRG candidates (:class:`~vrg_lightning.optimize.TrajectoryGrid`: solvers, steps,
            bases, lps, objectives, reg_lambda, trust, mse_mode; validated there). Its default :data:`TUNE_GRID`
            differs from the grid's own on purpose: a stored trajectory is one optimisation (lp 0.01, ``paper``),
            while validation *chooses* among candidates, so it offers four lps (0.01, 0.03, 0.1, 0.3) and both
            objectives (``solver`` equals ``paper`` for ``ddim``/``dpmsolver1`` and is deduplicated). The grid's
            ``pin_start`` must stay False: ``pin_start`` below chooses the starts.
        pin_start: ``"free"``, ``"pinned"`` or ``"both"`` (start held by ``reg_lambda`` / exactly).
        fix: add the damped + discretisation-aware candidates (DDIM-like solvers only).
        num_samples: images per FID; screen_seeds / confirm_seeds: the two disjoint seed sets.
        features: FID features (:data:`~.features.FEATURES` or a SPEC; ``auto``: :func:`~.features.default_features`).
        confidence: of the paired-difference interval.
        rank_by: screening rule, ``"upper"`` (lowest upper confidence bound) or ``"mean"`` (lowest mean).
        batch_size: images per solver call.
        curvature_samples, curvature_steps: the many-step paths that measure dε/dσ (``fix``).
        peers: peer schedule optimisers (:data:`vrg_lightning.peers.PEERS`: ``gits``, ``dmn``) whose trajectories,
            and VRG on top of them, are candidates too (:func:`~.candidates.make_candidates`); default none.

    The grid's fields read through (``settings.lps``); :meth:`from_dict` takes the flat dict :meth:`to_dict` writes
    (``vrg["tune"]["settings"]``, YAML ``tune_settings:``); ``peers`` is written only when given, so settings without
    peers keep the format stored before them.

    Example:
        >>> s = TuneSettings.from_dict({"steps": [10], "lps": [0.03], "pin_start": "both"})
        >>> s.steps, s.objectives, s.pins(), TuneSettings.from_dict(s.to_dict()) == s
        ((10,), ('paper', 'solver'), (False, True), True)
    """

    grid: TrajectoryGrid = TUNE_GRID
    pin_start: str = "free"
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
    peers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.grid, TrajectoryGrid):
            raise ValueError(f"grid must be a TrajectoryGrid; got {type(self.grid).__name__}.")
        if not self.grid.steps:
            raise ValueError("grid.steps must hold at least one step count to tune; got [].")
        if self.grid.pin_start:
            raise ValueError("grid.pin_start must be False; choose the starts with pin_start='pinned' or 'both'.")
        for name, value, allowed in (("pin_start", self.pin_start, PIN_CHOICES), ("rank_by", self.rank_by,
                                     RANK_CHOICES), ("features", self.features, ("auto", *FEATURES))):
            if value not in allowed and not (name == "features" and is_spec(value)):
                spec = " or a SPEC (path/to/file.py:NAME, package.module:NAME)" if name == "features" else ""
                raise ValueError(f"{name} must be one of {', '.join(allowed)}{spec}; got {value!r}.")
        object.__setattr__(self, "screen_seeds", _ints("screen_seeds", self.screen_seeds, 0))
        object.__setattr__(self, "confirm_seeds", _ints("confirm_seeds", self.confirm_seeds, 0))
        if set(self.screen_seeds) & set(self.confirm_seeds):
            raise ValueError(f"screen_seeds {list(self.screen_seeds)} and confirm_seeds {list(self.confirm_seeds)} "
                             "must be disjoint (the confirmation needs fresh noise).")
        if len(self.confirm_seeds) < 2:
            raise ValueError(f"confirm_seeds needs >= 2 seeds for a confidence interval; got "
                             f"{list(self.confirm_seeds)}.")
        for name in ("num_samples", "batch_size", "curvature_samples", "curvature_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 2:
                raise ValueError(f"{name} must be an integer >= 2; got {v!r}.")
        if not isinstance(self.fix, bool):
            raise ValueError(f"fix must be True or False; got {self.fix!r}.")
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence must lie in (0, 1); got {self.confidence!r}.")
        peers = (self.peers,) if isinstance(self.peers, str) else self.peers or ()
        peers = tuple(peers) if isinstance(peers, (list, tuple)) else (peers,)
        if any(p not in PEERS for p in peers) or len(set(peers)) != len(peers):
            raise ValueError(f"peers must be distinct names of {', '.join(PEERS)}; got {list(peers)!r}.")
        object.__setattr__(self, "peers", peers)

    @property
    def solvers(self) -> tuple[str, ...]:
        """``grid.solvers``."""
        return self.grid.solvers

    @property
    def steps(self) -> tuple[int, ...]:
        """``grid.steps``."""
        return self.grid.steps

    @property
    def bases(self) -> tuple[str, ...]:
        """``grid.bases``."""
        return self.grid.bases

    @property
    def lps(self) -> tuple[float, ...]:
        """``grid.lps``."""
        return self.grid.lps

    @property
    def objectives(self) -> tuple[str, ...]:
        """``grid.objectives``."""
        return self.grid.objectives

    @property
    def reg_lambda(self) -> float:
        """``grid.reg_lambda``."""
        return self.grid.reg_lambda

    @property
    def trust(self) -> str:
        """``grid.trust``."""
        return self.grid.trust

    @property
    def mse_mode(self) -> str:
        """``grid.mse_mode``."""
        return self.grid.mse_mode

    def pins(self) -> tuple[bool, ...]:
        """The starts to try: ``(False,)``, ``(True,)`` or ``(False, True)`` (pinned = True)."""
        return {"free": (False,), "pinned": (True,), "both": (False, True)}[self.pin_start]

    def replace(self, **changes: Any) -> TuneSettings:
        """A copy with flat fields changed (grid fields included), validated again."""
        return TuneSettings.from_dict({**self.to_dict(), **changes})

    def to_dict(self) -> dict[str, Any]:
        """Flat plain dict (lists): the grid's fields except ``pin_start``, then tune's own."""
        grid = {k: v for k, v in self.grid.to_dict().items() if k in GRID_KEYS}
        own = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "grid" and (f.name != "peers"
                                                                                          or self.peers)}
        return {**grid, **{k: list(v) if isinstance(v, tuple) else v for k, v in own.items()}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TuneSettings:
        """Inverse of :meth:`to_dict` (a flat dict; unknown keys are ignored, missing ones take the defaults)."""
        grid = {k: v for k, v in d.items() if k in GRID_KEYS and v is not None}
        own = {f.name for f in fields(cls)} - {"grid"}
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in own}
        return cls(grid=TUNE_GRID.replace(**grid), **kw)


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
    if base.info.get("skipped"):
        record["skipped"] = dict(base.info["skipped"])  # peers that could not serve the cell, with the reason
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
    verdict = "is above 0: worse than the base" if d.ci_low > 0 else "reaches 0"
    record["reason"] = (f"best screened candidate {cand.label} not confirmed on fresh seeds (paired diff "
                        f"{d.mean:.4g}, {settings.confidence:.0%} CI [{d.ci_low:.4g}, {d.ci_high:.4g}] {verdict}); "
                        "base kept")
    return base, record


def measure_curvature(denoiser: Any, settings: TuneSettings, seed: int = 12345) -> Any:
    """:func:`~vrg_lightning.optimize.discretization.estimate_curvature` on ``curvature_samples`` paths."""
    from ..optimize.discretization import estimate_curvature
    from ..sampling import image_shape, initial_noise
    from ..trajectories import make_trajectory

    ab = make_trajectory(denoiser.schedule, "logSNR", settings.curvature_steps)
    x, labels = initial_noise(seed, 0, settings.curvature_samples, image_shape(denoiser), denoiser.num_classes)
    p = next(denoiser.parameters())
    eps_fn = denoiser.eps_fn(None if labels is None else labels.to(p.device))
    return estimate_curvature(eps_fn, x.to(p.device, p.dtype), ab)


def _entry(solver: str, steps: int, base: str, chosen: Candidate, base_c: Candidate, record: dict[str, Any],
           profile_source: str) -> dict[str, Any]:
    from ..optimize.entries import SETTING_KEYS, make_entry

    info = chosen.info
    objective = info.get("objective") or ("peer" if chosen.kind == "peer" else "base")
    peer = {k: info[k] for k in ("peer", "base_provenance") if k in info}  # a peer, or VRG on a peer, won
    return make_entry(solver, steps, base, {"objective": objective, "kind": chosen.kind},
                      {k: info.get(k) for k in SETTING_KEYS if k != "objective"},
                      {"alpha_bar": list(chosen.alpha_bar), "base_alpha_bar": list(base_c.alpha_bar)},
                      {k: info.get(k) for k in _COSTS}, peer, profile_source=profile_source, validated=record)


def tune_vrg(
    denoiser: Any, vrg: Mapping[str, Any], settings: TuneSettings, extractor: FeatureExtractor,
    reference: FeatureStats, *, cache_dir: str | os.PathLike | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """A new ``vrg`` section: one validated entry per (solver, steps, base) of ``settings``; stored entries of other
    cells are kept. Adds ``vrg["curvature"]`` (``fix``) and ``vrg["tune"]`` (settings, cost). ``log`` gets one line
    per cell. ``settings.peers`` are computed with ``denoiser`` as the model (GITS) and one peer cache for all
    cells, so GITS runs its teacher once."""
    from ..profile import ErrorProfile

    t0 = time.perf_counter()
    profile = ErrorProfile.from_dict(vrg["profile"])
    curvature = measure_curvature(denoiser, settings) if settings.fix else None
    ev = FIDEvaluator(denoiser, extractor, reference, settings.num_samples, batch_size=settings.batch_size,
                      cache_dir=cache_dir)
    cells = [(s, int(n), b) for s in settings.solvers for n in settings.steps for b in settings.bases]
    tuned = set(cells)
    kept = [dict(e) for e in vrg.get("entries", []) if (e.get("solver"), int(e.get("steps", 0)), e.get("base"))
            not in tuned]
    new, cache, peer_cache = [], {}, {}  # one peer cache: one GITS teacher pass serves every cell
    for solver, n, base in cells:
        cands = make_candidates(denoiser.schedule, profile, solver, n, base, settings, curvature, cache,
                                model=denoiser, peer_cache=peer_cache)
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


def tune_on_dataset(denoiser: Any, vrg: Mapping[str, Any], settings: TuneSettings, dataset: Any,
                    num_reference: int, device: Any = None) -> dict[str, Any]:
    """:func:`tune_vrg` against the FID statistics of the first ``num_reference`` images of ``dataset`` (items are
    images or ``(image, label, ...)``), features as ``settings.features``; what the callback runs at fit end."""
    from ..sampling import image_shape

    first = [dataset[i] for i in range(min(len(dataset), int(num_reference)))]
    real = torch.stack([torch.as_tensor(x[0] if isinstance(x, (tuple, list)) else x) for x in first]).float()
    shape = image_shape(denoiser)
    ext = build_features(default_features(settings.features, shape[0]), image_shape=shape)
    ext = ext.to(device) if device is not None else ext
    return tune_vrg(denoiser, vrg, settings, ext, feature_stats(real, ext), log=None)


def tune_in_fit(trainer: Any, denoiser: Any, vrg: Mapping[str, Any] | None, settings: TuneSettings, dataset: Any,
                num_reference: int, train_seconds: float | None = None) -> dict[str, Any] | None:
    """Fit-end tuning inside a Lightning run (``VRGProfiler(tune_at_fit_end=True)``): global rank 0 runs
    :func:`tune_on_dataset` with ``denoiser`` in eval mode, and ``trainer.strategy.broadcast`` gives every rank
    ``{"entries", "extra"}`` (``None`` without a ``vrg`` state); a collective. ``vrg["tune"]`` records its seconds
    and, given ``train_seconds``, ``train_seconds`` and ``fraction_of_training``."""
    from ..protocol import eval_mode

    result = None
    if vrg is not None and trainer.global_rank == 0:
        with eval_mode(denoiser) as den:
            device = next(den.parameters()).device if hasattr(den, "parameters") else None
            new = tune_on_dataset(den, vrg, settings, dataset, num_reference, device)
        t = new["tune"]
        if train_seconds:
            t.update(train_seconds=train_seconds, fraction_of_training=t["seconds"] / train_seconds)
            from lightning.pytorch.utilities import rank_zero_info

            rank_zero_info(f"VRGProfiler: validated tuning took {t['seconds']:.1f} s, "
                           f"{100 * t['fraction_of_training']:.1f}% of the {train_seconds:.0f} s of training.")
        result = {"entries": new["entries"], "extra": {k: new[k] for k in ("curvature", "tune") if k in new}}
    return trainer.strategy.broadcast(result, src=0)


def checkpoint_settings(vrg: Mapping[str, Any], changes: Mapping[str, Any] | None = None) -> TuneSettings:
    """:class:`TuneSettings` for a checkpoint's ``vrg`` section: the flat ``changes``, with ``solvers``/``steps``/
    ``bases`` that are missing or ``None`` taken from the stored entries (in stored order) and ``features="auto"``
    resolved for the model's channels.

    Raises:
        ValueError: a cell field is missing and the checkpoint stores no entries.
    """
    changes = {k: v for k, v in dict(changes or {}).items() if v is not None}
    entries = list(vrg.get("entries", []))
    missing = [k for k in ("solvers", "steps", "bases") if k not in changes]
    if missing and not entries:
        raise ValueError(f"the checkpoint stores no VRG entries, so {', '.join(missing)} must be given.")
    for name, key in (("solvers", "solver"), ("steps", "steps"), ("bases", "base")):
        if name not in changes:
            values = dict.fromkeys(e[key] for e in entries)
            changes[name] = tuple(int(v) for v in values) if name == "steps" else tuple(values)
    channels = vrg.get("model", {}).get("denoiser", {}).get("unet", {}).get("in_channels", 1)
    changes["features"] = default_features(changes.get("features", "auto"), channels)
    return TuneSettings.from_dict(changes)


def tune_checkpoint(ckpt: str | os.PathLike, out: str | os.PathLike, settings: TuneSettings,
                    reference: str | None = None, *, cache_dir: str | os.PathLike | None = None,
                    log: Callable[[str], None] | None = None, inception_weights: str | os.PathLike | None = None,
                    force: bool = False, denoiser: Any = None) -> dict[str, Any]:
    """``vrg tune``: read ``ckpt``, tune, write the whole checkpoint with the new ``vrg`` section to ``out``
    (atomically; ``out`` must differ from ``ckpt``). Returns the new ``vrg`` section.

    Args:
        reference: real images for FID (``digits``, ``patches``, ``cifar10``, ``folder:PATH``; default ``digits``
            for 1-channel models, else ``patches``).
        cache_dir: reference statistics and (under ``tune-stats/``) the paired evaluator's statistics.
        force: replace an existing ``out`` (never ``ckpt``).
        denoiser: the model to tune (:func:`vrg_lightning.models.load_model`; default: the one ``ckpt`` holds).

    Raises:
        ValueError: ``out`` is ``ckpt`` (the same path or a link to it) or a folder.
        FileExistsError: ``out`` exists and ``force`` is False (also when it appears while tuning runs).
    """
    from ..checkpoint import VRG_KEY, load_checkpoint_file, load_denoiser, read_vrg
    from ..io import atomic_torch_save, check_output_file
    from ..sampling import image_shape
    from .features import build_features

    check_output_file(out, {"ckpt": ckpt}, force=force)
    raw = load_checkpoint_file(ckpt)
    if denoiser is None:
        denoiser, _ = load_denoiser(raw)
    vrg = read_vrg(raw)
    shape = image_shape(denoiser)
    reference = reference or ("digits" if shape[0] == 1 else "patches")
    ext = build_features(default_features(settings.features, shape), image_shape=shape,
                         inception_weights=inception_weights)
    ref = reference_for(reference, ext, shape, cache_dir=cache_dir)
    new = tune_vrg(denoiser, vrg, settings, ext, ref, log=log,
                   cache_dir=None if cache_dir is None else Path(cache_dir) / "tune-stats")
    new["tune"]["reference"] = reference
    new["tune"]["input"] = str(ckpt)
    raw[VRG_KEY] = {**raw[VRG_KEY], **new}
    check_output_file(out, {"ckpt": ckpt}, force=force)  # again: tuning takes a while
    atomic_torch_save(out, raw, overwrite=force)
    return new

