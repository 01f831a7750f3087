"""The VRG trajectory optimizer: move each step of a base trajectory within a trust region to minimise
the cumulative prediction error (VRG paper, arXiv 2510.21792, Sec. 3)::

    loss = cpe(ᾱ) + λ_reg · (ᾱ_{N-1} - ᾱ_{N-1}^orig)²        (trajectory cleanest first)

The variables and the trust region (``alpha``, the paper's per-step ratio box, or ``logsnr``) are those of
:mod:`.variables`; ``pin_start=True`` holds the noisiest ᾱ exactly (the penalty is then 0); ``alpha_bar_range``
keeps every step in the schedule's trained range.

Algorithm for the paper objective (deterministic), over one :class:`~.problem.SearchProblem`:

1. From the base (:func:`local_search`): (a) :func:`smooth`, L-BFGS-B on the box (spectral projected gradient when
   the start is pinned in ``alpha`` trust, a box plus one linear equality), which settles the smooth,
   ill-conditioned directions and the active bounds, then (b) :func:`~.chain.refine`, the grid refinement by dynamic
   programming: every pass moves all steps at once to the best point of a product grid around the current one, so
   it crosses the kinks of a piecewise-linear MSE (``mse_mode="paper"``: a kink at every table row) where gradient
   methods stall. Further rounds run while a smooth phase still gains more than ``tol`` (relative).
2. With ``global_grid > 0``, :func:`~.chain.global_start` (the grid minimiser over absolute positions) is a second
   start: refined coarsely, and searched like the base when that is already better (it escapes the local minima of
   bumpy profiles).
3. The best result is returned; it is never worse than the base.

The solver-aware objective of a solver that is not :data:`~vrg_lightning.variance.DDIM_LIKE` (for those it is the
paper formula) is minimised from the paper optimum and the base. For ``dpmsolver2/3`` (groups, :mod:`.groups`) and
``plms``/``pndm`` (windows, :mod:`.windows`) it is itself an exact chain, searched by the steps above
(:func:`scouted_search`); for ``dpmpp_2m`` and ``deis`` by :func:`~.surrogate.solver_search`, a trust-region method
whose models (a chain loss minimised with the steps above, and a Gauss-Newton model of the weights) are scored against
the exact ``cpe_solver``.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch
from scipy.optimize import minimize
from torch import Tensor

from ..trajectories import is_trajectory, validate_trajectory
from ..variance import DDIM_LIKE, MSEFn, cpe_paper, cpe_solver
from .chain import global_start, refine
from .problem import Deadline, SearchProblem
from .settings import MSE_MODES, TRUSTS, OptimizeResult, OptimizeSettings
from .variables import trust_bounds

__all__ = [
    "TRUSTS",
    "MSE_MODES",
    "OptimizeSettings",
    "OptimizeResult",
    "SearchProblem",
    "optimize_trajectory",
    "optimize_with_profile",
    "trust_bounds",
    "trajectory_loss",
    "smooth",
    "local_search",
    "paper_search",
]

SMOOTH_FTOL = 1e-10  # L-BFGS-B's relative tolerance: the grid refinement takes over from there
SCOUT_RESOLUTION, SCOUT_PASSES = 1e-6, 8  # the coarse refinement of the global start that scouts its basin
SCOUT_BOX = 1 / 8  # an exact chain's scouts: the smooth phase from the best start also runs within this part of the box
SCOUT_FTOL = 1e-8  # the smooth phase's relative tolerance in a scout


def solver_aware(settings: OptimizeSettings) -> bool:
    """Whether the objective needs the solver's propagation weights (``solver`` objective, not DDIM-like)."""
    return settings.objective == "solver" and settings.solver not in DDIM_LIKE


def trajectory_loss(
    alpha_bar: Tensor, base_alpha_bar: Tensor, mse_fn: MSEFn, settings: OptimizeSettings
) -> tuple[float, float]:
    """``(cpe, loss)`` of a trajectory against its base, as the optimizer scores it (the exact objective:
    :func:`~vrg_lightning.variance.cpe_paper` or :func:`~vrg_lightning.variance.cpe_solver`).

    Example:
        >>> ab = torch.tensor([0.9, 0.5], dtype=torch.float64)
        >>> cpe, loss = trajectory_loss(ab, ab, lambda a: torch.ones_like(a), OptimizeSettings())
        >>> round(cpe, 6), round(loss, 6)
        (0.555556, 0.555556)
    """
    ab = torch.as_tensor(alpha_bar, dtype=torch.float64).detach()
    with torch.no_grad():
        cpe = cpe_solver(ab, mse_fn, settings.solver) if solver_aware(settings) else cpe_paper(ab, mse_fn)
    pen = 0.0 if settings.pin_start else settings.reg_lambda * (float(ab[-1]) - float(base_alpha_bar[-1])) ** 2
    return float(cpe), float(cpe) + pen


