"""Settings and results of the VRG optimizer, and the trajectory grid a checkpoint stores: the one settings source.

:class:`OptimizeSettings` configures one optimisation (:func:`~vrg_lightning.optimize.optimize_trajectory`);
:class:`TrajectoryGrid` is the set of trajectories to optimise for a model (``solvers x steps x bases x lps x
objectives`` with shared optimizer settings), used by :class:`~vrg_lightning.callbacks.VRGProfiler`,
``vrg profile``, ``vrg tune`` (:class:`~vrg_lightning.evaluation.tune.TuneSettings`) and the YAML configs. The CLI
derives its flags, choices and defaults from the fields of :class:`TrajectoryGrid` (:func:`grid_fields`), so an
option added here appears everywhere.

Defaults are the published code's (lp 0.01, λ 100, free start; ``../shared/reference``), which is also the setting
validated on both offline datasets (docs/BENCHMARKS.md, Quality).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from torch import Tensor

from ..io import from_plain_dict
from ..peers.bases import PEER_BASES, check_peer_grid
from ..solvers import SOLVERS
from ..trajectories import BASES
from ..variance import OBJECTIVES

__all__ = ["TRUSTS", "MSE_MODES", "GRID_BASES", "PEER_BASES", "STORED_BASES", "OptimizeSettings", "OptimizeResult",
           "TrajectoryGrid", "grid_fields", "schedule_range"]

TRUSTS = ("alpha", "logsnr")
MSE_MODES = ("paper", "fit")
GRID_BASES = tuple(b for b in BASES if b != "list")  # bases a grid can generate (``list`` needs values)
STORED_BASES = (*GRID_BASES, *PEER_BASES)  # and the peer bases (``gits`` needs the model, ``dmn`` the schedule)


@dataclass(frozen=True)
class OptimizeSettings:
    """Settings of :func:`optimize_trajectory` (frozen; ``to_dict``/``from_dict`` round-trip).

    Args:
        lp: learning portion, trust-region size in (0, 1).
        reg_lambda: weight (>= 0) of the penalty holding the noisiest ᾱ near its original value.
        objective: ``"paper"`` (the published DDIM cpe) or ``"solver"`` (solver-aware propagation).
        solver: solver the trajectory is for (used by ``objective="solver"``; recorded otherwise).
        mse_mode: how MSE(ᾱ) is made from a profile: ``"fit"`` (smooth PCHIP) or ``"paper"`` (piecewise linear).
            :func:`optimize_trajectory` takes the MSE function itself; this records which was used.
        trust: ``"alpha"`` (the paper's per-step ratio box) or ``"logsnr"`` (a box per step in λ).
        pin_start: hold the noisiest ᾱ exactly instead of penalising its change.
        global_grid: grid size of the global dynamic-programming start (0: start from the base only).
        max_rounds: upper bound on the rounds of a search (smooth phase + grid refinement per start; surrogate
            steps of the solver-aware objective).
        tol: relative loss improvement below which a round counts as no progress.
        alpha_bar_range: ``(lo, hi)``, the ᾱ interval the steps must stay in, e.g. the schedule's trained range
            ``(schedule.alpha_bar_min, schedule.alpha_bar_max)`` (:func:`schedule_range`); ``None``: only (0, 1).
            A base step outside it is never moved further out.
    """

    lp: float = 0.01
    reg_lambda: float = 100.0
    objective: str = "paper"
    solver: str = "ddim"
    mse_mode: str = "fit"
    trust: str = "alpha"
    pin_start: bool = False
    global_grid: int = 200
    max_rounds: int = 30
    tol: float = 1e-9
    alpha_bar_range: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        lp = self.lp
        if isinstance(lp, bool) or not isinstance(lp, (int, float)) or not (0 < lp < 1):
            raise ValueError(f"lp must be a number strictly between 0 and 1; got {lp!r}.")
        lam = self.reg_lambda
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not (math.isfinite(lam) and lam >= 0):
            raise ValueError(f"reg_lambda must be a finite number >= 0; got {lam!r}.")
        for name, allowed in (("objective", OBJECTIVES), ("mse_mode", MSE_MODES), ("trust", TRUSTS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"Unknown {name} {getattr(self, name)!r}; allowed: {', '.join(allowed)}.")
        if self.solver not in SOLVERS:
            raise ValueError(f"Unknown solver {self.solver!r}; allowed: {', '.join(SOLVERS)}.")
        if not isinstance(self.pin_start, bool):
            raise ValueError(f"pin_start must be True or False; got {self.pin_start!r}.")
        if isinstance(self.max_rounds, bool) or not isinstance(self.max_rounds, int) or self.max_rounds < 1:
            raise ValueError(f"max_rounds must be a positive integer; got {self.max_rounds!r}.")
        if isinstance(self.global_grid, bool) or not isinstance(self.global_grid, int) or self.global_grid < 0:
            raise ValueError(f"global_grid must be an integer >= 0; got {self.global_grid!r}.")
        if not (isinstance(self.tol, (int, float)) and 0 <= self.tol < 1):
            raise ValueError(f"tol must be a number in [0, 1); got {self.tol!r}.")
        object.__setattr__(self, "lp", float(lp))
        object.__setattr__(self, "reg_lambda", float(lam))
        object.__setattr__(self, "alpha_bar_range", _check_range(self.alpha_bar_range))

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON- and checkpoint-safe; ``alpha_bar_range`` as a list or ``None``)."""
        d = asdict(self)
        d["alpha_bar_range"] = None if self.alpha_bar_range is None else list(self.alpha_bar_range)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> OptimizeSettings:
        """Inverse of :meth:`to_dict`; unknown keys are ignored, missing keys take their defaults."""
        return from_plain_dict(cls, d)


def _check_range(value: Any) -> tuple[float, float] | None:
    if value is None:
        return None
    ok = isinstance(value, (tuple, list)) and len(value) == 2 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    if not ok or not 0 < value[0] < value[1] < 1:
        raise ValueError(f"alpha_bar_range must be None or two numbers (lo, hi) with 0 < lo < hi < 1; got {value!r}.")
    return float(value[0]), float(value[1])


def schedule_range(schedule: Any) -> tuple[float, float]:
    """The trained ᾱ range of a noise schedule, ``(ᾱ(t=T-1), ᾱ(t=0))``, for ``OptimizeSettings.alpha_bar_range``.

    Example:
        >>> from vrg_lightning.schedule import NoiseSchedule
        >>> [round(v, 10) for v in schedule_range(NoiseSchedule())]
        [4.03583e-05, 0.9999]
    """
    return float(schedule.alpha_bar_min), float(schedule.alpha_bar_max)


@dataclass
class OptimizeResult:
    """Result of :func:`optimize_trajectory`.

    ``alpha_bar``/``base_alpha_bar`` are float64 tensors, cleanest first; ``cpe_*`` exclude the penalty,
    ``loss`` includes it; ``seconds`` is the optimizer's wall time; ``iterations`` counts rounds; ``complete`` is
    ``False`` when a ``deadline`` stopped the search early (the result is then the best found by then, still never
    worse than the base).
    """

    alpha_bar: Tensor
    base_alpha_bar: Tensor
    cpe_before: float
    cpe_after: float
    loss: float
    seconds: float
    settings: OptimizeSettings
    iterations: int
    loss_before: float = math.nan
    evaluations: int = 0
    complete: bool = True

    def to_dict(self) -> dict[str, Any]:
        """Plain types only: lists of floats, numbers, strings, the settings as a dict."""
        return {
            "alpha_bar": [float(v) for v in self.alpha_bar],
            "base_alpha_bar": [float(v) for v in self.base_alpha_bar],
            "cpe_before": float(self.cpe_before),
            "cpe_after": float(self.cpe_after),
            "loss_before": float(self.loss_before),
            "loss": float(self.loss),
            "seconds": float(self.seconds),
            "iterations": int(self.iterations),
            "evaluations": int(self.evaluations),
            "complete": bool(self.complete),
            "settings": self.settings.to_dict(),
        }


def _names(name: str, values: Any, allowed: tuple[str, ...]) -> tuple[str, ...]:
    vals = (values,) if isinstance(values, str) else tuple(values)
    bad = [v for v in vals if v not in allowed]
    if not vals or bad:
        raise ValueError(f"{name} must be a non-empty list of {', '.join(allowed)}; got {list(vals)!r}"
                         + (f" ({', '.join(map(repr, bad))} unknown)." if bad else "."))
    return vals


@dataclass(frozen=True)
class TrajectoryGrid:
    """The trajectories to optimise for a model: every ``(solver, steps, base, lp, objective)`` combination, with
    shared optimizer settings (frozen, validated once; ``to_dict`` is the stored ``vrg.profiler.optimize``).

    Args:
        solvers: solvers the trajectories are for (:data:`~vrg_lightning.solvers.SOLVERS`).
        steps: step counts (an empty tuple stores the profile only).
        bases: base trajectories (:data:`STORED_BASES`: the classic :data:`GRID_BASES` and the peer bases ``gits``,
            from the model's teacher paths, and ``dmn``, from the schedule; :mod:`vrg_lightning.peers`). A grid
            with ``dmn`` needs solvers its bound covers, one with ``gits`` steps <= its grid (61 values).
        lps: learning portions (trust-region sizes) in (0, 1).
        objectives: ``paper`` (the published DDIM cpe) and/or ``solver`` (solver-aware propagation).
        reg_lambda: weight of the penalty that holds the noisiest ᾱ near its base value.
        trust: trust region, ``alpha`` (the paper's) or ``logsnr``.
        mse_mode: MSE interpolation of a profile, ``fit`` (smooth PCHIP) or ``paper`` (piecewise linear).
        pin_start: hold the noisiest ᾱ exactly instead of penalising its change.

    Example:
        >>> g = TrajectoryGrid(solvers=("ddim", "dpmpp_2m"), steps=(10,), bases=("logSNR",), lps=(0.01, 0.1))
        >>> len(list(g.combinations())), g.to_dict()["lps"]
        (4, [0.01, 0.1])
    """

    solvers: tuple[str, ...] = field(default=("ddim",), metadata={"help": "solvers", "choices": SOLVERS})
    steps: tuple[int, ...] = field(default=(10, 20), metadata={"help": "step counts"})
    bases: tuple[str, ...] = field(default=("time_uniform", "time_quadratic", "logSNR"),
                                   metadata={"help": "base trajectories", "choices": STORED_BASES})
    lps: tuple[float, ...] = field(default=(0.01,), metadata={"help": "learning portions (trust-region sizes)"})
    objectives: tuple[str, ...] = field(default=("paper",), metadata={"help": "objectives", "choices": OBJECTIVES})
    reg_lambda: float = field(default=100.0, metadata={"help": "penalty weight holding the noisiest alpha_bar"})
    trust: str = field(default="alpha", metadata={"help": "trust region", "choices": TRUSTS})
    mse_mode: str = field(default="fit", metadata={"help": "MSE interpolation of the profile", "choices": MSE_MODES})
    pin_start: bool = field(default=False, metadata={"help": "hold the noisiest alpha_bar exactly"})

    def __post_init__(self) -> None:
        object.__setattr__(self, "solvers", _names("solvers", self.solvers, SOLVERS))
        object.__setattr__(self, "bases", _names("bases", self.bases, STORED_BASES))
        object.__setattr__(self, "objectives", _names("objectives", self.objectives, OBJECTIVES))
        steps = (self.steps,) if isinstance(self.steps, int) else tuple(self.steps)
        if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in steps):
            raise ValueError(f"steps must be a list of positive integers; got {list(steps)!r}.")
        object.__setattr__(self, "steps", steps)
        check_peer_grid(self.bases, self.solvers, self.steps)
        lps = (self.lps,) if isinstance(self.lps, (int, float)) else tuple(self.lps)
        if not lps:
            raise ValueError("lps must be a non-empty list of numbers in (0, 1); got [].")
        object.__setattr__(self, "lps", tuple(float(v) if not isinstance(v, bool) else v for v in lps))
        for lp in self.lps:  # OptimizeSettings validates the numbers and the names of one optimisation
            self.settings(self.solvers[0], lp, self.objectives[0])
        object.__setattr__(self, "reg_lambda", float(self.reg_lambda))

    def settings(self, solver: str, lp: float, objective: str) -> OptimizeSettings:
        """The :class:`OptimizeSettings` of one grid point: the grid's shared optimizer fields (every field the two
        classes have in common) with this ``solver``, ``lp`` and ``objective``."""
        shared = {f.name: getattr(self, f.name) for f in fields(OptimizeSettings) if f.name in _GRID_NAMES}
        return OptimizeSettings(**{**shared, "solver": solver, "lp": lp, "objective": objective})

    def combinations(self) -> Iterator[tuple[str, int, str, str, float]]:
        """``(solver, steps, base, objective, lp)`` in storage order (solver, steps, base, objective, lp)."""
        for solver in self.solvers:
            for n in self.steps:
                for base in self.bases:
                    for objective in self.objectives:
                        for lp in self.lps:
                            yield solver, n, base, objective, lp

    def replace(self, **changes: Any) -> TrajectoryGrid:
        """A copy with some fields changed (validated again)."""
        return TrajectoryGrid(**{**asdict(self), **changes})

    def to_dict(self) -> dict[str, Any]:
        """Plain dict with lists (checkpoint- and JSON-safe); the keys of ``vrg.profiler.optimize``."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrajectoryGrid:
        """Inverse of :meth:`to_dict`; unknown keys are ignored, missing or ``None`` ones take their defaults."""
        return from_plain_dict(cls, d, skip_none=True)


_GRID_NAMES = frozenset(f.name for f in fields(TrajectoryGrid))


def grid_fields() -> tuple[Any, ...]:
    """The :class:`TrajectoryGrid` fields (name, type, default, ``metadata["help"]``, ``["choices"]``), from which the
    CLI builds its flags."""
    return fields(TrajectoryGrid)
