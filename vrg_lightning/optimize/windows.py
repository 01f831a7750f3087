"""The solver-aware loss of ``plms`` and ``pndm`` as an exact chain of windows.

Their steps add ``Δσ_i Σ_k b_k ε̂`` with constant pseudo linear multistep coefficients (and pndm's pseudo Runge-Kutta
warm-up, ``Δσ (e₁ + 2e₂ + 2e₃ + e₄)/6``) and pass x̃ with coefficient 1, so the weights are linear in σ with a constant
banded matrix, ``w = J σ``, each row spanning at most :data:`WINDOW` consecutive values, and

    cpe_solver = Σ_e (J_e σ)² MSE(ℓ_e),    ℓ_e = 1 / (1 + σ_a σ_b)

with ``(a, b)`` a trajectory value twice or (pndm) the two ends of a step, whose logSNR midpoint it is. ``J`` and the
levels come from the solver code itself (:func:`linear_weights`: differences of
:func:`~vrg_lightning.variance.propagation`, exact by linearity, once per solver and length). :func:`window_pass`
minimises the loss exactly over a product grid by dynamic programming whose state holds ``WINDOW - 1`` consecutive
positions (``G^WINDOW`` terms a step), so :func:`~.search.scouted_search` searches it like the paper loss, with no
model in between; its refinement stops at :data:`WINDOW_RESOLUTION` (with 3 positions a value, finer passes crawl along
smooth valleys).
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from ..variance import propagation
from .chain import _nodes, _transitions, moved
from .problem import SearchProblem

__all__ = ["LINEAR", "WINDOW", "linear_weights", "WindowProblem", "window_pass"]

LINEAR = ("plms", "pndm")  # solvers whose weights are linear in σ with a constant matrix
WINDOW = 5  # the most consecutive values one weight and its level depend on
WINDOW_OFFSETS = 1  # K of a window pass: 2K + 1 positions a value, (2K + 1)^WINDOW terms a step
WINDOW_RESOLUTION = 1e-6  # its grid refinement's last scale (relative): below it, ±h moves crawl in smooth valleys
COLOURS = 2 * WINDOW - 1  # values moved together when J is differenced
MAX_VALUES = 200  # longer trajectories keep the trust-region search


@functools.lru_cache(maxsize=64)
def linear_weights(solver: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``(J [M, n], ends [M, 2])`` of ``solver`` over ``n`` values (cleanest first, as ``propagation``): the weights
    are ``J σ`` and evaluation e is at ``ᾱ = 1 / (1 + σ_a σ_b)``, ``(a, b) = ends[e]``. Found on a reference
    trajectory; ``ValueError`` when the solver's weights are not of this form."""
    sig = torch.exp(torch.linspace(-2.5, 2.5, n, dtype=torch.float64))  # cleanest first
    with torch.no_grad():
        p = propagation(solver, 1 / (1 + sig * sig))
    levels, s = p.alpha_bar.numpy(), sig.numpy()
    pairs = [(a, a) for a in range(n)] + [(a, a + 1) for a in range(n - 1)]
    cand = np.array([1 / (1 + s[a] * s[b]) for a, b in pairs])
    match = np.abs(levels[:, None] / cand[None, :] - 1)
    ends = np.array([pairs[int(k)] for k in match.argmin(1)])
    jac = _linear_jacobian(solver, sig, p.weights, ends[:, 0])
    other = torch.exp(torch.linspace(-2.5, 2.5, n, dtype=torch.float64) ** 3 / 6.25)  # another spacing: J constant
    with torch.no_grad():
        w_other = propagation(solver, 1 / (1 + other * other)).weights
    if float((jac @ other - w_other).abs().max()) > 1e-10 * float(w_other.abs().max()) or match.min(1).max() > 1e-12:
        raise ValueError(f"solver {solver!r} has no constant linear weights in σ.")
    return jac.numpy(), ends