# --- smooth phase -----------------------------------------------------------------------------------------------
def smooth(prob: SearchProblem, y: np.ndarray, f: float, lo: np.ndarray | None = None,
           hi: np.ndarray | None = None, ftol: float = SMOOTH_FTOL) -> tuple[np.ndarray, float]:
    """L-BFGS-B on the box ``[lo, hi]`` (default the trust box; projected gradient when pinned in ``alpha`` trust) to
    the relative tolerance ``ftol``; the result is restored into the feasible set and kept only if it improves."""
    lo = prob.lo if lo is None else lo
    hi = prob.hi if hi is None else hi
    if prob.alpha and prob.pinned:
        x = _spg(prob, y, lo, hi)
    else:
        def stop_when_expired(xk: np.ndarray) -> None:
            if prob.expired():
                raise StopIteration  # (scipy >= 1.11 ends the search with the point reached)

        try:
            r = minimize(prob.value_and_grad, y, jac=True, method="L-BFGS-B", bounds=list(zip(lo, hi, strict=True)),
                         callback=None if prob.deadline.at is None else stop_when_expired,
                         options={"maxiter": 2000, "maxcor": 10, "ftol": ftol, "gtol": 1e-14})
            end = r.x
        except StopIteration:  # (older scipy lets it out: keep the start)
            end = y
        x = np.clip(prob.feasible(end), lo, hi)
    fx = prob.loss(x)
    return (x, fx) if fx < f else (y, f)


def _spg(prob: SearchProblem, y: np.ndarray, lo: np.ndarray, hi: np.ndarray, iters: int = 300,
         window: int = 20) -> np.ndarray:
    """Spectral projected gradient (Birgin, Martínez & Raydan 2000) for the pinned ``alpha`` trust region (box
    ``[lo, hi]``); stops when ``window`` iterations gain less than the tolerance (kinks make exact stationarity
    unreachable)."""

    def project(v: np.ndarray) -> np.ndarray:
        return prob.vars.project_pinned(v, lo=lo, hi=hi)

    f, g = prob.value_and_grad(y)
    step, hist = 1.0 / max(float(np.abs(g).max()), 1e-300), [f]
    for _ in range(iters):
        if prob.expired():
            break
        d = project(y - step * g) - y
        if float(np.abs(d).max()) <= 1e-15:
            break
        gd, t = float(g @ d), 1.0
        while True:
            fn, gn = prob.value_and_grad(y + t * d)
            if fn <= max(hist[-10:]) + 1e-4 * t * gd or t < 1e-10:
                break
            t *= 0.5
        if not fn < math.inf or t < 1e-10:
            break
        s_, dg = t * d, gn - g
        sy = float(s_ @ dg)
        step = float(np.clip(s_ @ s_ / sy, 1e-12, 1e12)) if sy > 0 else 1e12
        y, f, g = y + s_, fn, gn
        hist.append(f)
        if len(hist) > window and min(hist[-window:]) > min(hist[:-window]) - 1e-12 * abs(f):
            break
    return project(y)


# --- searches ---------------------------------------------------------------------------------------------------
def local_search(prob: SearchProblem, y: np.ndarray, f: float | None = None) -> tuple[np.ndarray, float, int]:
    """Rounds of :func:`smooth` and :func:`~.chain.refine` from ``y``; a later round runs while its smooth phase
    gains more than ``tol`` (relative), refining from the scale of that move, up to ``max_rounds`` rounds.
    Returns ``(y, loss, rounds)``."""
    y = prob.feasible(y)
    f = prob.loss(y) if f is None else f
    y, f = smooth(prob, y, f)
    y, f, _ = refine(prob, y, f)
    rounds = 1
    while rounds < prob.s.max_rounds and not prob.expired():
        ys, fs = smooth(prob, y, f)
        if not fs < f - prob.s.tol * max(1.0, abs(f)):
            break
        move = float(np.max(np.abs(ys - y)))
        y, f, _ = refine(prob, ys, fs, h0=2 * move)
        rounds += 1
    return y, f, rounds


