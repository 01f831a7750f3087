"""The VRG trajectory optimizer: move each step of a base trajectory within a trust region to minimise
the cumulative prediction error (VRG paper, arXiv 2510.21792, Sec. 3)::

    loss = cpe(ᾱ) + λ_reg · (ᾱ_{N-1} - ᾱ_{N-1}^orig)²        (trajectory cleanest first)

The variables and the trust region (``alpha``, the paper's per-step ratio box, or ``logsnr``) are those of
:mod:`.variables`; ``pin_start=True`` holds the noisiest ᾱ exactly (the penalty is then 0).

Algorithm (deterministic, no random restarts), as short phases over one :class:`SearchProblem`:

1. Starts: the base, and the grid minimiser of the paper loss found by dynamic programming along the chain of steps
   (:func:`global_start`: the cpe sums terms of consecutive steps and the trust region constrains consecutive steps,
   so a Viterbi pass over a ``global_grid``-point grid per step is exact on the grid). This escapes the local minima
   of bumpy profiles.
2. From each start, rounds of (a) :func:`smooth`: L-BFGS-B on the box (spectral projected gradient when the start is
   pinned in ``alpha`` trust, a box plus one linear equality), and (b) :func:`polish`, kink-aware: with
   ``mse_mode="paper"`` the MSE is piecewise linear in ᾱ, so the loss has kinks where a step crosses a table row and
   gradient methods stall there. The polish minimises along block moves (one step; all steps from ``j`` on, i.e. one
   ``alpha_j``; every contiguous block for up to 24 steps) by evaluating the loss at every kink inside the trust
   region and inside every smooth piece between kinks, then zooming into the best (:func:`line_search`). Rounds stop
   when one gains less than ``tol`` (relative).
3. The best result is returned; it is never worse than the base.

The paper objective (and the solver objective of :data:`~vrg_lightning.variance.DDIM_LIKE` solvers, the same
formula) is evaluated with :func:`~vrg_lightning.variance.cpe_paper_numpy` (vectorised float64 numpy, analytic
gradient) when the MSE function has a numpy ``value_and_grad`` (the interpolants of
:mod:`vrg_lightning.interpolants`); other MSE callables and the solver-aware objective go through torch autograd
(:func:`~vrg_lightning.variance.cpe_paper` / :func:`~vrg_lightning.variance.cpe_solver`, one solver run per
trajectory, with a lighter polish). Kinks are read from the MSE function's ``knots`` (ᾱ values), if any.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch
from scipy.optimize import minimize
from torch import Tensor

from ..trajectories import validate_trajectory
from ..variance import DDIM_LIKE, MSEFn, cpe_paper, cpe_paper_numpy, cpe_solver, paper_term_numpy
from .settings import MSE_MODES, TRUSTS, OptimizeResult, OptimizeSettings  # noqa: F401
from .variables import Variables, trust_bounds

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
    "global_start",
    "polish",
]

_MAX_BLOCKS_ALL = 24  # try every contiguous block of steps up to this many steps
_MAX_KINKS = 256  # a polish line search looks at the kinks nearest to the current point, at most this many


# --- objective --------------------------------------------------------------------------------------------------
def _vectorised(settings: OptimizeSettings) -> bool:
    """Whether the objective is the paper formula (batched over trajectories) rather than one solver run each."""
    return settings.objective == "paper" or settings.solver in DDIM_LIKE


def _cpe_rows(alpha_bar: Tensor, mse_fn: MSEFn, settings: OptimizeSettings, exact: bool = True) -> Tensor:
    """cpe of each row of ``alpha_bar`` ``[K, N]``; ``exact=False`` lets the DDIM-like solver objective use the
    (identical) batched paper formula instead of one solver run per row."""
    if settings.objective == "paper" or not exact and settings.solver in DDIM_LIKE:
        return cpe_paper(alpha_bar, mse_fn)
    return torch.stack([cpe_solver(row, mse_fn, settings.solver) for row in alpha_bar.unbind(0)])


def trajectory_loss(
    alpha_bar: Tensor, base_alpha_bar: Tensor, mse_fn: MSEFn, settings: OptimizeSettings
) -> tuple[float, float]:
    """``(cpe, loss)`` of a trajectory against its base, as the optimizer scores it.

    Example:
        >>> ab = torch.tensor([0.9, 0.5], dtype=torch.float64)
        >>> cpe, loss = trajectory_loss(ab, ab, lambda a: torch.ones_like(a), OptimizeSettings())
        >>> round(cpe, 6), round(loss, 6)
        (0.555556, 0.555556)
    """
    ab = torch.as_tensor(alpha_bar, dtype=torch.float64).reshape(1, -1)
    cpe = _cpe_rows(ab, mse_fn, settings)
    pen = 0.0 if settings.pin_start else settings.reg_lambda * (ab[0, -1] - float(base_alpha_bar[-1])) ** 2
    return float(cpe[0]), float(cpe[0] + pen)


def _knots(mse_fn: MSEFn) -> np.ndarray:
    """The kinks of ``mse_fn`` inside (0, 1): its ``knots`` attribute (ᾱ values), if any."""
    k = np.asarray(getattr(mse_fn, "knots", []), dtype=np.float64)
    return np.unique(k[(k > 0) & (k < 1)])


class SearchProblem:
    """One optimisation: the base, the MSE, the settings, the :class:`~.variables.Variables` and the loss in them
    (numpy fast path or torch); counts loss evaluations in ``evals``."""

    def __init__(self, ab0: Tensor, mse_fn: MSEFn, settings: OptimizeSettings) -> None:
        self.ab0, self.mse_fn, self.s = ab0, mse_fn, settings
        self.n = ab0.numel()
        self.vars = v = Variables(ab0, settings)
        self.alpha, self.lo, self.hi, self.y0, self.log_end = v.alpha, v.lo, v.hi, v.y0, v.log_end
        self.pinned = settings.pin_start
        self.evals = 0
        # an objective without a vectorised form (solver-aware cpe, one solver run per trajectory) gets a lighter polish
        fast = _vectorised(settings)
        self.light = not fast
        self.zoom_rounds = 2 if self.light else 6
        self.np_mse = getattr(mse_fn, "value_and_grad", None) if fast else None
        self.knots_z = v.coords_of_alpha_bar(_knots(mse_fn))

    @property
    def penalty(self) -> float:
        """Weight of the start penalty in the loss (0 when pinned)."""
        return 0.0 if (self.pinned or self.s.reg_lambda == 0) else self.s.reg_lambda

    def loss_t(self, y: Tensor) -> Tensor:
        """Loss of each row of ``y`` in torch (differentiable)."""
        ab = self.vars.alpha_bar(y)
        self.evals += ab.shape[0] if ab.ndim > 1 else 1
        cpe = _cpe_rows(ab.reshape(-1, self.n), self.mse_fn, self.s, exact=False)
        if self.pinned or self.s.reg_lambda == 0:
            return cpe
        return cpe + self.s.reg_lambda * (ab.reshape(-1, self.n)[:, -1] - float(self.ab0[-1])) ** 2

    def _np_loss(self, ys: np.ndarray, grad: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """The paper loss of each row of ``ys`` ``[K, N]`` in numpy, and optionally its gradient in ``y``."""
        ab = self.vars.alpha_bar_np(ys)
        f, g = cpe_paper_numpy(ab, self.np_mse, grad=grad)  # type: ignore[arg-type]
        pen, end = self.penalty, float(self.ab0[-1])
        f = f + pen * (ab[:, -1] - end) ** 2
        self.evals += ys.shape[0]
        if not grad:
            return f, None
        g[:, -1] += 2 * pen * (ab[:, -1] - end)  # type: ignore[index]
        return f, self.vars.chain_rule(g, ab)  # type: ignore[arg-type]

    def window(self, ys: np.ndarray, a: int, b: int) -> np.ndarray:
        """The loss terms of steps ``a..b`` (and the penalty if ``b`` is the last step) of each row of ``ys``."""
        lo = max(a - 1, 0)
        ab = self.vars.alpha_bar_np(ys[:, : b + 1])[:, lo:] if self.alpha else self.vars.alpha_bar_np(ys[:, lo : b + 1])
        f = cpe_paper_numpy(ab, self.np_mse, window=a > 0)[0]  # type: ignore[arg-type]
        if b == self.n - 1 and not self.pinned:
            f = f + self.s.reg_lambda * (ab[:, -1] - float(self.ab0[-1])) ** 2
        self.evals += ys.shape[0]
        return f

    def losses(self, ys: np.ndarray) -> np.ndarray:
        """Loss of each row of ``ys`` ``[K, N]`` (``inf`` where not finite)."""
        if self.np_mse is not None:
            with np.errstate(all="ignore"):
                f = self._np_loss(ys, False)[0]
            return np.where(np.isfinite(f), f, np.inf)
        with torch.no_grad():
            f = self.loss_t(torch.as_tensor(ys, dtype=torch.float64)).numpy()
        return np.where(np.isfinite(f), f, np.inf)

    def value_and_grad(self, y: np.ndarray) -> tuple[float, np.ndarray]:
        """Loss and gradient at ``y`` (``inf`` and zeros where not finite)."""
        if self.np_mse is not None:
            with np.errstate(all="ignore"):
                f, g = self._np_loss(y[None], True)
            fv, gv = float(f[0]), g[0]  # type: ignore[index]
        else:
            yt = torch.tensor(y, dtype=torch.float64, requires_grad=True)
            ft = self.loss_t(yt)[0]
            (gt,) = torch.autograd.grad(ft, yt)
            fv, gv = float(ft.detach()), gt.numpy().copy()
        if not math.isfinite(fv) or not np.isfinite(gv).all():
            return math.inf, np.zeros_like(y)
        return fv, gv

    def mse_values(self, ab: np.ndarray) -> np.ndarray:
        """MSE at ᾱ values in numpy (the global start uses it for either objective)."""
        fn = getattr(self.mse_fn, "value_and_grad", None)
        if fn is not None:
            return fn(ab)[0]
        with torch.no_grad():
            return self.mse_fn(torch.as_tensor(ab, dtype=torch.float64)).numpy()


# --- smooth phase -----------------------------------------------------------------------------------------------
def smooth(prob: SearchProblem, y: np.ndarray, f: float) -> tuple[np.ndarray, float]:
    """L-BFGS-B on the box (projected gradient when pinned in ``alpha`` trust); keeps ``y`` unless it improves."""
    if prob.alpha and prob.pinned:
        x = _spg(prob, y, f)
    else:
        r = minimize(prob.value_and_grad, y, jac=True, method="L-BFGS-B",
                     bounds=list(zip(prob.lo, prob.hi, strict=True)),
                     options={"maxiter": 2000, "maxcor": 10, "ftol": 1e-12, "gtol": 1e-14})
        x = np.clip(r.x, prob.lo, prob.hi)
    fx = float(prob.losses(x[None])[0])
    return (x, fx) if fx < f else (y, f)


def _spg(prob: SearchProblem, y: np.ndarray, f: float, iters: int = 300, window: int = 20) -> np.ndarray:
    """Spectral projected gradient (Birgin, Martínez & Raydan 2000) for the pinned ``alpha`` trust region;
    stops when ``window`` iterations gain less than the tolerance (kinks make exact stationarity unreachable)."""
    project = prob.vars.project_pinned
    f, g = prob.value_and_grad(y)
    step, hist = 1.0 / max(float(np.abs(g).max()), 1e-300), [f]
    for _ in range(iters):
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


# --- global start (dynamic programming over a grid) -------------------------------------------------------------
def _grids(prob: SearchProblem, grid: int) -> list[np.ndarray]:
    """Each step's candidate ᾱ values: the base value plus points uniform in ᾱ and in log ᾱ over the reachable
    range (``alpha`` trust) or uniform in λ (``logsnr``)."""
    n, ab0 = prob.n, prob.ab0.numpy()
    if prob.alpha:
        za, zb = np.cumsum(prob.lo), np.cumsum(prob.hi)  # reachable log ᾱ ranges
        if prob.pinned:
            za = np.maximum(za, prob.log_end - np.concatenate([np.cumsum(prob.hi[::-1])[::-1][1:], [0.0]]))
            zb = np.minimum(zb, prob.log_end - np.concatenate([np.cumsum(prob.lo[::-1])[::-1][1:], [0.0]]))
        half = grid // 2
        grids = [np.unique(np.concatenate([[ab0[i]], np.linspace(np.exp(za[i]), np.exp(zb[i]), grid - half),
                                           np.exp(np.linspace(za[i], zb[i], half))])) for i in range(n)]
    else:
        lam = [np.linspace(prob.lo[i], prob.hi[i], grid) for i in range(n)]
        grids = [np.unique(np.concatenate([[ab0[i]], 1 / (1 + np.exp(-lam[i]))])) for i in range(n)]
    if prob.pinned:
        grids[-1] = ab0[-1:]
    return [g[(g > 0) & (g < 1)] for g in grids]


def global_start(prob: SearchProblem, grid: int) -> np.ndarray:
    """Grid minimiser of the *paper* loss by dynamic programming along the chain of steps.

    The paper cpe is a sum of terms over consecutive steps (:func:`~vrg_lightning.variance.paper_term_numpy`) and
    the trust region constrains consecutive steps, so a Viterbi pass over a grid of each step's ᾱ (:func:`_grids`)
    finds the grid's global minimum in ``O(N · grid²)``. A transition may miss the ratio box by half a grid spacing;
    the result is then clipped into it. It is a second starting point of the local phases (for either objective).
    """
    n, ab0 = prob.n, prob.ab0.numpy()
    grids = _grids(prob, grid)
    sig = [np.sqrt((1 - g) / g) for g in grids]
    mse = [prob.mse_values(g) for g in grids]
    value = paper_term_numpy(0.0, sig[0], mse[0])
    back = []
    with np.errstate(all="ignore"):
        for i in range(1, n):
            p, q = grids[i - 1][None, :], grids[i][:, None]
            cost = value[None, :] + paper_term_numpy(sig[i - 1][None, :], sig[i][:, None], mse[i][:, None])
            if prob.alpha:
                tol = np.diff(grids[i], prepend=grids[i][0], append=grids[i][-1])
                tol = np.maximum(tol[:-1], tol[1:])[:, None] / 2
                ok = (q >= p * np.exp(prob.lo[i]) - tol) & (q <= p * np.exp(prob.hi[i]) + tol)
                cost = np.where(ok, cost, np.inf)
            j = np.argmin(np.where(np.isfinite(cost), cost, np.inf), axis=1)
            back.append(j)
            value = cost[np.arange(q.shape[0]), j]
        if not prob.pinned:
            value = value + prob.s.reg_lambda * (grids[-1] - ab0[-1]) ** 2
    if not np.isfinite(value).any():
        return prob.y0.copy()
    idx = [int(np.argmin(value))]
    for i in range(n - 1, 0, -1):
        idx.append(int(back[i - 1][idx[-1]]))
    ab = np.array([grids[i][j] for i, j in enumerate(idx[::-1])])
    y = np.clip(prob.vars.from_alpha_bar_np(ab), prob.lo, prob.hi)
    return prob.vars.project_pinned(y) if (prob.alpha and prob.pinned) else y


# --- kink-aware polish ------------------------------------------------------------------------------------------
def _blocks(prob: SearchProblem) -> list[tuple[int, int]]:
    """The block moves ``(j, k)`` of a polish round (see the module docstring)."""
    n, last = prob.n, prob.n - 1
    small = n <= _MAX_BLOCKS_ALL and not prob.light
    if prob.alpha:
        top = last - 1 if prob.pinned else last
        if small:
            out = [(j, k) for j in range(n) for k in range(j, top + 1)]
        else:
            out = sorted({(i, i) for i in range(top + 1)} | {(j, top) for j in range(top + 1)})
        return [b for b in out if b[0] <= top]
    if small:
        return [(j, k) for j in range(n) for k in range(j, n)]
    return [(i, i) for i in range(n)] + [(j, n - 1) for j in range(1, n)]


def _move(prob: SearchProblem, y: np.ndarray, block: tuple[int, int], t: np.ndarray) -> np.ndarray:
    """``y`` moved by each ``t`` along a block: steps ``j..k`` shift by ``t`` in ``z``, the others stay."""
    j, k = block
    ys = np.repeat(y[None], t.size, 0)
    if prob.alpha:
        ys[:, j] += t
        if k + 1 < prob.n:
            ys[:, k + 1] -= t
    else:
        ys[:, j : k + 1] += t[:, None]
    return ys


def _range(prob: SearchProblem, y: np.ndarray, block: tuple[int, int]) -> tuple[float, float]:
    """The interval of ``t`` that keeps a block move inside the box."""
    j, k = block
    if prob.alpha:
        t_lo, t_hi = prob.lo[j] - y[j], prob.hi[j] - y[j]
        if k + 1 < prob.n:
            t_lo, t_hi = max(t_lo, y[k + 1] - prob.hi[k + 1]), min(t_hi, y[k + 1] - prob.lo[k + 1])
        return t_lo, t_hi
    return float(np.max(prob.lo[j : k + 1] - y[j : k + 1])), float(np.min(prob.hi[j : k + 1] - y[j : k + 1]))


def line_search(prob: SearchProblem, y: np.ndarray, f: float, block: tuple[int, int]) -> tuple[np.ndarray, float]:
    """Minimise along one block move: the loss at every kink and, in every smooth piece between kinks, at three
    interior points and at the vertex of the parabola through them; the best piece is then zoomed into."""
    t_lo, t_hi = _range(prob, y, block)
    if not t_hi - t_lo > 1e-15:
        return y, f
    zb = prob.vars.coords(y)[block[0] : block[1] + 1]
    kinks = (prob.knots_z[None, :] - zb[:, None]).ravel()
    kinks = kinks[(kinks > t_lo) & (kinks < t_hi)]
    if kinks.size > (cap := 12 if prob.light else _MAX_KINKS):  # the kinks nearest to the current point
        kinks = kinks[np.argsort(np.abs(kinks), kind="stable")[:cap]]
    br = np.unique(np.concatenate([[t_lo, 0.0, t_hi], kinks, np.linspace(t_lo, t_hi, 5)]))
    w = br[1:] - br[:-1]
    window = (block[0], min(block[1] + 1, prob.n - 1))  # the only terms a block move changes
    if prob.np_mse is not None:
        offset = f - float(prob.window(y[None], *window)[0])

        def along(t: np.ndarray) -> np.ndarray:
            with np.errstate(all="ignore"):
                v = offset + prob.window(_move(prob, y, block, t), *window)
            return np.where(np.isfinite(v), v, np.inf)
    else:

        def along(t: np.ndarray) -> np.ndarray:
            return prob.losses(_move(prob, y, block, t))

    if prob.light:
        cand = np.concatenate([br, br[:-1] + w / 2])
        allv = along(cand)
    else:
        inner = br[:-1, None] + w[:, None] * np.array([0.25, 0.5, 0.75])
        vals = along(np.concatenate([br, inner.ravel()]))
        fb, fi = vals[: br.size], vals[br.size :].reshape(-1, 3)
        # vertex of the parabola through the three interior points of each piece (inside the piece)
        curv = fi[:, 0] - 2 * fi[:, 1] + fi[:, 2]
        with np.errstate(all="ignore"):
            tv = inner[:, 1] + 0.25 * w * (fi[:, 0] - fi[:, 2]) / (2 * curv)
        tv = np.where(curv > 0, np.clip(tv, br[:-1], br[1:]), inner[:, 1])
        cand = np.concatenate([br, inner.ravel(), tv])
        allv = np.concatenate([fb, fi.ravel(), along(tv)])
    k = int(np.argmin(allv))
    best_t, best_f = float(cand[k]), float(allv[k])
    # zoom into the neighbourhood of the best point with a batched grid (the piece is smooth or kinked there)
    b = int(np.searchsorted(br, best_t))
    a_, c_ = br[max(b - 1, 0)], br[min(b + 1, br.size - 1)]
    for _ in range(prob.zoom_rounds):
        half = (c_ - a_) / 2
        grid = np.linspace(max(a_, best_t - half), min(c_, best_t + half), 9 if prob.light else 17)
        gv = along(grid)
        i = int(np.argmin(gv))
        if gv[i] < best_f:
            best_t, best_f = float(grid[i]), float(gv[i])
        a_, c_ = grid[max(i - 1, 0)], grid[min(i + 1, grid.size - 1)]
        if c_ - a_ <= 1e-15 * (1 + abs(best_t)):
            break
    if best_f < f:  # confirm with the full loss (the window sum differs from it by rounding)
        y_new = _move(prob, y, block, np.array([best_t]))[0]
        f_new = float(prob.losses(y_new[None])[0])
        if f_new < f:
            return y_new, f_new
    return y, f


def polish(prob: SearchProblem, y: np.ndarray, f: float) -> tuple[np.ndarray, float]:
    """One round of :func:`line_search` over every block move."""
    for block in _blocks(prob):
        y, f = line_search(prob, y, f, block)
    return y, f


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


def optimize_trajectory(
    alpha_bar: Tensor, mse_fn: MSEFn, settings: OptimizeSettings | None = None
) -> OptimizeResult:
    """Optimize a base trajectory (ᾱ, cleanest first) with the VRG objective; deterministic.

    Args:
        alpha_bar: base trajectory, strictly decreasing inside (0, 1).
        mse_fn: differentiable MSE(ᾱ) (e.g. ``ErrorProfile.mse_function(settings.mse_mode)``).
        settings: :class:`OptimizeSettings` (defaults: lp 0.01, λ 100, paper objective, alpha trust).

    Returns:
        :class:`OptimizeResult`; its loss is never above the base's.

    Raises:
        ValueError: invalid trajectory, or an MSE function that is not finite and >= 0 on it.

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
    prob = SearchProblem(ab0, mse_fn, settings)
    rounds = 0
    best_y, best_f = prob.y0.copy(), float(prob.losses(prob.y0[None])[0])
    starts = [prob.y0.copy()]
    if settings.global_grid > 0:
        starts.append(global_start(prob, settings.global_grid))
    max_rounds = min(settings.max_rounds, 3) if prob.light else settings.max_rounds
    for y in starts:
        f = float(prob.losses(y[None])[0])
        for _ in range(max_rounds):
            f_start = f
            y, f = smooth(prob, y, f)
            y, f = polish(prob, y, f)
            rounds += 1
            if not f < f_start - settings.tol * max(1.0, abs(f_start)):
                break
        if f < best_f:
            best_y, best_f = y, f
    with torch.no_grad():
        ab = prob.vars.alpha_bar(torch.as_tensor(best_y, dtype=torch.float64))
    if settings.pin_start:
        ab[-1] = ab0[-1]
    cpe1, loss1 = trajectory_loss(ab, ab0, mse_fn, settings)
    if not loss1 < loss0 or not bool((ab[1:] < ab[:-1]).all()) or not bool(((ab > 0) & (ab < 1)).all()):
        ab, cpe1, loss1 = ab0.clone(), cpe0, loss0
    return OptimizeResult(alpha_bar=ab, base_alpha_bar=ab0, cpe_before=cpe0, cpe_after=cpe1, loss=loss1,
                          seconds=time.perf_counter() - start, settings=settings, iterations=rounds,
                          loss_before=loss0, evaluations=prob.evals)


def optimize_with_profile(alpha_bar: Tensor, profile: Any, settings: OptimizeSettings | None = None) -> OptimizeResult:
    """:func:`optimize_trajectory` with ``profile.mse_function(settings.mse_mode)`` as the MSE."""
    settings = settings or OptimizeSettings()
    return optimize_trajectory(alpha_bar, profile.mse_function(settings.mse_mode), settings)
