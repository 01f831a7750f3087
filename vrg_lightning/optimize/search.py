"""The VRG trajectory optimizer: move each step of a base trajectory within a trust region to minimise
the cumulative prediction error (VRG paper, arXiv 2510.21792, Sec. 3)::

    loss = cpe(ᾱ) + λ_reg · (ᾱ_{N-1} - ᾱ_{N-1}^orig)²        (trajectory cleanest first)

==============  =====================================  ===============================================
name            paper / reference code                 meaning
==============  =====================================  ===============================================
``alpha_bar``   ``ab_i``                               trajectory, strictly decreasing, inside (0, 1)
``alpha``       ``alpha_i = ab_i / ab_{i-1}``           per-step factor, ``alpha_0 = ab_0``
``lp``          learning portion                       trust-region size
``reg_lambda``  regularizer λ                          weight of the penalty holding the noisiest ᾱ
==============  =====================================  ===============================================

Trust regions (``trust``):

- ``"alpha"`` (the paper): ``alpha_i ∈ [alpha_i^o - d_i, alpha_i^o + d_i]``,
  ``d_i = min(lp, alpha_i^o, 1 - alpha_i^o)``.
- ``"logsnr"``: ``λ_i = logSNR(ᾱ_i) ∈ [λ_i^o - δ_i, λ_i^o + δ_i]``, ``δ_i = lp/2 ·`` (distance in λ to the nearest
  neighbouring step; ``lp/2`` nats for a single step). As ``lp < 1`` the intervals never overlap, so the order of the
  steps is preserved whatever the optimizer does.

Bounds that would reach ᾱ-ratio 0 or 1 are kept inside by a relative ``1e-6`` of the distance, so the result is
always strictly decreasing inside (0, 1). ``pin_start=True`` holds the noisiest ᾱ exactly (the penalty is then 0).

Algorithm (deterministic, no random restarts):

1. Starts: the base, and the grid minimiser of the paper loss found by dynamic programming along the chain of steps
   (the cpe sums terms of consecutive steps and the trust region constrains consecutive steps, so a Viterbi pass over
   a ``global_grid``-point grid per step is exact on the grid). This escapes the local minima of bumpy profiles.
2. From each start, rounds of (a) a smooth phase: L-BFGS-B on the box (spectral projected gradient when the start is
   pinned in ``alpha`` trust, a box plus one linear equality), and (b) a kink-aware polish: with ``mse_mode="paper"``
   the MSE is piecewise linear in ᾱ, so the loss has kinks where a step crosses a table row and gradient methods
   stall there. The polish minimises along block moves (one step; all steps from ``j`` on, i.e. one ``alpha_j``;
   every contiguous block for up to 24 steps) by evaluating the loss at every kink inside the trust region and
   inside every smooth piece between kinks, then zooming into the best. Rounds stop when one gains less than
   ``tol`` (relative).
3. The best result is returned; it is never worse than the base.

The paper objective (and the solver objective of ``ddim``/``dpmsolver1``, the same formula) is evaluated in
vectorised float64 numpy with an analytic gradient for the table (``paper``) and PCHIP (``fit``) MSE functions; other
MSE callables and the solver-aware objective go through torch autograd (one solver run per trajectory, with a
lighter polish).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from scipy.optimize import minimize
from torch import Tensor

from ..schedule import alpha_bar_to_lambda, alpha_bar_to_sigma
from ..trajectories import validate_trajectory
from ..variance import cpe_solver
from .settings import MSE_MODES, TRUSTS, OptimizeResult, OptimizeSettings  # noqa: F401

__all__ = [
    "TRUSTS",
    "MSE_MODES",
    "OptimizeSettings",
    "OptimizeResult",
    "optimize_trajectory",
    "optimize_with_profile",
    "trust_bounds",
    "trajectory_loss",
]

_EDGE = 1e-6  # bounds touching 0 or 1 stay inside by this fraction of the distance
_MAX_BLOCKS_ALL = 24  # try every contiguous block of steps up to this many steps
_MAX_KINKS = 256  # a polish line search looks at the kinks nearest to the current point, at most this many

MSEFn = Callable[[Tensor], Tensor]


# --- objective --------------------------------------------------------------------------------------------------
_DDIM_LIKE = ("ddim", "dpmsolver1")  # their solver-aware cpe is the paper's formula (tested in test_variance)


def _vectorised(settings: OptimizeSettings) -> bool:
    return settings.objective == "paper" or settings.solver in _DDIM_LIKE


def _cpe_batch(alpha_bar: Tensor, mse_fn: MSEFn, settings: OptimizeSettings, exact: bool = True) -> Tensor:
    """cpe of each row of ``alpha_bar`` (``[K, N]``, cleanest first); ``exact=False`` lets the ddim-like solver
    objective use the (identical) batched paper formula instead of one solver run per row."""
    if settings.objective == "paper" or not exact and settings.solver in _DDIM_LIKE:  # variance.cpe_paper, row-wise
        s = alpha_bar_to_sigma(alpha_bar)
        ds = torch.diff(s, dim=-1, prepend=torch.zeros_like(s[..., :1]))
        return (ds**2 * mse_fn(alpha_bar)).sum(-1)
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
    cpe = _cpe_batch(ab, mse_fn, settings)
    pen = 0.0 if settings.pin_start else settings.reg_lambda * (ab[0, -1] - float(base_alpha_bar[-1])) ** 2
    return float(cpe[0]), float(cpe[0] + pen)


def _knots(mse_fn: MSEFn) -> np.ndarray:
    """ᾱ values where ``mse_fn`` has a kink, inside (0, 1): every row of a piecewise-linear table, only the two ends
    of a PCHIP fit (C¹ inside, constant beyond), an optional ``knots`` attribute of other callables."""
    from ..profile import PchipLogMSE, PiecewiseLinearMSE

    if isinstance(mse_fn, PiecewiseLinearMSE):
        k = mse_fn.alpha_bar.numpy()
    elif isinstance(mse_fn, PchipLogMSE):
        k = torch.sigmoid(mse_fn.lam[[0, -1]]).numpy()
    else:
        k = np.asarray(getattr(mse_fn, "knots", []), dtype=np.float64)
    return np.unique(k[(k > 0) & (k < 1)])


def _numpy_mse(mse_fn: MSEFn) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]] | None:
    """Same function as ``mse_fn`` in numpy, returning ``(MSE, dMSE/dᾱ)``, for the known interpolants; else None."""
    from ..profile import PchipLogMSE, PiecewiseLinearMSE

    if isinstance(mse_fn, PiecewiseLinearMSE) and mse_fn.alpha_bar.numel() >= 2:
        xp, fp = mse_fn.alpha_bar.numpy(), mse_fn.mse.numpy()
        width = np.diff(xp)  # zero-width segments (duplicate rows) take the left value, as PiecewiseLinearMSE
        slopes = np.concatenate([[0.0], np.where(width > 0, np.diff(fp) / np.where(width > 0, width, 1.0), 0.0)])

        def linear(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            xc = np.clip(x, xp[0], xp[-1])
            i = np.clip(np.searchsorted(xp, xc), 1, xp.size - 1)
            return fp[i - 1] + (xc - xp[i - 1]) * slopes[i], np.where(xc == x, slopes[i], 0.0)

        return linear
    if isinstance(mse_fn, PchipLogMSE) and mse_fn.lam.numel() >= 2:
        xp, yp, dp = mse_fn.lam.numpy(), mse_fn.log_mse.numpy(), mse_fn.slopes.numpy()

        def pchip(ab: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            lam = np.log(ab) - np.log1p(-ab)
            x = np.clip(lam, xp[0], xp[-1])
            i = np.clip(np.searchsorted(xp, x), 1, xp.size - 1)
            h = xp[i] - xp[i - 1]
            u = (x - xp[i - 1]) / h
            h00, h10, h01, h11 = (1 + 2 * u) * (1 - u) ** 2, u * (1 - u) ** 2, u**2 * (3 - 2 * u), u**2 * (u - 1)
            d00, d10, d01, d11 = 6 * u**2 - 6 * u, 3 * u**2 - 4 * u + 1, 6 * u - 6 * u**2, 3 * u**2 - 2 * u
            y0, y1, m0, m1 = yp[i - 1], yp[i], h * dp[i - 1], h * dp[i]
            v = np.exp(h00 * y0 + h10 * m0 + h01 * y1 + h11 * m1)
            dv_dlam = v * (d00 * y0 + d10 * m0 + d01 * y1 + d11 * m1) / h
            return v, np.where(x == lam, dv_dlam / (ab * (1 - ab)), 0.0)

        return pchip
    return None


# --- trust region -----------------------------------------------------------------------------------------------
def trust_bounds(alpha_bar: Tensor, settings: OptimizeSettings) -> tuple[np.ndarray, np.ndarray]:
    """Box of the optimizer's variables: per-step ratios α_i (``trust="alpha"``) or λ_i (``"logsnr"``).

    Example:
        >>> lo, hi = trust_bounds(torch.tensor([0.9, 0.45], dtype=torch.float64), OptimizeSettings(lp=0.05))
        >>> [round(float(v), 6) for v in lo], [round(float(v), 6) for v in hi]
        ([0.85, 0.45], [0.95, 0.55])
    """
    ab = validate_trajectory(alpha_bar).numpy()
    lp = settings.lp
    if settings.trust == "alpha":
        a0 = ab / np.concatenate([[1.0], ab[:-1]])
        d = np.minimum(lp, np.minimum(a0, 1 - a0))
        lo, hi = a0 - d, a0 + d
        lo = np.where(lo <= 0, a0 * _EDGE, lo)
        hi = np.where(hi >= 1, 1 - (1 - a0) * _EDGE, hi)
        return np.minimum(lo, a0), np.maximum(np.where(hi >= 1, a0, hi), a0)
    lam = alpha_bar_to_lambda(torch.as_tensor(ab)).numpy()
    gaps = np.full(lam.size, np.inf)
    if lam.size > 1:
        g = lam[:-1] - lam[1:]
        gaps[:-1] = np.minimum(gaps[:-1], g)
        gaps[1:] = np.minimum(gaps[1:], g)
    else:
        gaps[:] = 1.0
    delta = lp / 2 * gaps
    if settings.pin_start:
        delta[-1] = 0.0
    return lam - delta, lam + delta


class _Problem:
    """Variables ``y`` (log α for ``alpha`` trust, λ for ``logsnr``), coordinates ``z`` (log ᾱ or λ) and the loss."""

    def __init__(self, ab0: Tensor, mse_fn: MSEFn, settings: OptimizeSettings) -> None:
        self.ab0, self.mse_fn, self.s = ab0, mse_fn, settings
        self.n = ab0.numel()
        self.alpha = settings.trust == "alpha"
        lo, hi = trust_bounds(ab0, settings)
        if self.alpha:
            self.lo, self.hi = np.log(lo), np.log(hi)
            self.y0 = np.log((ab0 / torch.cat([ab0.new_ones(1), ab0[:-1]])).numpy())
            self.log_end = math.log(float(ab0[-1]))
        else:
            self.lo, self.hi = lo, hi
            self.y0 = alpha_bar_to_lambda(ab0).numpy()
        self.y0 = np.clip(self.y0, self.lo, self.hi)
        self.pinned = settings.pin_start
        self.evals = 0
        # an objective without a vectorised form (solver-aware cpe, one solver run per trajectory) gets a lighter polish
        fast = _vectorised(settings)
        self.light = not fast
        self.zoom_rounds = 2 if self.light else 6
        knots = _knots(mse_fn)
        self.np_mse = _numpy_mse(mse_fn) if fast else None
        self.knots_z = np.log(knots) if self.alpha else np.log(knots) - np.log1p(-knots)

    def z(self, y: np.ndarray) -> np.ndarray:
        return np.cumsum(y, axis=-1) if self.alpha else y

    def ab(self, y: Tensor) -> Tensor:
        return torch.exp(torch.cumsum(y, -1)) if self.alpha else torch.sigmoid(y)

    def loss_t(self, y: Tensor) -> Tensor:
        ab = self.ab(y)
        self.evals += ab.shape[0] if ab.ndim > 1 else 1
        cpe = _cpe_batch(ab.reshape(-1, self.n), self.mse_fn, self.s, exact=False)
        if self.pinned or self.s.reg_lambda == 0:
            return cpe
        return cpe + self.s.reg_lambda * (ab.reshape(-1, self.n)[:, -1] - float(self.ab0[-1])) ** 2

    def _np_ab(self, ys: np.ndarray) -> np.ndarray:
        return np.exp(np.cumsum(ys, -1)) if self.alpha else 1 / (1 + np.exp(-ys))

    def _np_loss(self, ys: np.ndarray, grad: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """The paper loss of each row of ``ys`` ``[K, N]`` in numpy, and optionally its gradient (same formula as
        :func:`vrg_lightning.variance.cpe_paper`, checked against it in the tests)."""
        ab = self._np_ab(ys)
        s = np.sqrt((1 - ab) / ab)
        ds = np.diff(s, axis=-1, prepend=0.0)
        m, dm = self.np_mse(ab)  # type: ignore[misc]
        f = (ds**2 * m).sum(-1)
        pen = 0.0 if (self.pinned or self.s.reg_lambda == 0) else self.s.reg_lambda
        end = float(self.ab0[-1])
        f = f + pen * (ab[:, -1] - end) ** 2
        self.evals += ys.shape[0]
        if not grad:
            return f, None
        ds_dab = -0.5 / (s * ab * ab)
        g = 2 * ds * ds_dab * m + ds**2 * dm
        g[:, :-1] -= 2 * ds[:, 1:] * ds_dab[:, :-1] * m[:, 1:]
        g[:, -1] += 2 * pen * (ab[:, -1] - end)
        if self.alpha:
            return f, np.cumsum((g * ab)[:, ::-1], -1)[:, ::-1]
        return f, g * ab * (1 - ab)

    def _np_window(self, ys: np.ndarray, a: int, b: int) -> np.ndarray:
        """The loss terms of steps ``a..b`` (and the penalty if ``b`` is the last step) of each row of ``ys``."""
        lo = max(a - 1, 0)
        ab = self._np_ab(ys[:, : b + 1])[:, lo:] if self.alpha else self._np_ab(ys[:, lo : b + 1])  # steps lo..b
        s = np.sqrt((1 - ab) / ab)
        ds = np.diff(s, axis=-1, prepend=0.0) if a == 0 else np.diff(s, axis=-1)
        f = (ds**2 * self.np_mse(ab[:, a - lo :])[0]).sum(-1)  # type: ignore[misc]
        if b == self.n - 1 and not self.pinned:
            f = f + self.s.reg_lambda * (ab[:, -1] - float(self.ab0[-1])) ** 2
        self.evals += ys.shape[0]
        return f

    def losses(self, ys: np.ndarray) -> np.ndarray:
        if self.np_mse is not None:
            with np.errstate(all="ignore"):
                f = self._np_loss(ys, False)[0]
            return np.where(np.isfinite(f), f, np.inf)
        with torch.no_grad():
            f = self.loss_t(torch.as_tensor(ys, dtype=torch.float64)).numpy()
        return np.where(np.isfinite(f), f, np.inf)

    def value_and_grad(self, y: np.ndarray) -> tuple[float, np.ndarray]:
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

    # --- smooth phase -------------------------------------------------------------------------------------------
    def smooth(self, y: np.ndarray, f: float) -> tuple[np.ndarray, float]:
        if self.alpha and self.pinned:
            x = self._spg(y, f)
        else:
            r = minimize(self.value_and_grad, y, jac=True, method="L-BFGS-B",
                         bounds=list(zip(self.lo, self.hi, strict=True)),
                         options={"maxiter": 2000, "maxcor": 10, "ftol": 1e-12, "gtol": 1e-14})
            x = np.clip(r.x, self.lo, self.hi)
        fx = float(self.losses(x[None])[0])
        return (x, fx) if fx < f else (y, f)

    def _project_pinned(self, y: np.ndarray) -> np.ndarray:
        """Euclidean projection onto {box, Σ y = log ᾱ_end}: ``clip(y + μ)``, μ exact from the sorted breakpoints."""
        bp = np.sort(np.concatenate([self.lo - y, self.hi - y]))
        sums = np.clip(y[None, :] + bp[:, None], self.lo, self.hi).sum(1)  # non-decreasing in μ
        k = int(np.clip(np.searchsorted(sums, self.log_end), 1, bp.size - 1))
        s0, s1 = sums[k - 1], sums[k]
        mu = bp[k] if s1 == s0 else bp[k - 1] + (self.log_end - s0) * (bp[k] - bp[k - 1]) / (s1 - s0)
        return np.clip(y + mu, self.lo, self.hi)

    def _spg(self, y: np.ndarray, f: float, iters: int = 300, window: int = 20) -> np.ndarray:
        """Spectral projected gradient (Birgin, Martínez & Raydan 2000) for the pinned ``alpha`` trust region;
        stops when ``window`` iterations gain less than the tolerance (kinks make exact stationarity unreachable)."""
        f, g = self.value_and_grad(y)
        step, hist = 1.0 / max(float(np.abs(g).max()), 1e-300), [f]
        for _ in range(iters):
            d = self._project_pinned(y - step * g) - y
            if float(np.abs(d).max()) <= 1e-15:
                break
            gd, t = float(g @ d), 1.0
            while True:
                fn, gn = self.value_and_grad(y + t * d)
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
        return self._project_pinned(y)

    # --- global start (dynamic programming over a grid) ------------------------------------------------------------
    def _mse_np(self, ab: np.ndarray) -> np.ndarray:
        if self.np_mse is None:
            self.np_mse_any = getattr(self, "np_mse_any", _numpy_mse(self.mse_fn))
        fn = self.np_mse or self.np_mse_any
        if fn is not None:
            return fn(ab)[0]
        with torch.no_grad():
            return self.mse_fn(torch.as_tensor(ab, dtype=torch.float64)).numpy()

    def global_start(self, grid: int) -> np.ndarray:
        """Grid minimiser of the *paper* loss by dynamic programming along the chain of steps.

        The paper cpe is a sum of terms over consecutive steps and the trust region constrains consecutive steps, so
        a Viterbi pass over a grid of each step's ᾱ finds the grid's global minimum in ``O(N · grid²)``. Grids: the
        base value plus points uniform in ᾱ and in log ᾱ (``alpha`` trust, over the reachable range) or in λ
        (``logsnr``); a transition may miss the ratio box by half a grid spacing, the result is then clipped into it.
        It is a second starting point of the local phases (for either objective).
        """
        n, ab0 = self.n, self.ab0.numpy()
        if self.alpha:
            za, zb = np.cumsum(self.lo), np.cumsum(self.hi)  # reachable log ᾱ ranges
            if self.pinned:
                za = np.maximum(za, self.log_end - np.concatenate([np.cumsum(self.hi[::-1])[::-1][1:], [0.0]]))
                zb = np.minimum(zb, self.log_end - np.concatenate([np.cumsum(self.lo[::-1])[::-1][1:], [0.0]]))
            half = grid // 2
            grids = [np.unique(np.concatenate([[ab0[i]], np.linspace(np.exp(za[i]), np.exp(zb[i]), grid - half),
                                               np.exp(np.linspace(za[i], zb[i], half))])) for i in range(n)]
        else:
            lam = [np.linspace(self.lo[i], self.hi[i], grid) for i in range(n)]
            grids = [np.unique(np.concatenate([[ab0[i]], 1 / (1 + np.exp(-lam[i]))])) for i in range(n)]
        if self.pinned:
            grids[-1] = ab0[-1:]
        grids = [g[(g > 0) & (g < 1)] for g in grids]
        sig = [np.sqrt((1 - g) / g) for g in grids]
        mse = [self._mse_np(g) for g in grids]
        value = sig[0] ** 2 * mse[0]
        back = []
        with np.errstate(all="ignore"):
            for i in range(1, n):
                p, q = grids[i - 1][None, :], grids[i][:, None]
                cost = value[None, :] + (sig[i][:, None] - sig[i - 1][None, :]) ** 2 * mse[i][:, None]
                if self.alpha:
                    tol = np.diff(grids[i], prepend=grids[i][0], append=grids[i][-1])
                    tol = np.maximum(tol[:-1], tol[1:])[:, None] / 2
                    ok = (q >= p * np.exp(self.lo[i]) - tol) & (q <= p * np.exp(self.hi[i]) + tol)
                    cost = np.where(ok, cost, np.inf)
                j = np.argmin(np.where(np.isfinite(cost), cost, np.inf), axis=1)
                back.append(j)
                value = cost[np.arange(q.shape[0]), j]
            if not self.pinned:
                value = value + self.s.reg_lambda * (grids[-1] - ab0[-1]) ** 2
        if not np.isfinite(value).any():
            return self.y0.copy()
        idx = [int(np.argmin(value))]
        for i in range(n - 1, 0, -1):
            idx.append(int(back[i - 1][idx[-1]]))
        ab = np.array([grids[i][j] for i, j in enumerate(idx[::-1])])
        y = np.diff(np.log(ab), prepend=0.0) if self.alpha else np.log(ab) - np.log1p(-ab)
        y = np.clip(y, self.lo, self.hi)
        return self._project_pinned(y) if (self.alpha and self.pinned) else y

    # --- kink-aware polish ----------------------------------------------------------------------------------------
    def blocks(self) -> list[tuple[int, int]]:
        n, last = self.n, self.n - 1
        small = n <= _MAX_BLOCKS_ALL and not self.light
        if self.alpha:
            top = last - 1 if self.pinned else last
            if small:
                out = [(j, k) for j in range(n) for k in range(j, top + 1)]
            else:
                out = sorted({(i, i) for i in range(top + 1)} | {(j, top) for j in range(top + 1)})
            return [b for b in out if b[0] <= top]
        if small:
            return [(j, k) for j in range(n) for k in range(j, n)]
        return [(i, i) for i in range(n)] + [(j, n - 1) for j in range(1, n)]

    def _move(self, y: np.ndarray, block: tuple[int, int], t: np.ndarray) -> np.ndarray:
        j, k = block
        ys = np.repeat(y[None], t.size, 0)
        if self.alpha:
            ys[:, j] += t
            if k + 1 < self.n:
                ys[:, k + 1] -= t
        else:
            ys[:, j : k + 1] += t[:, None]
        return ys

    def _range(self, y: np.ndarray, block: tuple[int, int]) -> tuple[float, float]:
        j, k = block
        if self.alpha:
            t_lo, t_hi = self.lo[j] - y[j], self.hi[j] - y[j]
            if k + 1 < self.n:
                t_lo, t_hi = max(t_lo, y[k + 1] - self.hi[k + 1]), min(t_hi, y[k + 1] - self.lo[k + 1])
            return t_lo, t_hi
        return float(np.max(self.lo[j : k + 1] - y[j : k + 1])), float(np.min(self.hi[j : k + 1] - y[j : k + 1]))

    def line_search(self, y: np.ndarray, f: float, block: tuple[int, int]) -> tuple[np.ndarray, float]:
        """Minimise along one block move: the loss at every kink and, in every smooth piece between kinks, at three
        interior points and at the vertex of the parabola through them; the best piece is then zoomed into."""
        t_lo, t_hi = self._range(y, block)
        if not t_hi - t_lo > 1e-15:
            return y, f
        zb = self.z(y)[block[0] : block[1] + 1]
        kinks = (self.knots_z[None, :] - zb[:, None]).ravel()
        kinks = kinks[(kinks > t_lo) & (kinks < t_hi)]
        if kinks.size > (cap := 12 if self.light else _MAX_KINKS):  # the kinks nearest to the current point
            kinks = kinks[np.argsort(np.abs(kinks), kind="stable")[:cap]]
        br = np.unique(np.concatenate([[t_lo, 0.0, t_hi], kinks, np.linspace(t_lo, t_hi, 5)]))
        w = br[1:] - br[:-1]
        window = (block[0], min(block[1] + 1, self.n - 1))  # the only terms a block move changes
        if self.np_mse is not None:
            offset = f - float(self._np_window(y[None], *window)[0])

            def along(t: np.ndarray) -> np.ndarray:
                with np.errstate(all="ignore"):
                    v = offset + self._np_window(self._move(y, block, t), *window)
                return np.where(np.isfinite(v), v, np.inf)
        else:

            def along(t: np.ndarray) -> np.ndarray:
                return self.losses(self._move(y, block, t))

        if self.light:
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
        for _ in range(self.zoom_rounds):
            half = (c_ - a_) / 2
            grid = np.linspace(max(a_, best_t - half), min(c_, best_t + half), 9 if self.light else 17)
            gv = along(grid)
            i = int(np.argmin(gv))
            if gv[i] < best_f:
                best_t, best_f = float(grid[i]), float(gv[i])
            a_, c_ = grid[max(i - 1, 0)], grid[min(i + 1, grid.size - 1)]
            if c_ - a_ <= 1e-15 * (1 + abs(best_t)):
                break
        if best_f < f:  # confirm with the full loss (the window sum differs from it by rounding)
            y_new = self._move(y, block, np.array([best_t]))[0]
            f_new = float(self.losses(y_new[None])[0])
            if f_new < f:
                return y_new, f_new
        return y, f

    def polish(self, y: np.ndarray, f: float) -> tuple[np.ndarray, float]:
        for block in self.blocks():
            y, f = self.line_search(y, f, block)
        return y, f


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
    start = time.perf_counter()
    cpe0, loss0 = trajectory_loss(ab0, ab0, mse_fn, settings)
    prob = _Problem(ab0, mse_fn, settings)
    rounds = 0
    best_y, best_f = prob.y0.copy(), float(prob.losses(prob.y0[None])[0])
    starts = [prob.y0.copy()]
    if settings.global_grid > 0:
        starts.append(prob.global_start(settings.global_grid))
    max_rounds = min(settings.max_rounds, 3) if prob.light else settings.max_rounds
    for y in starts:
        f = float(prob.losses(y[None])[0])
        for _ in range(max_rounds):
            f_start = f
            y, f = prob.smooth(y, f)
            y, f = prob.polish(y, f)
            rounds += 1
            if not f < f_start - settings.tol * max(1.0, abs(f_start)):
                break
        if f < best_f:
            best_y, best_f = y, f
    y = best_y
    with torch.no_grad():
        ab = prob.ab(torch.as_tensor(y, dtype=torch.float64))
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