def paper_search(prob: SearchProblem) -> tuple[np.ndarray, float, int]:
    """:func:`local_search` from the base and, with ``global_grid > 0``, from :func:`~.chain.global_start`: that
    start is first refined coarsely (:data:`SCOUT_PASSES` passes) and searched fully only when it is already better.
    Returns the best ``(y, loss, rounds)``."""
    y, f, rounds = local_search(prob, prob.y0.copy())
    if prob.s.global_grid > 0 and not prob.expired():
        yg = global_start(prob, prob.s.global_grid)
        yg, fg, _ = refine(prob, yg, prob.loss(yg), resolution=SCOUT_RESOLUTION, max_passes=SCOUT_PASSES)
        if fg < f:
            yg, fg, more = local_search(prob, yg, fg)
            rounds += more
            if fg < f:
                y, f = yg, fg
    return y, f, rounds


def scouted_search(exact: SearchProblem, starts: list[np.ndarray]) -> tuple[np.ndarray, float, int, int]:
    """Minimise an exact chain loss (:class:`~.groups.GroupedProblem`, :class:`~.windows.WindowProblem`) from
    ``starts`` (the base and the paper optimum; one point to resume from): scout each (the smooth phase, in the whole
    box and, from the best start, also within :data:`SCOUT_BOX` of it, then :data:`SCOUT_PASSES` coarse grid passes),
    then :func:`local_search` from the best scout. These losses are bumpy: which basin a search ends in depends on its
    first moves, and no one of these paths is best on every reference trajectory. Returns ``(y, loss, rounds,
    evaluations)``."""
    points = [exact.feasible(y) for y in starts]
    losses = [exact.loss(y) for y in points]
    order = np.argsort(losses, kind="stable")
    paths = [(order[0], None), (order[0], SCOUT_BOX)] + [(k, None) for k in order[1:]]
    best: tuple[np.ndarray, float] | None = None
    for k, frac in paths if len(points) > 1 else []:
        if exact.expired():
            break
        y, f, lo, hi = points[k], losses[k], exact.lo, exact.hi
        if frac is not None:
            lo, hi = np.maximum(lo, y - frac * (hi - lo)), np.minimum(hi, y + frac * (hi - lo))
        y, f = smooth(exact, y, f, lo, hi, SCOUT_FTOL)
        y, f, _ = refine(exact, y, f, resolution=SCOUT_RESOLUTION, max_passes=SCOUT_PASSES)
        best = (y, f) if best is None or f < best[1] else best
    y, f = best if best is not None else (points[order[0]], losses[order[0]])
    y, f, rounds = local_search(exact, y, f)
    return y, f, rounds, exact.evals


def _exact_chain(prob: SearchProblem) -> SearchProblem | None:
    """The solver-aware loss as an exact chain problem, for the solvers that have one (else ``None``)."""
    from .groups import GROUPED, GroupedProblem
    from .windows import LINEAR, MAX_VALUES, WindowProblem

    if prob.s.solver in GROUPED:
        return GroupedProblem(prob)
    return WindowProblem(prob) if prob.s.solver in LINEAR and prob.n <= MAX_VALUES else None


# --- driver -----------------------------------------------------------------------------------------------------
def _check_inputs(
    alpha_bar: Tensor, mse_fn: MSEFn, settings: OptimizeSettings | None
) -> tuple[Tensor, OptimizeSettings]:
    """The validated base (float64, CPU, a copy) and settings; raises ValueError naming the bad argument."""
    settings = settings or OptimizeSettings()
    if not isinstance(settings, OptimizeSettings):
        raise ValueError(f"settings must be an OptimizeSettings; got {type(settings).__name__}.")
    if not callable(mse_fn):
        raise ValueError(f"mse_fn must be a callable MSE(alpha_bar); got {type(mse_fn).__name__}.")
    ab0 = validate_trajectory(torch.as_tensor(alpha_bar).detach().cpu(), "alpha_bar").clone()
    with torch.no_grad():
        m = mse_fn(ab0)
    if not torch.is_tensor(m) or m.shape != ab0.shape or not bool(torch.isfinite(m).all()) or bool((m < 0).any()):
        raise ValueError("mse_fn must return finite values >= 0, one per alpha_bar value, on the base trajectory.")
    return ab0, settings