def _linear_jacobian(solver: str, sig: torch.Tensor, w: torch.Tensor, at: np.ndarray) -> torch.Tensor:
    """``J`` of weights linear in σ by differences, exact by linearity: the values :data:`COLOURS` apart are moved
    together, and a row's weight depends on values within ``WINDOW - 1`` of its level's value ``at`` only, so
    ``min(n, COLOURS)`` solver runs give every entry (each value is moved by a quarter of its gaps: still a
    trajectory)."""
    n = sig.numel()
    gaps = torch.diff(sig)
    delta = 0.25 * torch.minimum(torch.cat([gaps, gaps[-1:]]), torch.cat([gaps[:1], gaps])) if n > 1 else 0.25 * sig
    colours, rows = min(n, COLOURS), np.arange(w.numel())
    jac = torch.zeros(w.numel(), n, dtype=torch.float64)
    for r in range(colours):
        moved = sig.clone()
        moved[r::colours] += delta[r::colours]
        with torch.no_grad():
            dw = propagation(solver, 1 / (1 + moved * moved)).weights - w
        low = at - (WINDOW - 1)
        col = np.full(rows.size, r) if colours == n else low + (r - low) % colours
        ok = (col >= 0) & (col < n)
        jac[rows[ok], col[ok]] = dw[ok] / delta[col[ok]]
    return jac


class WindowProblem(SearchProblem):
    """The exact solver-aware loss of a solver of :data:`LINEAR` in a problem's variables: the same box, start and
    penalty; its terms are ``(J_e σ)² MSE(ℓ_e)`` (module docstring) and :func:`window_pass` is its grid pass."""

    def __init__(self, prob: SearchProblem) -> None:
        super().__init__(prob.ab0, prob.mse_fn, prob.s, prob.deadline)
        self.resolution = WINDOW_RESOLUTION
        self.jac, self.ends = linear_weights(prob.s.solver, self.n)
        cols = [np.flatnonzero(row) for row in self.jac]
        self.last = np.array([max(c.max(initial=0), *e) for c, e in zip(cols, self.ends, strict=True)])
        first = np.array([min(c.min(initial=self.n), *e) for c, e in zip(cols, self.ends, strict=True)])
        self.scatter = np.zeros((self.n, self.last.size))
        self.scatter[self.last, np.arange(self.last.size)] = 1.0
        if int((self.last - first).max()) >= WINDOW:
            raise ValueError(f"solver {prob.s.solver!r}: a weight spans more than {WINDOW} values.")

    def grid_pass(self, y: np.ndarray, h: float, lo: np.ndarray, hi: np.ndarray) -> np.ndarray | None:
        return window_pass(self, y, h, lo, hi)

    def _terms(self, ab: np.ndarray, grad: bool) -> tuple[np.ndarray, np.ndarray | None]:
        s = np.sqrt((1 - ab) / ab)
        w = s @ self.jac.T  # [K, M]
        sa, sb = s[:, self.ends[:, 0]], s[:, self.ends[:, 1]]
        lev = 1 / (1 + sa * sb)
        m, dm = self.np_mse(lev)
        f = (w * w * m).sum(-1)
        if not grad:
            return f, None
        g_s = 2 * (w * m) @ self.jac
        d = w * w * dm * lev * lev  # d/dℓ times -dℓ/d(σ_a σ_b)
        np.add.at(g_s, (slice(None), self.ends[:, 0]), -d * sb)
        np.add.at(g_s, (slice(None), self.ends[:, 1]), -d * sa)
        return f, g_s * (-0.5 / (s * ab * ab))


