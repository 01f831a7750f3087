"""Dynamic programming along the chain of steps: the loss of a :class:`~.problem.SearchProblem` sums terms of two
consecutive steps, and the trust region constrains single steps (``logsnr``) or consecutive pairs (``alpha``: the
ratio of two steps), so the minimum over any grid of positions per step is one Viterbi pass, ``O(N · G²)``.

- :func:`refine`: the optimizer's kink-aware local search. Each pass offers every step the positions
  ``z_i + h·k, k = -K..K`` (``z``: log ᾱ or λ, :data:`OFFSETS`) and moves all steps at once to the best combination
  on that grid (exactly, constraints included: a chain of steps held at their ratio bounds moves together, and a step
  can land on a kink of a piecewise-linear MSE to within ``h``). It repeats at a scale while that improves, then
  shrinks ``h`` by :data:`SHRINK`, down to :data:`RESOLUTION` relative. Joint moves over a product grid need no
  gradient, so kinks, which stall gradient methods, do not stop it.
- :func:`global_start`: the grid minimiser over absolute positions (every step's reachable ᾱ range), a second start
  that escapes the local minima of bumpy profiles.
"""

from __future__ import annotations

import math

import numpy as np

from .problem import RESOLUTION, SearchProblem

__all__ = ["OFFSETS", "SHRINK", "RESOLUTION", "MAX_PASSES", "refine", "grid_pass", "moved", "global_start"]

OFFSETS = 4  # K: a pass offers 2K + 1 positions per step
SHRINK = 4.0  # the scale shrinks by this factor when a pass finds nothing better
MAX_PASSES = 400  # a bound on the passes of one refinement