def _valid(ab: Tensor, settings: OptimizeSettings, ab0: Tensor) -> bool:
    """Strictly decreasing inside (0, 1), and inside ``alpha_bar_range`` where the base is."""
    if not is_trajectory(ab):
        return False
    rng = settings.alpha_bar_range
    if rng is None:
        return True
    slack = 1e-12
    return float(ab[0]) <= max(rng[1], float(ab0[0])) * (1 + slack) and float(ab[-1]) >= min(
        rng[0], float(ab0[-1])) * (1 - slack)


def optimize_trajectory(
    alpha_bar: Tensor, mse_fn: MSEFn, settings: OptimizeSettings | None = None, *, deadline: float | None = None,
    resume: Tensor | None = None,
) -> OptimizeResult:
    """Optimize a base trajectory (ᾱ, cleanest first) with the VRG objective; deterministic.

    Args:
        alpha_bar: base trajectory, strictly decreasing inside (0, 1).
        mse_fn: differentiable MSE(ᾱ) (e.g. ``ErrorProfile.mse_function(settings.mse_mode)``).
        settings: :class:`OptimizeSettings` (defaults: lp 0.01, λ 100, paper objective, alpha trust).
        deadline: a ``time.perf_counter()`` value: the search stops at its next check after it (between passes and
            iterations, tens of milliseconds at 100 steps) and returns the best point so far with ``complete=False``.
        resume: the trajectory of such a result (of this base): the search continues from it alone (the local
            search for the paper objective, the solver-aware descent otherwise) instead of starting over.

    Returns:
        :class:`OptimizeResult`; its loss is never above the base's.

    Raises:
        ValueError: invalid trajectory, an MSE function that is not finite and >= 0 on it, or steps the trust
            region cannot keep distinct.

    Example:
        >>> mse = lambda a: 0.1 + a
        >>> base = torch.tensor([0.9, 0.5, 0.1], dtype=torch.float64)
        >>> r = optimize_trajectory(base, mse, OptimizeSettings(lp=0.05))
        >>> r.loss < r.loss_before, bool((r.alpha_bar[1:] < r.alpha_bar[:-1]).all())
        (True, True)
    """
    ab0, settings = _check_inputs(alpha_bar, mse_fn, settings)
    start = time.perf_counter()
    cpe0, loss0 = trajectory_loss(ab0, ab0, mse_fn, settings)
    prob = SearchProblem(ab0, mse_fn, settings, Deadline(deadline))
    evals, aware = 0, solver_aware(settings)
    if resume is not None:
        y, rounds = _resume_point(prob, ab0, resume), 0
        if not aware:
            y, _, rounds = local_search(prob, y)
    else:
        y, _, rounds = paper_search(prob)
    if aware and not prob.expired():
        from .surrogate import solver_search

        starts = [y] if resume is not None else [prob.y0, y]
        exact = _exact_chain(prob)
        y, _, more, evals = solver_search(prob, starts) if exact is None else scouted_search(exact, starts)
        rounds += more
    ab = prob.alpha_bar(y)
    cpe1, loss1 = trajectory_loss(ab, ab0, mse_fn, settings)
    if not loss1 < loss0 or not _valid(ab, settings, ab0):
        ab, cpe1, loss1 = ab0.clone(), cpe0, loss0
    return OptimizeResult(alpha_bar=ab, base_alpha_bar=ab0, cpe_before=cpe0, cpe_after=cpe1, loss=loss1,
                          seconds=time.perf_counter() - start, settings=settings, iterations=rounds,
                          loss_before=loss0, evaluations=prob.evals + evals, complete=not prob.deadline.cut)


def _resume_point(prob: SearchProblem, ab0: Tensor, resume: Tensor) -> np.ndarray:
    """The variables of a ``resume`` trajectory, restored into the feasible set; ValueError when it is not one of
    the base's length."""
    ab = validate_trajectory(torch.as_tensor(resume).detach().cpu().to(torch.float64), "resume")
    if ab.numel() != ab0.numel():
        raise ValueError(f"resume must be a trajectory of the base's {ab0.numel()} steps; got {ab.numel()}.")
    return prob.feasible(prob.vars.from_alpha_bar(ab))


def optimize_with_profile(alpha_bar: Tensor, profile: Any, settings: OptimizeSettings | None = None, *,
                          deadline: float | None = None, resume: Tensor | None = None) -> OptimizeResult:
    """:func:`optimize_trajectory` with ``profile.mse_function(settings.mse_mode)`` as the MSE."""
    settings = settings or OptimizeSettings()
    return optimize_trajectory(alpha_bar, profile.mse_function(settings.mse_mode), settings, deadline=deadline,
                               resume=resume)
