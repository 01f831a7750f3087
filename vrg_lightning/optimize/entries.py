"""Stored trajectory entries (``checkpoint["vrg"]["entries"]``): the one builder, used by
:class:`~vrg_lightning.callbacks.VRGProfiler`, ``vrg profile`` (:func:`compute_entries`) and tuning (the pieces).

An entry is a plain dict: ``solver, steps, base``, then the optimizer's settings (:data:`SETTING_KEYS`), then its
result (:data:`RESULT_KEYS`), then ``profile_source`` and ``validated`` (``None`` until ``vrg tune`` decides). Tuned
entries add ``kind`` after ``objective`` and may leave out some results; :func:`make_entry` keeps the fields in the
order given.

Optimisations are memoised by :func:`optimize_cached` under one key rule (:func:`cache_key`): the base trajectory's
values and the settings, without the solver when the objective is ``paper`` (the published cpe does not depend on
the solver, so a grid of several solvers optimises it once) or when a DDIM-like solver's ``solver`` objective is the
paper formula. :class:`EntryCache` keeps those results while the profile is unchanged (checkpoint saves) and lets
global rank 0 optimise for all ranks. Every entry keeps its steps in the schedule's trained range
(:func:`grid_settings`: ``alpha_bar_range`` from the schedule).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ..variance import DDIM_LIKE, MSEFn
from .search import optimize_trajectory
from .settings import OptimizeResult, OptimizeSettings, TrajectoryGrid, schedule_range

__all__ = ["SETTING_KEYS", "RESULT_KEYS", "cache_key", "optimize_cached", "settings_fields", "result_fields",
           "make_entry", "grid_settings", "compute_entries", "profile_key", "EntryCache"]

SETTING_KEYS = ("objective", "lp", "reg_lambda", "trust", "pin_start", "mse_mode")
RESULT_KEYS = ("alpha_bar", "base_alpha_bar", "cpe_before", "cpe_after", "loss_before", "loss", "seconds",
               "iterations", "evaluations")


def cache_key(base_alpha_bar: Tensor | Sequence[float], settings: OptimizeSettings, kind: str = "vrg") -> tuple:
    """The key of one optimisation: ``(kind, base ᾱ values, settings)``, the solver left out for ``paper`` (and the
    ``solver`` objective of a DDIM-like solver counted as ``paper``: the same formula).

    Example:
        >>> ab = torch.tensor([0.9, 0.5], dtype=torch.float64)
        >>> cache_key(ab, OptimizeSettings(solver="ddim")) == cache_key(ab, OptimizeSettings(solver="dpmpp_2m"))
        True
    """
    d = {k: tuple(v) if isinstance(v, list) else v for k, v in settings.to_dict().items()}
    if settings.objective == "paper" or settings.solver in DDIM_LIKE:  # the paper formula: no solver in it
        d.pop("solver")
        d["objective"] = "paper"
    values = tuple(float(v) for v in torch.as_tensor(base_alpha_bar, dtype=torch.float64).reshape(-1).tolist())
    return (kind, values, tuple(sorted(d.items())))


def optimize_cached(
    base_alpha_bar: Tensor, mse_fn: MSEFn, settings: OptimizeSettings, cache: dict | None = None
) -> OptimizeResult:
    """:func:`~vrg_lightning.optimize.optimize_trajectory`, memoised in ``cache`` under :func:`cache_key`.

    The cache must hold results of one MSE function (a grid's or a tuning run's profile). A cache with an
    ``optimize_kwargs(key)`` method (:class:`EntryCache`'s budgeted pass) adds the optimizer's ``deadline`` and
    ``resume`` point.
    """
    if cache is None:
        return optimize_trajectory(base_alpha_bar, mse_fn, settings)
    key = cache_key(base_alpha_bar, settings)
    if key not in cache:
        extra = cache.optimize_kwargs(key) if hasattr(cache, "optimize_kwargs") else {}
        cache[key] = optimize_trajectory(base_alpha_bar, mse_fn, settings, **extra)
    return cache[key]


def settings_fields(settings: OptimizeSettings, **overrides: Any) -> dict[str, Any]:
    """The entry's optimizer fields (:data:`SETTING_KEYS`, plain types) of ``settings``; ``overrides`` replace
    values (e.g. the requested objective when a DDIM-like solver objective was optimised as ``paper``).

    Example:
        >>> settings_fields(OptimizeSettings(lp=0.1), objective="solver")
        {'objective': 'solver', 'lp': 0.1, 'reg_lambda': 100.0, 'trust': 'alpha', 'pin_start': False, 'mse_mode': 'fit'}
    """
    bad = sorted(set(overrides) - set(SETTING_KEYS))
    if bad:
        raise ValueError(f"settings_fields: unknown field(s) {', '.join(bad)}; allowed: {', '.join(SETTING_KEYS)}.")
    d = settings.to_dict()
    return {k: overrides.get(k, d[k]) for k in SETTING_KEYS}


def result_fields(result: Any, keys: Sequence[str] = RESULT_KEYS) -> dict[str, Any]:
    """The entry's result fields ``keys`` (plain lists and numbers) of an :class:`OptimizeResult`, a
    :class:`~.discretization.DiscResult` or a mapping; keys the result does not have are ``None``."""
    d = result.to_dict() if hasattr(result, "to_dict") else dict(result)
    return {k: d.get(k) for k in keys}


def make_entry(
    solver: str, steps: int, base: str, *fields: Mapping[str, Any], profile_source: str,
    validated: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """One stored entry: ``{solver, steps, base, **fields (in the order given), profile_source, validated}``."""
    out: dict[str, Any] = {"solver": solver, "steps": int(steps), "base": base}
    for f in fields:
        out.update(f)
    out["profile_source"] = profile_source
    out["validated"] = validated
    return out


def grid_settings(grid: TrajectoryGrid, schedule: Any, solver: str, lp: float, objective: str) -> OptimizeSettings:
    """The settings of one grid point for a model: :meth:`TrajectoryGrid.settings` with the schedule's trained range
    (:func:`~.settings.schedule_range`) as ``alpha_bar_range``, so no step leaves it."""
    return dataclasses.replace(grid.settings(solver, lp, objective), alpha_bar_range=schedule_range(schedule))


def compute_entries(
    profile: Any, schedule: Any, grid: TrajectoryGrid, cache: dict | None = None, *, model: Any = None,
    peer_cache: dict | None = None, peer_refresh: bool = True,
) -> list[dict[str, Any]]:
    """Optimise every point of ``grid`` against ``profile``; one entry each, in :meth:`TrajectoryGrid.combinations`
    order. The ``paper`` objective is optimised once per (steps, base, lp) and recorded for each solver. A peer
    base (``gits``, ``dmn``; :func:`vrg_lightning.peers.base_trajectory`) is computed per (solver, steps) and its
    entries add ``base_provenance`` (settings, seconds, model evaluations).

    Args:
        profile: an :class:`~vrg_lightning.profile.ErrorProfile` (its ``mse_function(grid.mse_mode)`` is the MSE).
        schedule: the :class:`~vrg_lightning.schedule.NoiseSchedule` the base trajectories are made for (and whose
            trained range every step keeps, :func:`grid_settings`).
        grid: the :class:`TrajectoryGrid`.
        cache: results of earlier calls with the same profile to reuse (:func:`optimize_cached`); filled in. A
            ``None`` it holds leaves that entry out (:class:`EntryCache`'s budget).
        model: the denoiser a ``gits`` base is computed from (its teacher paths); required for one.
        peer_cache: peer results to reuse (GITS once per model weights; :func:`vrg_lightning.peers.peer_base`).
        peer_refresh: ``False`` reuses the model's last GITS matrix even when its weights changed since.

    Raises:
        ValueError: ``grid`` is not a TrajectoryGrid, or it has base ``gits`` and no ``model`` is given.
    """
    if not isinstance(grid, TrajectoryGrid):
        raise ValueError(f"grid must be a TrajectoryGrid; got {type(grid).__name__}.")
    from ..peers import PEER_BASES, base_trajectory

    if "gits" in grid.bases and grid.steps and model is None:
        raise ValueError("grid base 'gits' needs the model (GITS picks its steps from the model's own teacher "
                         "paths): pass model= (vrg profile: --ckpt, --model or --diffusers-dir; the VRGProfiler "
                         "callback: the module's vrg_denoiser()), or use base 'dmn', which needs only the schedule.")
    mse_fn = profile.mse_function(grid.mse_mode)
    cache = {} if cache is None else cache
    bases: dict[tuple, tuple[Tensor, dict[str, Any]]] = {}
    entries = []
    for solver, n, base, objective, lp in grid.combinations():
        key = (solver, n, base) if base in PEER_BASES else (n, base)  # a peer's steps depend on the solver
        if key not in bases:
            bases[key] = base_trajectory(schedule, base, solver, int(n), model=model, cache=peer_cache,
                                         refresh=peer_refresh)
        st = grid_settings(grid, schedule, solver, lp, objective)
        r = optimize_cached(bases[key][0], mse_fn, st, cache)
        if r is None:  # not optimised yet: EntryCache's budget left it for a later save
            continue
        entries.append(make_entry(solver, n, base, settings_fields(st), result_fields(r), bases[key][1],
                                  profile_source=profile.source))
    return entries


def profile_key(profile: Any) -> tuple:
    """What an error profile's MSE functions depend on: its source, bins, moments, sums and table rows (a digest)."""
    h = hashlib.sha256()
    for t in (profile.lambda_edges, profile.sums, *(getattr(profile, "paper_knots", None) or ())):
        h.update(torch.as_tensor(t).detach().cpu().to(torch.float64).contiguous().numpy().tobytes())
        h.update(b"|")
    return profile.source, int(profile.moments), h.hexdigest()


OVERHEAD_MARGIN = 1.5  # a save holds back this many times the last one's time besides optimising (its variation and
# the optimizer's check interval: the deadline is met to within milliseconds)
FIRST_HELD = 0.1  # the share of the first save held back for that work (nothing measured yet)
MAX_RESUMES = 4  # tries deadlines may stop in a row before a point waits for a longer gap or the fit end
PRIOR_SECONDS_PER_STEP = {False: 2e-3, True: 4e-2}  # one optimisation's time per step before any was timed
# (paper, solver-aware objective), a first guess for the budget of the first save; measured times replace it


class _Slice(dict):
    """What :func:`optimize_cached` sees in one pass of :meth:`EntryCache.entries` over the grid: a result of the
    current profile as it is; a stale or missing one, at a visit from ``start`` on, optimised now when its predicted
    time (:meth:`EntryCache.predict`) fits in what is left of ``allowance`` seconds (``None``: no limit), with the end
    of the allowance as its ``deadline``; the first a pass tries runs whatever its prediction while some allowance is
    left, unless deadlines have stopped it :data:`MAX_RESUMES` times in a row. One the deadline stops is not stored
    (the entry keeps what it held) and its best point so far is kept: the next try resumes from it
    (:attr:`EntryCache.partial`); the pass optimises nothing after it. ``stop`` is the first visit left for the next
    save (round-robin): the first that did not fit what was left but would fit a whole allowance, or that the
    deadline stopped; one that would not fit a whole allowance (or has used its resumptions) is passed over (it waits
    for a longer gap between saves, or the fit end). Points not optimised are served as they are: the result of an
    earlier profile, or ``None`` (the entry left out) where there is none. So a pass never runs past its allowance by
    more than one check of the optimizer (milliseconds)."""

    def __init__(self, cache: EntryCache, start: int, allowance: float | None, step: int | None,
                 tried: bool = False) -> None:
        import time

        super().__init__()
        self.cache, self.start, self.allowance, self.step = cache, start, allowance, step
        self.visit, self.stop, self.optimised, self.stale, self.t0 = -1, None, 0, 0, time.perf_counter()
        self.tried = tried  # whether this save has started an optimisation (its first runs whatever its prediction)
        self.out = False  # whether a deadline has stopped one
        self.steps: list[int | None] = []  # the profile step of each served result, in entry order
        self._held: tuple | None = None

    def __contains__(self, key: object) -> bool:
        self.visit += 1
        c, held = self.cache, self.cache.results.get(key)
        self._held = held
        if held is not None and held[1] == c.key:
            return True
        if not self.out and self.visit >= self.start:
            if self.allowance is None:
                return False  # optimise it now: optimize_cached stores the result (__setitem__)
            need, cuts = c.predict(key), c.partial.get(key, (None, 0, 0.0))[1]
            first = not self.tried and cuts < MAX_RESUMES and self.allowance > self.spent()
            if self.spent() + need <= self.allowance or first:
                self.tried = True
                return False
            if self.stop is None and need <= self.allowance and cuts < MAX_RESUMES:  # the next save starts here
                self.stop = self.visit
        self.stale += 1
        return True

    def optimize_kwargs(self, key: Any) -> dict[str, Any]:
        """The optimizer's ``deadline`` and ``resume`` point (the best point of a try a deadline stopped; an
        unlimited pass, the fit end, searches afresh)."""
        if self.allowance is None:
            return {"deadline": None, "resume": None}
        partial = self.cache.partial.get(key)
        return {"deadline": self.t0 + self.allowance, "resume": None if partial is None else partial[0]}

    def spent(self) -> float:
        """Wall seconds since the pass began (optimisations and the building of entries)."""
        import time

        return time.perf_counter() - self.t0

    def __setitem__(self, key: Any, result: OptimizeResult) -> None:
        self.cache.optimising += result.seconds
        _, cuts, before = self.cache.partial.pop(key, (None, 0, 0.0))
        if not result.complete:  # the deadline stopped it: keep what was held, resume from its best next time
            self.cache.partial[key] = (result.alpha_bar, cuts + 1, before + result.seconds)
            self.stop = self.visit if self.stop is None else self.stop
            self.stale, self.out = self.stale + 1, True
            return
        self.optimised += 1
        self.cache.timed(key, before + result.seconds)
        self._held = self.cache.results[key] = (result, self.cache.key, self.step)

    def __getitem__(self, key: Any) -> OptimizeResult | None:
        if self._held is None:
            return None
        self.steps.append(self._held[2])
        return self._held[0]


class EntryCache:
    """The entries of a grid for the current profile, optimised again only when the profile changed
    (:func:`profile_key`; the results of one profile are shared between grid points, :func:`optimize_cached`).

    With a ``budget`` (a share of the wall time), a save optimises at most what fits in ``budget`` times the wall
    time since the last save (for the first, since :attr:`last_end`, the start of training as the callback sets it),
    predicted per optimisation from the ones timed so far (:meth:`predict`; before any, from
    :data:`PRIOR_SECONDS_PER_STEP`), less :data:`OVERHEAD_MARGIN` times what the last save spent besides optimising
    (building entries; at the first, :data:`FIRST_HELD` of its share). A deadline at the end of that allowance stops
    an optimisation that runs longer than predicted, and a later save resumes it from its best point, so no save
    stalls training for more than its share (an overspend of milliseconds carries to the next save, time left over
    does not) and long optimisations still finish, over several saves (:class:`_Slice`).
    Stale results are refreshed round-robin over the grid; the others are kept, so an entry may come from an earlier
    profile: its ``profile_step`` key says from which training step (``None`` outside training); :attr:`step` is the
    oldest of them. A grid point never optimised yet is left out until it is. ``force`` (the fit end) or
    ``budget=None`` optimises every stale point.

    Under DDP (``trainer.world_size > 1``) global rank 0 optimises and ``trainer.strategy.broadcast`` gives every
    rank the same entries: a collective unless every entry is already of this profile (the profile is the all-rank
    sum and that state is broadcast, so every rank takes the same branch). ``seconds`` is the optimisation time of
    the last call (0 when reused).

    A ``gits`` base needs the model: :attr:`model_fn` (set by the callback to the module's ``vrg_denoiser``) gives
    it, called only when the grid has ``gits``. Its GITS cost matrix is kept in :attr:`peers`
    (:func:`vrg_lightning.peers.peer_base`): a budgeted save reuses the last one (computed at the first save that
    needed it; ``weights_sha256`` in the entries' ``base_provenance`` names those weights), an unbudgeted one
    (``force``, the fit end, or ``budget=None``) recomputes it when the weights changed. DMN results are kept.

    Example:
        >>> from vrg_lightning.profile import ErrorProfile
        >>> from vrg_lightning.schedule import NoiseSchedule
        >>> prof = ErrorProfile.from_table(torch.tensor([0.99, 0.5, 0.01], dtype=torch.float64),
        ...                                torch.tensor([0.3, 0.1, 0.01]))
        >>> cache, grid = EntryCache(), TrajectoryGrid(steps=(3,), bases=("logSNR",))
        >>> first, fresh = cache.entries(prof, NoiseSchedule(), grid)
        >>> again, fresh_again = cache.entries(prof, NoiseSchedule(), grid)
        >>> len(first), fresh, again is first, fresh_again
        (1, True, True, False)
    """

    def __init__(self, budget: float | None = None) -> None:
        import time

        if budget is not None and not (isinstance(budget, (int, float)) and 0 < budget <= 1):
            raise ValueError(f"budget must be a share of the wall time in (0, 1] or None; got {budget!r}.")
        self.key: tuple | None = None
        self.results: dict = {}  # cache_key -> (result, profile key, training step), the latest of every point
        self.list: list[dict[str, Any]] = []
        self.grid: TrajectoryGrid | None = None
        self.seconds = 0.0
        self.budget, self.step, self.complete = budget, None, False
        self.last_end = time.perf_counter()  # end of the last save that optimised (the callback: start of training)
        self.carry, self.cursor = 0.0, 0
        self.overhead: float | None = None  # the last save's time besides optimising (None before one)
        self.optimising = 0.0  # the current save's time optimising
        self.last_call = -math.inf  # the last call (a save that optimised nothing leaves its share unused)
        self.times: dict[tuple, list[float]] = {}  # (solver-aware, solver, steps) -> [seconds summed, count]
        self.partial: dict[tuple, tuple] = {}  # cache_key -> (best trajectory, tries stopped in a row, seconds) of
        # an optimisation deadlines stopped
        self.model_fn: Any = None  # () -> the denoiser, for a gits base
        self.peers: dict = {}  # peer results (GITS per model weights), across profiles

    @staticmethod
    def _kind(key: tuple) -> tuple[bool, str | None, int]:
        settings = dict(key[2])
        aware = settings.get("objective") == "solver"
        return aware, settings.get("solver") if aware else None, len(key[1])

    def timed(self, key: tuple, seconds: float) -> None:
        """Record the time one optimisation took (:meth:`predict` uses the mean per objective kind and steps)."""
        t = self.times.setdefault(self._kind(key), [0.0, 0])
        t[0], t[1] = t[0] + seconds, t[1] + 1

    def predict(self, key: tuple) -> float:
        """Predicted seconds of the optimisation ``key``: the mean time of its kind (the paper objective, or the
        solver-aware one of its solver, else of any solver) at the nearest timed step count, scaled by steps; a kind
        not timed yet from the other (x 20 for solver-aware) or, before any, :data:`PRIOR_SECONDS_PER_STEP`."""
        aware, solver, n = self._kind(key)
        known = [(m, t / c) for (a, v, m), (t, c) in self.times.items() if a == aware and v == solver]
        if not known:
            known = [(m, t / c) for (a, v, m), (t, c) in self.times.items() if a == aware]
        if not known:
            known = [(m, t / c * (20.0 if aware else 0.05)) for (a, v, m), (t, c) in self.times.items()]
        if not known:
            return PRIOR_SECONDS_PER_STEP[aware] * n
        m, t = min(known, key=lambda mt: abs(mt[0] - n))
        return t * n / m

    def _pass(self, profile: Any, schedule: Any, grid: TrajectoryGrid, start: int, allowance: float | None,
              step: int | None, tried: bool = False) -> tuple[list[dict[str, Any]], _Slice]:
        sl = _Slice(self, start, allowance, step, tried)
        needs = {"gits", "ays"} & set(grid.bases)  # bases made from the model (its paths; its family)
        model = self.model_fn() if self.model_fn is not None and needs and grid.steps else None
        out = compute_entries(profile, schedule, grid, sl, model=model, peer_cache=self.peers,
                              peer_refresh=allowance is None) if grid.steps else []  # budgeted: no teacher pass
        for entry, st in zip(out, sl.steps, strict=True):
            entry["profile_step"] = st
        return out, sl

    def _compute(self, profile: Any, schedule: Any, grid: TrajectoryGrid, allowance: float | None,
                 step: int | None) -> tuple[list[dict[str, Any]], bool, bool]:
        """``(entries, optimised any, every entry of this profile)``: one pass from the cursor and, when it got to
        the end of the grid with time left, a second from the start (round-robin). The next save starts at the
        first point left for it."""
        out, sl = self._pass(profile, schedule, grid, self.cursor, allowance, step)
        optimised, after = sl.optimised, sl.stop
        if self.cursor > 0 and not sl.out and (allowance is None or sl.spent() < allowance):
            out, sl = self._pass(profile, schedule, grid, 0, None if allowance is None else allowance - sl.spent(),
                                 step, sl.tried)
            optimised, after = optimised + sl.optimised, sl.stop if after is None else after
        self.cursor = after or 0
        return out, optimised > 0, sl.stale == 0

    def entries(self, profile: Any, schedule: Any, grid: TrajectoryGrid, trainer: Any = None,
                force: bool = False) -> tuple[list[dict[str, Any]], bool]:
        """``(entries, fresh)``: the grid's entries for ``profile`` and whether any was optimised now (class
        docstring: the ``budget``, round-robin refresh, ``force``)."""
        import time

        key = (profile_key(profile), schedule.to_dict() if hasattr(schedule, "to_dict") else schedule)
        start = time.perf_counter()
        since, self.last_call = max(self.last_end, self.last_call), start
        if key == self.key and grid == self.grid and self.complete:
            self.seconds = 0.0
            return self.list, False
        if grid != self.grid:
            self.cursor = 0
        share = None if force or self.budget is None else self.carry + self.budget * (start - since)
        held = FIRST_HELD * (share or 0.0) if self.overhead is None else OVERHEAD_MARGIN * self.overhead
        allowance = None if share is None else share - held  # (for the save's other work)
        self.optimising = 0.0
        world = int(getattr(trainer, "world_size", 1) or 1)
        state = None
        self.key = key
        if world == 1 or trainer.global_rank == 0:
            out, fresh, complete = self._compute(profile, schedule, grid, allowance, getattr(trainer, "global_step",
                                                                                             None))
            steps = [e["profile_step"] for e in out if e.get("profile_step") is not None]
            state = (out, fresh, complete, min(steps) if steps else None)
        if world > 1:
            state = trainer.strategy.broadcast(state, src=0)
        self.list, fresh, self.complete, self.step = state
        self.grid, self.seconds = grid, time.perf_counter() - start
        self.overhead = max(self.seconds - self.optimising, 0.0)
        self.last_call = time.perf_counter()
        if fresh:  # an overspend carries to the next save; time left over does not (each save keeps to its share)
            self.last_end = self.last_call
            self.carry = 0.0 if share is None else min(share - self.seconds, 0.0)
        return self.list, fresh