def _nodes(prob: SearchProblem, y: np.ndarray, off: np.ndarray, lo: np.ndarray,
           hi: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Candidate coordinates ``Z [N, G]``, their ᾱ and which are allowed as positions of their step."""
    k0 = off.size // 2
    if prob.alpha:
        z = np.cumsum(y)
        zz = z[:, None] + off
        ok = zz < 0
        ok[-1] &= zz[-1] >= prob.vars.z_min
        ab = np.exp(zz)
    else:
        zz = y[:, None] + off
        ok = (zz >= lo[:, None]) & (zz <= hi[:, None])
        ab = 1 / (1 + np.exp(-zz))
    if prob.pinned:
        ok[-1] = False
        ok[-1, k0] = True
    return zz, ab, ok


def _transitions(prob: SearchProblem, y: np.ndarray, h: float, ks: np.ndarray, ok: np.ndarray, lo: np.ndarray,
                 hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Which pairs of positions of consecutive steps are allowed ``[N-1, G, G]`` and which positions of the
    cleanest step ``[G]`` (``alpha`` trust: the links ``log(ᾱ_i / ᾱ_{i-1})`` inside their box)."""
    allowed = ok[:-1, :, None] & ok[1:, None, :]
    if not prob.alpha:
        return allowed, ok[0]
    link = y[1:, None, None] + (h * (ks[None, :] - ks[:, None]))[None]
    allowed &= (link >= lo[1:, None, None]) & (link <= hi[1:, None, None])
    link0 = y[0] + h * ks
    return allowed, ok[0] & (link0 >= lo[0]) & (link0 <= hi[0])


def moved(prob: SearchProblem, y: np.ndarray, step: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """The variables after moving every step's coordinate ``z_i`` by ``step_i`` (a grid pass's result), in the box."""
    return np.clip(y + (np.diff(step, prepend=0.0) if prob.alpha else step), lo, hi)


def grid_pass(prob: SearchProblem, y: np.ndarray, h: float, lo: np.ndarray | None = None,
              hi: np.ndarray | None = None, k: int = OFFSETS) -> np.ndarray | None:
    """One pass of :func:`refine`: the best point of the grid ``z_i + h·(-k..k)`` (``None`` if no position is
    allowed)."""
    lo = prob.lo if lo is None else lo
    hi = prob.hi if hi is None else hi
    n, ks = prob.n, np.arange(-k, k + 1)
    off = h * ks
    with np.errstate(all="ignore"):
        zz, ab, ok = _nodes(prob, y, off, lo, hi)
        s = np.sqrt((1 - ab) / ab)
        m = prob.np_mse(ab)[0]
        if prob.term_weights is not None:
            m = m * prob.term_weights[:, None]
        cost = (s[1:, None, :] - s[:-1, :, None]) ** 2 * m[1:, None, :]  # [step, previous position, position]
        value = s[0] ** 2 * m[0]
        allowed, ok0 = _transitions(prob, y, h, ks, ok, lo, hi)
        sep = prob.lin is not None or prob.mu
        if prob.alpha:  # the variables are the links log(ᾱ_i / ᾱ_{i-1})
            if sep:
                link = y[1:, None, None] + (h * (ks[None, :] - ks[:, None]))[None]
                cost = cost + prob.separable(link, (slice(1, None), None, None))
                value = value + prob.separable(y[0] + off, 0)
        else:  # the variables are the positions themselves
            if sep:
                node = prob.separable(zz, (slice(None), None))
                cost = cost + node[1:, None, :]
                value = value + node[0]
        cost = np.where(allowed, cost, np.inf)
        value = np.where(ok0, value, np.inf)
        back = np.empty((n - 1, ks.size), dtype=np.intp)
        cols, total = np.arange(ks.size), np.empty((ks.size, ks.size))
        for i in range(n - 1):
            np.add(value[:, None], cost[i], out=total)
            j = total.argmin(0, out=back[i])
            value = total[j, cols]
        if prob.penalty:
            value = value + prob.penalty * (ab[-1] - prob.end) ** 2
    q = int(np.argmin(value))
    if not np.isfinite(value[q]):
        return None
    idx = np.empty(n, dtype=np.intp)
    idx[-1] = q
    for i in range(n - 2, -1, -1):
        idx[i] = back[i, idx[i + 1]]
    prob.evals += ks.size**2  # N·G² terms: G² trajectories' worth
    return moved(prob, y, h * ks[idx], lo, hi)


def refine(prob: SearchProblem, y: np.ndarray, f: float, lo: np.ndarray | None = None, hi: np.ndarray | None = None,
           h0: float | None = None, resolution: float | None = None,
           max_passes: int = MAX_PASSES) -> tuple[np.ndarray, float, int]:
    """Grid refinement from ``y`` (loss ``f``) inside ``[lo, hi]`` (default: the trust box): passes of
    :func:`grid_pass` from scale ``h0`` (default: half the widest box over K) down to ``resolution``.

    Returns:
        ``(y, loss, passes)``; the loss never increases.
    """
    lo = prob.lo if lo is None else lo
    hi = prob.hi if hi is None else hi
    h_max = float(np.max(hi - lo)) / (2 * OFFSETS)
    h = h_max if h0 is None else min(float(h0), h_max)
    resolution = prob.resolution if resolution is None else resolution
    floor = resolution * max(1.0, float(np.max(np.abs(prob.vars.coords(y)))))
    passes = 0
    while h > floor and passes < max_passes:
        if prob.expired():
            break
        yn = prob.grid_pass(y, h, lo, hi)
        passes += 1
        fn = math.inf if yn is None else prob.loss(yn)
        if fn < f - 1e-15 * abs(f):
            y, f = yn, fn
        else:
            h /= SHRINK
    return y, f, passes


def _grids(prob: SearchProblem, grid: int) -> np.ndarray:
    """Each step's candidate ᾱ values, sorted, ``[N, G]``: the base value plus points uniform in ᾱ and in log ᾱ over
    the reachable range (``alpha`` trust), or uniform in λ over the step's box (``logsnr``, ``grid/2`` points: a finer
    grid than the reachable ranges of ``alpha``); the pinned noisiest step has the base value only (repeated)."""
    ab0 = prob.ab0.numpy()
    if prob.alpha:
        za, zb = np.cumsum(prob.lo), np.cumsum(prob.hi)  # reachable log ᾱ ranges
        after_hi = np.concatenate([np.cumsum(prob.hi[::-1])[::-1][1:], [0.0]])
        if prob.pinned:
            za = np.maximum(za, prob.vars.log_end - after_hi)
            zb = np.minimum(zb, prob.vars.log_end - np.concatenate([np.cumsum(prob.lo[::-1])[::-1][1:], [0.0]]))
        elif prob.vars.z_min > -math.inf:
            za = np.maximum(za, prob.vars.z_min - after_hi)
        half = grid // 2
        t1, t2 = np.linspace(0, 1, grid - half), np.linspace(0, 1, half)
        a, b = np.exp(za)[:, None], np.exp(zb)[:, None]
        grids = np.concatenate([ab0[:, None], a + (b - a) * t1, np.exp(za[:, None] + (zb - za)[:, None] * t2)], 1)
    else:
        t = np.linspace(0, 1, max(grid // 2, 2))
        lam = prob.lo[:, None] + (prob.hi - prob.lo)[:, None] * t
        grids = np.concatenate([ab0[:, None], 1 / (1 + np.exp(-lam))], 1)
    if prob.pinned:
        grids[-1] = ab0[-1]
    return np.sort(np.clip(grids, 1e-300, 1 - 1e-16), axis=1)


def global_start(prob: SearchProblem, grid: int) -> np.ndarray:
    """Grid minimiser of the paper loss (the problem's paper terms and penalty) by dynamic programming over absolute
    positions.

    Each step gets ``grid`` positions over its reachable range (``grid/2`` over its box for ``logsnr``,
    :func:`_grids`); in ``alpha`` trust a transition may miss the ratio box by half a grid spacing and only the window
    of allowed predecessors is scored (found for all steps at once), so a pass costs ``O(N · grid · W)``. The result
    is restored into the feasible set; it is a second starting point of the local phases.
    """
    n = prob.n
    grids = _grids(prob, grid)
    g = grids.shape[1]
    sig = np.sqrt((1 - grids) / grids)
    mse = prob.np_mse(grids)[0]
    if prob.alpha:  # the window of predecessors of every position: [start, stop) in the previous step's grid
        tol = np.diff(grids, axis=1, prepend=grids[:, :1], append=grids[:, -1:])
        tol = np.maximum(tol[:, :-1], tol[:, 1:]) / 2
        offset = 2.0 * np.arange(n)[:, None]  # rows in (0, 1) made one sorted array
        flat = (grids + offset).ravel()
        low = (grids[1:] - tol[1:]) / np.exp(prob.hi[1:, None]) + offset[:-1]
        high = (grids[1:] + tol[1:]) / np.exp(prob.lo[1:, None]) + offset[:-1]
        base_idx = g * np.arange(n - 1)[:, None]
        start = np.searchsorted(flat, low, "left") - base_idx
        stop = np.searchsorted(flat, high, "right") - base_idx
        start, stop = np.clip(start, 0, g), np.clip(stop, 0, g)
    value = sig[0] ** 2 * mse[0]
    back, scored, rows = [], g, np.arange(g)
    with np.errstate(all="ignore"):
        for i in range(1, n):
            if prob.alpha:
                width = max(int((stop[i - 1] - start[i - 1]).max()), 1)
                idx = start[i - 1][:, None] + np.arange(width)
                idx = np.where(idx < stop[i - 1][:, None], idx, g)
            else:
                idx = np.broadcast_to(np.arange(g), (g, g))
            scored += idx.size
            padded_value, padded_sig = np.append(value, np.inf), np.append(sig[i - 1], 0.0)
            cost = padded_value[idx] + (padded_sig[idx] - sig[i][:, None]) ** 2 * mse[i][:, None]
            j = np.argmin(cost, axis=1)
            back.append(idx[rows, j])
            value = cost[rows, j]
            value[~np.isfinite(value)] = np.inf
        if prob.penalty:
            value = value + prob.penalty * (grids[-1] - prob.end) ** 2
    prob.evals += scored // n  # terms scored, in trajectories' worth
    if not np.isfinite(value).any():
        return prob.y0.copy()
    pos = [int(np.argmin(value))]
    for i in range(n - 1, 0, -1):
        pos.append(int(back[i - 1][pos[-1]]))
    ab = grids[np.arange(n), pos[::-1]]
    return prob.feasible(prob.vars.from_alpha_bar_np(ab))
