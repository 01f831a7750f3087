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
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ..trajectories import make_trajectory
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

    The cache must hold results of one MSE function (a grid's or a tuning run's profile).
    """
    if cache is None:
        return optimize_trajectory(base_alpha_bar, mse_fn, settings)
    key = cache_key(base_alpha_bar, settings)
    if key not in cache:
        cache[key] = optimize_trajectory(base_alpha_bar, mse_fn, settings)
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
    profile: Any, schedule: Any, grid: TrajectoryGrid, cache: dict | None = None
) -> list[dict[str, Any]]:
    """Optimise every point of ``grid`` against ``profile``; one entry each, in :meth:`TrajectoryGrid.combinations`
    order. The ``paper`` objective is optimised once per (steps, base, lp) and recorded for each solver.

    Args:
        profile: an :class:`~vrg_lightning.profile.ErrorProfile` (its ``mse_function(grid.mse_mode)`` is the MSE).
        schedule: the :class:`~vrg_lightning.schedule.NoiseSchedule` the base trajectories are made for (and whose
            trained range every step keeps, :func:`grid_settings`).
        grid: the :class:`TrajectoryGrid`.
        cache: results of earlier calls with the same profile to reuse (:func:`optimize_cached`); filled in.
    """
    if not isinstance(grid, TrajectoryGrid):
        raise ValueError(f"grid must be a TrajectoryGrid; got {type(grid).__name__}.")
    mse_fn = profile.mse_function(grid.mse_mode)
    cache = {} if cache is None else cache
    bases: dict[tuple[int, str], Tensor] = {}
    entries = []
    for solver, n, base, objective, lp in grid.combinations():
        if (n, base) not in bases:
            bases[(n, base)] = make_trajectory(schedule, base, int(n))
        st = grid_settings(grid, schedule, solver, lp, objective)
        r = optimize_cached(bases[(n, base)], mse_fn, st, cache)
        entries.append(make_entry(solver, n, base, settings_fields(st), result_fields(r),
                                  profile_source=profile.source))
    return entries


def profile_key(profile: Any) -> tuple:
    """What an error profile's MSE functions depend on: its source, bins, moments, sums and table rows (a digest)."""
    h = hashlib.sha256()
    for t in (profile.lambda_edges, profile.sums, *(getattr(profile, "paper_knots", None) or ())):
        h.update(torch.as_tensor(t).detach().cpu().to(torch.float64).contiguous().numpy().tobytes())
        h.update(b"|")
    return profile.source, int(profile.moments), h.hexdigest()


class EntryCache:
    """The entries of a grid for the current profile, optimised again only when the profile changed
    (:func:`profile_key`; the results of one profile are shared between grid points, :func:`optimize_cached`).

    Under DDP (``trainer.world_size > 1``) global rank 0 optimises and ``trainer.strategy.broadcast`` gives every
    rank the same entries: a collective when the profile changed (the profile is the all-rank sum, so every rank
    takes the same branch). ``seconds`` is the optimisation time of the last computation (0 when reused).

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
        if budget is not None and not (isinstance(budget, (int, float)) and 0 < budget <= 1):
            raise ValueError(f"budget must be a share of the wall time in (0, 1] or None; got {budget!r}.")
        self.key: tuple | None = None
        self.results: dict = {}
        self.list: list[dict[str, Any]] = []
        self.grid: TrajectoryGrid | None = None
        self.seconds = 0.0
        self.budget, self.last_seconds, self.done_at, self.step = budget, 0.0, None, None

    def _over_budget(self, trainer: Any) -> bool:
        """Whether optimising now would take more than ``budget`` of the wall time since the last optimisation
        (judged from the last optimisation's time; decided on rank 0 and broadcast, so every rank agrees)."""
        import time

        if self.budget is None or self.done_at is None:
            return False
        late = self.last_seconds > self.budget * (time.perf_counter() - self.done_at)
        if int(getattr(trainer, "world_size", 1) or 1) > 1:
            late = bool(trainer.strategy.broadcast(late, src=0))
        return late

    def entries(self, profile: Any, schedule: Any, grid: TrajectoryGrid, trainer: Any = None,
                force: bool = False) -> tuple[list[dict[str, Any]], bool]:
        """``(entries, fresh)``: the grid's entries for ``profile`` and whether they were optimised now.

        With a ``budget``, a changed profile is optimised only when the time since the last optimisation is at least
        ``last optimisation time / budget``; until then the last entries (of an earlier profile, from training step
        :attr:`step`) are returned, unless ``force`` (the fit end)."""
        import time

        key = (profile_key(profile), schedule.to_dict() if hasattr(schedule, "to_dict") else schedule)
        if key == self.key and grid == self.grid or (grid == self.grid and not force and self._over_budget(trainer)):
            self.seconds = 0.0
            return self.list, False
        if key != self.key:
            self.results = {}
        start = time.perf_counter()
        world = int(getattr(trainer, "world_size", 1) or 1)
        out = None
        if world == 1 or trainer.global_rank == 0:
            out = compute_entries(profile, schedule, grid, self.results) if grid.steps else []
        if world > 1:
            out = trainer.strategy.broadcast(out, src=0)
        self.key, self.grid, self.list, self.seconds = key, grid, out, time.perf_counter() - start
        self.last_seconds, self.done_at = self.seconds, time.perf_counter()
        self.step = getattr(trainer, "global_step", None)
        return out, True