def window_pass(prob: WindowProblem, y: np.ndarray, h: float, lo: np.ndarray | None = None,
                hi: np.ndarray | None = None, k: int = WINDOW_OFFSETS) -> np.ndarray | None:
    """The best point of the grid ``z_i + h·(-k..k)`` for a :class:`WindowProblem` (``None`` if no position is
    allowed), by dynamic programming over the values, cleanest first, whose state is the positions of the last
    ``WINDOW - 1`` values (``WINDOW - 1`` values with one position each stand before the first)."""
    lo = prob.lo if lo is None else lo
    hi = prob.hi if hi is None else hi
    ks = np.arange(-k, k + 1)
    g, n, wd, pad = ks.size, prob.n, WINDOW, WINDOW - 1
    with np.errstate(all="ignore"):
        zz, ab, ok = _nodes(prob, y, h * ks, lo, hi)
        s = np.sqrt((1 - ab) / ab)
        allowed, ok0 = _transitions(prob, y, h, ks, ok, lo, hi)
        # each term on the window of values last-WINDOW+1 .. last, axes 1..WINDOW
        m_terms = prob.jac.shape[0]
        start = prob.last - wd + 1
        term = np.zeros([m_terms] + [1] * wd)
        for q in range(wd):
            v = start + q
            coef = np.where(v >= 0, prob.jac[np.arange(m_terms), np.clip(v, 0, n - 1)], 0.0)
            sh = [m_terms] + [1] * wd
            sh[q + 1] = g
            term = term + (coef[:, None] * s[np.clip(v, 0, n - 1)]).reshape(sh)
        term = term * term
        qa, qb = prob.ends[:, 0] - start, prob.ends[:, 1] - start
        sa, sb = s[prob.ends[:, 0]], s[prob.ends[:, 1]]
        for pa, pb in sorted(set(zip(qa.tolist(), qb.tolist(), strict=True))):  # the MSE on the level's axes
            rows = np.flatnonzero((qa == pa) & (qb == pb))
            sh = [rows.size] + [1] * wd
            if pa == pb:
                sh[pa + 1] = g
                m = prob.np_mse(1 / (1 + sa[rows] * sb[rows]))[0].reshape(sh)
            else:
                sh[pa + 1] = sh[pb + 1] = g
                lev = 1 / (1 + sa[rows][:, :, None] * sb[rows][:, None, :])
                m = prob.np_mse(lev.reshape(rows.size, -1))[0].reshape(sh)
            term[rows] = term[rows] * m
        term = np.where(np.isfinite(term), term, 0.0)  # (positions outside (0, 1): barred by the transitions)
        table = prob.scatter @ term.reshape(m_terms, -1)  # [N, G^WINDOW]: the terms of each last value
        links = np.concatenate([np.where(ok0, 0.0, np.inf)[None, None, :].repeat(g, 1),
                                np.where(allowed, 0.0, np.inf)])  # [N, G, G]: value t - 1 (or before), value t
        table = (table.reshape([n] + [g] * wd) + links.reshape([n] + [1] * (wd - 2) + [g, g])).reshape(n, -1, g)
        value = np.full(g**pad, np.inf)
        value[np.ravel_multi_index((k,) * pad, (g,) * pad)] = 0.0  # the values before the first: one position
        cols, back = np.arange(g**pad), []
        for t in range(n):  # state: positions of values t-WINDOW+1 .. t-1 (flat, the oldest most significant)
            total = (value[:, None] + table[t]).reshape(g, -1)  # [oldest, the others and value t]
            j = total.argmin(0)
            back.append(j)
            value = total[j, cols]
        if prob.penalty:
            value = value + np.tile(prob.penalty * (ab[-1] - prob.end) ** 2, g ** (pad - 1))
    state = int(np.argmin(value))
    if not np.isfinite(value[state]):
        return None
    idx = np.empty(n, dtype=np.intp)
    for t in range(n - 1, -1, -1):  # value t is the last of the state; back[t] gives the oldest of it
        idx[t] = state % g
        state = int(back[t][state]) * g ** (pad - 1) + state // g
    prob.evals += g**wd
    return moved(prob, y, h * ks[idx], lo, hi)
