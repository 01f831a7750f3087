"""The solver-aware objective of ``dpmpp_2m`` and ``deis`` (the other solvers' is an exact chain: :mod:`.groups`,
:mod:`.windows`) by a trust-region method with two models.

The exact objective is ``cpe_solver(ᾱ) + penalty`` (:func:`~vrg_lightning.variance.cpe_solver`: one run of the
solver code on a one-hot basis gives the weights of all model evaluations, ``Σ_e w_e² MSE(ℓ_e)``), evaluated with its
gradient in closed form for ``dpmpp_2m`` and ``deis`` (:mod:`.multistep`, the same numbers), else by autograd
(:class:`SolverObjective`). Every weight depends on several steps, smoothly; the MSE carries the
kinks. Each iteration minimises, inside the trust box and a radius around the current point ``c``, one of two models
that have the exact value and gradient at ``c`` (a linear part ``g_lin·(y - c)`` makes the gradients agree):

- the *chain model* (:meth:`SolverObjective.chain_model`): the paper terms, each weighted by
  ``r_i = Σ_{e at step i} w_e(c)² / (s_i - s_{i-1})²``, so the weights and kinks are exact at ``c``; being a chain
  loss it is minimised with the paper objective's machinery (:func:`~.search.smooth` and the grid refinement
  :func:`~.chain.refine`), which finds basins, kinks and joint moves. Its curvature is the paper loss's, corrected
  along the last step by a secant proximal weight ``μ``; successive steps along one direction are extrapolated.
- the *weight model* (:class:`WeightModel`): ``Σ_e (w_e(c) + J_e·(y - c))² MSE(ℓ_e(y))``, weights linear in the
  variables (``J`` by finite differences in the variables that can move, in one batched solver run; for long
  trajectories all columns at once, as an evaluation's weight depends on a band of steps only,
  :meth:`SolverObjective.jacobians`), the MSE exact at the evaluated levels (the trajectory's own values; ``pndm``'s
  midpoints linearised): Gauss-Newton curvature, minimised by the smooth
  phase; it converges on the smooth part.

The exact objective accepts or rejects each step; the search starts with the chain model, switches to the other
model whenever one stops gaining, and shrinks the radius when neither gains (it stops when the exact gradient leaves
no gain above ``tol`` inside the smaller radius; a weight model is not rebuilt close to where the last found no
step). For ``ddim``/``dpmsolver1`` the weights are ``s_{i-1} - s_i`` and the objective is the paper loss, which is
why those solvers never come here.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from scipy import sparse

from ..trajectories import is_trajectory
from ..variance import propagation
from .chain import OFFSETS, refine
from .multistep import MULTISTEP, MultistepProblem, multistep_weights
from .problem import SearchProblem

__all__ = ["ALIGNED", "SCOUT_ITERS", "SolverObjective", "WeightModel", "solver_search", "descend"]

ALIGNED = 0.9  # cosine of two successive chain steps above which the search extrapolates along the last one
SCOUT_ITERS = 3  # accepted steps (at most twice as many iterations) that scout the basin of a second start
COLORS = 10  # trajectory values perturbed together in a weight model's finite differences (solver runs per model)
BAND_BEFORE, BAND_AFTER = 4, 2  # an evaluation's weight depends on these many cleaner / noisier steps (tested)
FD_STEP, BAND_STEP = 1e-7, 1e-8  # finite-difference steps: of one variable (x its box width), of log ᾱ (banded)
SPARSE_FROM = 256  # trajectories of this many values keep a weight model's banded Jacobian sparse
NULL, NEAR = 1e-9, 1e-2  # a weight-model step below NULL x the box counts as none; it is not built again within
# NEAR x the box of where it found none
MODEL_FTOL, MODEL_RESOLUTION = 1e-10, 1e-10  # how precisely a model is minimised (it is only a model)


class SolverObjective:
    """The exact solver-aware loss of a problem's variables, its gradient, and the model at a point.

    Example:
        >>> from vrg_lightning.optimize import OptimizeSettings
        >>> ab = torch.tensor([0.9, 0.5, 0.1], dtype=torch.float64)
        >>> prob = SearchProblem(ab, lambda a: 0.1 + a, OptimizeSettings(objective="solver", solver="dpmpp_2m"))
        >>> exact = SolverObjective(prob)
        >>> f, g = exact.at(prob.y0)
        >>> model = exact.model(prob.y0, g)
        >>> round(f, 6), round(model.loss(prob.y0), 6), bool(np.allclose(model.value_and_grad(prob.y0)[1], g))
        (1.266667, 1.266667, True)
    """

    def __init__(self, prob: SearchProblem, closed_form: bool = True) -> None:
        self.prob, self.solver, self.calls = prob, prob.s.solver, 0
        # the closed form where there is one (the same numbers; ``closed_form=False``: the solver code by autograd)
        self.fast = MultistepProblem(prob) if closed_form and self.solver in MULTISTEP else None
        self._seen: tuple[bytes, np.ndarray, np.ndarray] | None = None

    def _trajectory(self, y: torch.Tensor) -> torch.Tensor:
        """The trajectory of ``y`` (or of each row of ``y [K, N]``), the pinned noisiest value exact."""
        p = self.prob
        ab = p.vars.alpha_bar(y)
        return torch.cat([ab[..., :-1], torch.full_like(ab[..., -1:], p.end)], -1) if p.pinned and p.alpha else ab

    def _trajectory_np(self, ys: np.ndarray) -> np.ndarray:
        """:meth:`_trajectory` of rows ``ys [K, N]`` in numpy."""
        p = self.prob
        ab = p.vars.alpha_bar_np(ys)
        if p.pinned and p.alpha:
            ab[:, -1] = p.end
        return ab

    def _run(self, ab: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(weights, levels)`` ``[K, M]`` of trajectories ``ab [K, N]``: the closed form where there is one, else
        one batched :func:`~vrg_lightning.variance.propagation`."""
        self.calls += 1
        if self.fast is not None:
            with np.errstate(all="ignore"):
                return multistep_weights(self.solver, ab), ab
        with torch.no_grad():
            prop = propagation(self.solver, torch.as_tensor(ab))
        return prop.weights.numpy(), prop.alpha_bar.numpy()

    def _loss(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """``(loss, trajectory, propagation)`` at ``y`` (``None`` where the trajectory is not valid)."""
        p = self.prob
        self.calls += 1
        ab = self._trajectory(y)
        if not is_trajectory(ab):
            return None
        prop = propagation(self.solver, ab)
        loss = (prop.weights**2 * p.mse_fn(prop.alpha_bar)).sum()
        if p.penalty:
            loss = loss + p.penalty * (ab[-1] - p.end) ** 2
        self._seen = (y.detach().numpy().tobytes(), prop.weights.detach().numpy(), prop.alpha_bar.detach().numpy())
        return loss, ab, prop

    def at(self, y: np.ndarray) -> tuple[float, np.ndarray]:
        """``(loss, d loss/dy)`` at ``y`` (``inf`` where the trajectory is not valid)."""
        if self.fast is not None:
            self.calls += 1
            valid = is_trajectory(self._trajectory_np(y[None])[0])
            return self.fast.value_and_grad(y) if valid else (math.inf, np.zeros_like(y))
        yt = torch.tensor(y, dtype=torch.float64, requires_grad=True)
        with torch.enable_grad():
            out = self._loss(yt)
            if out is None:
                return math.inf, np.zeros_like(y)
            (grad,) = torch.autograd.grad(out[0], yt)
        f, g = float(out[0].detach()), grad.numpy()
        return (f, g) if math.isfinite(f) and np.isfinite(g).all() else (math.inf, np.zeros_like(y))

    def value(self, y: np.ndarray) -> float:
        """The loss at ``y`` without its gradient (``inf`` where the trajectory is not valid)."""
        if self.fast is not None:
            self.calls += 1
            return self.fast.loss(y) if is_trajectory(self._trajectory_np(y[None])[0]) else math.inf
        with torch.no_grad():
            out = self._loss(torch.as_tensor(y, dtype=torch.float64))
        f = math.inf if out is None else float(out[0])
        return f if math.isfinite(f) else math.inf

    def _weights(self, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(w_e, ᾱ_e)`` of every evaluation at ``y``, without gradients (the last evaluated point's are kept)."""
        if self._seen is not None and self._seen[0] == y.tobytes():
            return self._seen[1], self._seen[2]
        w, levels = self._run(self._trajectory_np(y[None]))
        return w[0], levels[0]

    def chain_model(self, y: np.ndarray, g: np.ndarray) -> SearchProblem:
        """The chain model at ``y``: the paper terms, each weighted by ``r_i = Σ_e w_e² / (s_i - s_{i-1})²`` over the
        evaluations at step ``i`` (the exact weights and kinks at ``y``), plus the linear part that makes its gradient
        ``g``. Its curvature is the paper loss's; the grid refinement finds the kinks and joint moves in it."""
        p = self.prob
        w, levels = self._weights(y)
        ab = p.vars.alpha_bar_np(y[None])[0]
        step = np.clip(np.searchsorted(-ab, -levels), 0, ab.size - 1)
        on = ab[step] == levels
        r = np.zeros(p.n)
        np.add.at(r, step[on], w[on] ** 2)
        s = np.sqrt((1 - ab) / ab)
        model = SearchProblem(p.ab0, p.mse_fn, p.s, p.deadline)
        model.term_weights = r / np.diff(s, prepend=0.0) ** 2
        model.lin, model.center = None, y.copy()
        model.lin = g - model.value_and_grad(y)[1]
        return model

    def banded(self, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(w, levels, dw/dlog ᾱ, dlevels/dlog ᾱ)`` at ``y``: the weights and levels of every evaluation and their
        Jacobians in log ᾱ of the trajectory values, by finite differences. An evaluation depends on the values from
        :data:`BAND_BEFORE` steps cleaner to :data:`BAND_AFTER` noisier than its own step only (exactly for all
        solvers but ``dpmpp_2m``, whose dependence on cleaner steps decays geometrically), so the values :data:`COLORS`
        steps apart are perturbed together: one batched run of ``min(N, COLORS)`` trajectories gives every column."""
        w, levels = self._weights(y)
        ab = self.prob.vars.alpha_bar_np(y[None])[0]
        step = np.clip(np.searchsorted(-ab, -levels), 0, ab.size - 1)  # the step of each evaluation
        gaps = -np.diff(np.log(ab))
        h = min(BAND_STEP, 0.1 * float(gaps.min())) if gaps.size else BAND_STEP
        colors = min(ab.size, COLORS)
        jz, jz_levels = np.zeros((w.size, ab.size)), np.zeros((w.size, ab.size))
        rows = np.arange(w.size)
        abk = np.repeat(ab[None], colors, 0)
        for r in range(colors):
            abk[r, r::colors] *= math.exp(-h)
        batch_w, batch_l = self._run(abk)  # all colours in one batched run
        for r in range(colors):
            prop_w, prop_l = batch_w[r], batch_l[r]
            if colors == ab.size:  # one value moved: its column, exactly
                col = np.full(w.size, r)
            else:  # the moved value in the band of each evaluation: BAND_AFTER noisier to colors - 1 - that cleaner
                col = step + BAND_AFTER - (step + BAND_AFTER - r) % colors
            ok = (col >= 0) & (col < ab.size)
            jz[rows[ok], col[ok]] = (prop_w - w)[ok] / -h
            jz_levels[rows[ok], col[ok]] = (prop_l - levels)[ok] / -h
        return w, levels, jz, jz_levels

    def jacobians(self, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(w, levels, dw/dy, dlevels/dy)``: :meth:`banded` in the variables (dense)."""
        w, levels, jz, jz_levels = self.banded(y)
        ab, to_y = self.prob.vars.alpha_bar_np(y[None])[0], self.prob.vars.chain_rule_log
        return w, levels, to_y(jz, ab), to_y(jz_levels, ab)

    def model(self, y: np.ndarray, g: np.ndarray) -> WeightModel:
        """The model at ``y`` whose gradient there is ``g`` (the exact gradient, from :meth:`at`). The Jacobians of
        the weights and levels are those of the variables that can move (inside the box, or on a bound with the
        gradient pointing inwards; the others held): differenced one variable at a time when they are at most
        :data:`COLORS`, else all at once in log ᾱ by :meth:`banded` (kept banded, sparse past :data:`SPARSE_FROM`
        values)."""
        p = self.prob
        free = ((y > p.lo) | (g < 0)) & ((y < p.hi) | (g > 0))
        if p.pinned:
            free[-1] = False
        cols = np.flatnonzero(free)
        in_log = cols.size > COLORS
        if in_log:
            w, levels, jac, jac_levels = self.banded(y)
            if y.size >= SPARSE_FROM:
                jac, jac_levels = sparse.csr_matrix(jac), sparse.csr_matrix(jac_levels)
        else:  # as few columns as colours: each differenced alone, in its own variable
            w, levels = self._weights(y)
            jac, jac_levels = np.zeros((w.size, y.size)), np.zeros((w.size, y.size))
            width = p.hi - p.lo
            steps = FD_STEP * np.maximum(width[cols], 1e-300) * np.where(y[cols] - p.lo[cols] < 0.5 * width[cols],
                                                                          1.0, -1.0)
            if cols.size:  # every column in one batched run
                ys = np.repeat(y[None], cols.size, 0)
                ys[np.arange(cols.size), cols] += steps
                batch_w, batch_l = self._run(self._trajectory_np(ys))
                jac[:, cols] = (batch_w - w).T / steps
                jac_levels[:, cols] = (batch_l - levels).T / steps
        ab = p.vars.alpha_bar_np(y[None])[0]
        step = np.clip(np.searchsorted(-ab, -levels), 0, ab.size - 1)
        model = WeightModel(p, w, jac, y.copy(), step, ab[step] == levels, levels, jac_levels, free, in_log)
        model.lin = g - model.value_and_grad(y)[1]
        return model


class WeightModel(SearchProblem):
    """The model of :mod:`this module <.surrogate>` in the variables of a problem (the same box, start and penalty;
    ``lin``: its linear part in ``y - center``). Weights are linear in the moves of the variables that can move
    (``free``; the others held): ``w + J·T(y - center)``, with ``T`` the identity or, for a Jacobian in log ᾱ
    (``in_log``), the move of log ᾱ (a cumulative sum in ``alpha`` trust, ``(1 - ᾱ) dλ`` in ``logsnr``); ``J``
    dense or sparse. An evaluation on the trajectory (``on``) takes the MSE at its step's ᾱ, the others at their level
    linearised the same way."""

    def __init__(self, prob: SearchProblem, w: np.ndarray, jac: Any, center: np.ndarray, step: np.ndarray,
                 on: np.ndarray, levels: np.ndarray, jac_levels: Any, free: np.ndarray, in_log: bool = False) -> None:
        super().__init__(prob.ab0, prob.mse_fn, prob.s, prob.deadline)  # (its searches stop with the problem's)
        self.w, self.jac, self.center, self.step, self.on = w, jac, center, step, on
        self.levels, self.jac_levels, self.free, self.in_log = levels, jac_levels, free, in_log
        self.all_on = bool(on.all())
        self.ab_center = self.vars.alpha_bar_np(center[None])[0]

    def _to(self, dy: np.ndarray) -> np.ndarray:
        """``T(dy)`` of moves ``[K, N]`` (held variables dropped)."""
        dy = dy * self.free
        return self.vars.log_alpha_step(dy, self.ab_center) if self.in_log else dy

    def _back(self, gv: np.ndarray) -> np.ndarray:
        """The adjoint of :meth:`_to`: a gradient in ``T``'s coordinates ``[K, N]`` to the variables."""
        if self.in_log:
            gv = self.vars.chain_rule_log(gv, self.ab_center)
        return gv * self.free

    def jacobian(self) -> np.ndarray:
        """The weights' Jacobian in the variables, dense ``[M, N]`` (zero columns for the held ones)."""
        return np.asarray(self.jac @ self._to(np.eye(self.n)).T)

    def rows(self, ys: np.ndarray, grad: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        ab = self.vars.alpha_bar_np(ys)
        self.evals += ys.shape[0]
        dy = ys - self.center
        dv = self._to(dy)
        w = self.w + (self.jac @ dv.T).T  # [K, M]
        lev = ab[:, self.step]
        if not self.all_on:
            lev = np.where(self.on, lev, self.levels + (self.jac_levels @ dv.T).T)
        m, dm = self.np_mse(lev)
        f = (w * w * m).sum(-1)
        if self.penalty:
            f = f + self.penalty * (ab[:, -1] - self.end) ** 2
        if self.lin is not None:
            f = f + dy @ self.lin
        if not grad:
            return f, None
        g_ab = np.zeros_like(ab)
        np.add.at(g_ab, (slice(None), self.step[self.on]), (w * w * dm)[:, self.on])
        if self.penalty:
            g_ab[:, -1] += 2 * self.penalty * (ab[:, -1] - self.end)
        gv = (self.jac.T @ (2 * w * m).T).T
        if not self.all_on:
            gv = gv + (self.jac_levels.T @ (w * w * dm * ~self.on).T).T
        gy = self.vars.chain_rule(g_ab, ab) + self._back(np.asarray(gv))
        return f, gy if self.lin is None else gy + self.lin


def solver_search(prob: SearchProblem, starts: list[np.ndarray]) -> tuple[np.ndarray, float, int, int]:
    """Minimise the solver-aware loss: :func:`descend` from the start with the lowest loss, then from each other
    start for :data:`SCOUT_ITERS` accepted steps, continued only when that is already better (the best start is not
    always in the best basin; the scouting finds the others cheaply).

    Args:
        prob: the paper problem of the base (its settings, trust box and MSE).
        starts: points in the box (the base and the paper optimum).

    Returns:
        ``(y, exact loss, iterations, exact evaluations)``, the last two summed over the starts.
    """
    exact = SolverObjective(prob)
    points = [prob.feasible(y) for y in starts]
    order = np.argsort([exact.value(y) for y in points], kind="stable")
    y, f, iters = descend(exact, points[order[0]])
    for k in order[1:]:
        if prob.expired():
            break
        ys, fs, it = descend(exact, points[k], 2 * SCOUT_ITERS, SCOUT_ITERS)
        iters += it
        if fs < f:
            ys, fs, it = descend(exact, ys)
            iters += it
            y, f = (ys, fs) if fs < f else (y, f)
    return y, f, iters, exact.calls


def descend(exact: SolverObjective, y: np.ndarray, max_iters: int | None = None,
            max_accepted: int | None = None) -> tuple[np.ndarray, float, int]:
    """The trust-region search from ``y``: steps of two models (module docstring), first the chain model with the
    grid refinement (it finds the basin, the kinks and joint moves; steps along one direction are extrapolated), then
    the weight model with the smooth phase (it converges on the smooth part), switching to the other model whenever
    one stops gaining; the radius shrinks when neither gains; at most ``max_iters`` (default ``max_rounds``)
    iterations and ``max_accepted`` accepted steps. Returns ``(y, exact loss, iterations)``."""
    from .search import smooth

    prob = exact.prob
    f, g = exact.at(y)
    radius: float | None = None
    weight_model: WeightModel | None = None
    tol, iters, use_chain, fails, tried, mu, accepted = prob.s.tol, 0, True, 0, 0.0, 0.0, 0
    last_chain: np.ndarray | None = None
    null_at: np.ndarray | None = None  # where the weight model last found no step
    scale = float(np.max(prob.hi - prob.lo))
    while iters < (prob.s.max_rounds if max_iters is None else max_iters) and math.isfinite(f) and not prob.expired():
        iters += 1
        lo, hi = prob.lo, prob.hi
        if radius is not None:
            lo, hi = np.maximum(lo, y - radius), np.minimum(hi, y + radius)
        if use_chain:
            model = exact.chain_model(y, g)
            fm = model.loss(y)
            model.mu = mu
            yn, fmn = smooth(model, y, fm, lo, hi, MODEL_FTOL) if radius is None else (y, fm)
            yn, fmn, _ = refine(model, yn, fmn, lo, hi, h0=None if radius is None else radius / OFFSETS,
                                resolution=MODEL_RESOLUTION)
        elif null_at is not None and float(np.max(np.abs(y - null_at))) <= NEAR * scale:
            yn, iters = y, iters - 1  # the weight model found no step close by: as if it found none here
        else:
            weight_model = weight_model or exact.model(y, g)
            yn, _ = smooth(weight_model, y, weight_model.loss(y), lo, hi, MODEL_FTOL)
            null_at = y.copy() if float(np.max(np.abs(yn - y))) <= NULL * scale else None
        d = yn - y
        step = float(np.max(np.abs(d)))
        fn = exact.value(yn) if step > 0 else math.inf
        tried = max(tried, step)
        if use_chain and step > 0 and math.isfinite(fn):  # secant curvature along d: exact minus model
            dd, gd = float(d @ d), float(g @ d)
            mu = max(0.0, (2 * (fn - f - gd) - (2 * (fmn - fm - gd) - mu * dd)) / dd)
        if fn < f:
            gain, accepted = f - fn, accepted + 1
            if use_chain:
                if last_chain is not None and float(d @ last_chain) > ALIGNED * math.sqrt(
                        float(d @ d) * float(last_chain @ last_chain)):
                    yn, fn = _extrapolate(exact, y, d, yn, fn)  # chain steps along one direction: go further
                last_chain = yn - y
            y, weight_model = yn, None
            f, g = exact.at(y)
            radius = None if radius is None else 2 * radius
            converged = gain <= tol * max(1.0, abs(f))  # this model is done here: try the other one
            fails = fails + 1 if converged else 0
            tried = tried if converged else 0.0  # a step that gained nothing does not end the search by its size
            use_chain = use_chain != converged
            if max_accepted is not None and accepted >= max_accepted:
                break
        else:
            fails += 1
            use_chain = not use_chain
        if fails >= 2:  # neither model gains at this radius: a smaller one, unless no gain above tol fits in it
            movable = ((y > prob.lo) | (g < 0)) & ((y < prob.hi) | (g > 0))
            if tried < 1e-13 or float(np.abs(g[movable]).sum()) * 0.25 * tried <= tol * max(1.0, abs(f)):
                break
            radius, fails, tried = 0.25 * tried, 0, 0.0
    return y, f, iters


def _extrapolate(exact: SolverObjective, y: np.ndarray, d: np.ndarray, yn: np.ndarray,
                 fn: float) -> tuple[np.ndarray, float]:
    """Points ``y + t·d``, t = 2, 4, 8, ... (restored into the feasible set) while the exact loss keeps falling;
    returns the best (``yn`` itself when none is better)."""
    best, t = (yn, fn), 2.0
    while t <= 1024:
        yt = exact.prob.feasible(y + t * d)
        ft = exact.value(yt)
        if not ft < best[1]:
            break
        best, t = (yt, ft), 2 * t
    return best
