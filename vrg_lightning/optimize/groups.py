"""The solver-aware loss of the singlestep DPM-Solver++ solvers (``dpmsolver2``, ``dpmsolver3``) as an exact chain.

A singlestep solver moves in groups (``solvers._singlestep``, grouped as diffusers): a group of L steps from
trajectory value k evaluates ε̂ at k, ..., k+L-1 and combines them with the group's start only, and x̃ passes through a
group with coefficient 1 (``ρ x̃_k + (1-ρ) x̂₀_k + c (x̂₀_i - x̂₀_k)`` sums x̃_k to 1). So the weight of every
evaluation depends on the σ of its own group's L + 1 values only, and

    cpe_solver = Σ_groups T_g(ᾱ of the group's values),    T_g = Σ_{e in g} w_e² MSE(ᾱ_e)

is a chain whose links are groups (the last group, the step into σ = 0, has one value). :func:`group_pass` minimises
it exactly over a product grid, as :func:`~.chain.grid_pass` does the paper loss (a group costs ``G^(L+1)`` terms),
so :func:`~.search.scouted_search` searches the exact solver-aware loss like the paper loss, with no model in
between. :func:`group_weights` is a fast path of :func:`~vrg_lightning.variance.propagation` for these solvers
(tested equal to it); gradients come by autograd of the same formula.
"""

from __future__ import annotations

import numpy as np

from ..solvers import _singlestep_orders
from .chain import OFFSETS, _nodes, _transitions, moved
from .problem import SearchProblem

__all__ = ["GROUPED", "group_runs", "group_weights", "GroupedProblem", "group_pass"]

GROUPED = {"dpmsolver2": 2, "dpmsolver3": 3}  # solver -> its order
COMPLEX_STEP = 1e-30  # the imaginary step of the complex-step derivatives (exact to rounding; also .multistep)
OFFSETS_3 = 2  # the offsets K of a grid pass with groups of 3 steps (each costs (2K + 1)^4 terms)


def group_runs(n: int, order: int) -> list[tuple[int, int]]:
    """The groups ``(a, L)`` of a trajectory of ``n`` values (cleanest first): group g covers the values ``a..a+L``
    and evaluates at ``a+1..a+L``; the step into σ = 0 is ``(-1, 1)`` (value -1: the end). Cleanest group first.

    Example:
        >>> group_runs(5, 2)  # orders noisiest first [1, 2, 1, 2, 1]
        [(-1, 1), (0, 2), (2, 2)]
    """
    orders = _singlestep_orders(n, order, True, True)
    starts = [k for k, o in enumerate(orders) if o == 1] + [n]  # noisiest first
    return [(n - 1 - k1, k1 - k0) for k0, k1 in zip(starts[-2::-1], starts[:0:-1], strict=True)]


def group_weights(s: list, lam: list) -> list:
    """Weights of a group's evaluations from σ and λ = -log σ of its values, noisiest first (``s[0]`` the group's
    start; ``L = len(s) - 1`` steps of orders 1..L, as ``solvers._singlestep``); numpy arrays or tensors, broadcast.
    Returns the L weights, noisiest evaluation first (signs as in x̃ of the end; only their squares matter)."""
    s0, s1 = s[0], s[1]
    if len(s) == 2:
        return [s1 - s0]
    rho2 = s[2] / s0
    c2 = 0.5 * (1 - rho2) * (lam[2] - lam[0]) / (lam[1] - lam[0])
    a0, a1 = c2 * s1 - (1 - rho2) * s0, -c2 * s1
    if len(s) == 3:
        return [a0, a1]
    rho3, h3 = s[3] / s0, lam[3] - lam[0]
    c3 = ((rho3 - 1) / h3 + 1) * h3 / (lam[2] - lam[0])
    return [c3 * (a0 + s0) - (1 - rho3) * s0, c3 * a1, -c3 * s[2]]


class GroupedProblem(SearchProblem):
    """The exact solver-aware loss of a singlestep solver (:data:`GROUPED`) in a problem's variables: the same box,
    start and penalty; its terms are the groups' (module docstring) and :func:`group_pass` is its grid pass."""

    def __init__(self, prob: SearchProblem) -> None:
        super().__init__(prob.ab0, prob.mse_fn, prob.s, prob.deadline)
        self.runs = group_runs(self.n, GROUPED[prob.s.solver])
        by_length: dict[int, list[int]] = {}
        for a, length in self.runs:
            by_length.setdefault(length, []).append(a + 1)  # positions in σ with the end (σ = 0) prepended
        self.by_length = {k: np.array(v) for k, v in by_length.items()}

    def grid_pass(self, y: np.ndarray, h: float, lo: np.ndarray, hi: np.ndarray) -> np.ndarray | None:
        return group_pass(self, y, h, lo, hi, k=OFFSETS if max(self.by_length) < 3 else OFFSETS_3)

    def _terms(self, ab: np.ndarray, grad: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """The groups' terms of trajectories ``[K, N]``; the gradient by complex steps of :func:`group_weights`, one
        per position in a group, all positions and groups in one call (a group's weights depend on its own values)."""
        s = np.sqrt((1 - ab) / ab)
        ext = np.concatenate([np.zeros_like(s[:, :1]), s], 1)
        m, dm = self.np_mse(ab)
        m = np.concatenate([np.zeros_like(m[:, :1]), m], 1)
        f, g_s, w2 = np.zeros(ab.shape[0]), np.zeros_like(ext), np.zeros_like(ext)
        for length, pos in self.by_length.items():
            cols = pos[None, :] + length - np.arange(length + 1)[:, None]  # [L + 1, groups]: values noisiest first
            v = ext[:, cols]  # [K, L + 1, groups]
            if grad:  # [L + 1 (the perturbed value), K, L + 1, groups]
                v = v + 1j * COMPLEX_STEP * np.eye(length + 1)[:, None, :, None]
            with np.errstate(divide="ignore", invalid="ignore"):
                ws = np.stack(group_weights(list(np.moveaxis(v, -2, 0)), list(-np.log(np.moveaxis(v, -2, 0)))), -2)
            w = ws[0].real if grad else ws  # [K, L, groups]
            me = m[:, cols[:length]]
            f += (w * w * me).sum((-1, -2))
            w2[:, cols[:length]] = w * w
            if grad:
                part = (2 * w * me * ws.imag / COMPLEX_STEP).sum(-2)  # [L + 1, K, groups]
                for j in range(length + 1):
                    g_s[:, cols[j]] += part[j]
        if not grad:
            return f, None
        return f, g_s[:, 1:] * (-0.5 / (s * ab * ab)) + w2[:, 1:] * dm


def _on_axis(arr: np.ndarray, a: np.ndarray, length: int, j: int, g: int) -> np.ndarray:
    """Rows ``a + j`` of ``arr [N, G]`` shaped ``[groups, 1, .., G (axis j + 1), .., 1]`` (``length + 1`` values)."""
    sh = [a.size] + [1] * (length + 1)
    sh[j + 1] = g
    return arr[a + j].reshape(sh)


def group_pass(prob: GroupedProblem, y: np.ndarray, h: float, lo: np.ndarray | None = None,
               hi: np.ndarray | None = None, k: int = OFFSETS) -> np.ndarray | None:
    """The best point of the grid ``z_i + h·(-k..k)`` for a :class:`GroupedProblem` (``None`` if no position is
    allowed): :func:`~.chain.grid_pass` with the groups as links, a group's interior values minimised with it."""
    lo = prob.lo if lo is None else lo
    hi = prob.hi if hi is None else hi
    ks = np.arange(-k, k + 1)
    g = ks.size
    with np.errstate(all="ignore"):
        zz, ab, ok = _nodes(prob, y, h * ks, lo, hi)
        s = np.sqrt((1 - ab) / ab)
        lam, m = -np.log(s), prob.np_mse(ab)[0]
        allowed, ok0 = _transitions(prob, y, h, ks, ok, lo, hi)
        bar = np.where(allowed, 0.0, np.inf)  # [N - 1, G, G]: value i, value i + 1
        value = np.where(ok0, s[0] ** 2 * m[0], np.inf)  # the step into σ = 0
        cost: dict[int, np.ndarray] = {}
        for length, pos in prob.by_length.items():
            if length == 1 and pos[0] == 0:
                pos = pos[1:]  # (the step into σ = 0, done above)
            if not pos.size:
                continue
            a = pos - 1  # cleanest value of each group; axes (group, a, a+1, ..., a+L), cleanest first
            vals = [_on_axis(s, a, length, length - j, g) for j in range(length + 1)]  # noisiest first
            ws = group_weights(vals, [_on_axis(lam, a, length, length - j, g) for j in range(length + 1)])
            c = sum(w * w * _on_axis(m, a, length, length - j, g) for j, w in enumerate(ws))
            for j in range(length):  # the transitions between the group's consecutive values
                sh = [a.size] + [1] * (length + 1)
                sh[j + 1] = sh[j + 2] = g
                c = c + bar[a + j].reshape(sh)
            c[np.isnan(c)] = np.inf  # (positions outside (0, 1))
            cost.update({int(ai): ci for ai, ci in zip(a, c, strict=True)})
        back: list[np.ndarray] = []
        for a, length in prob.runs[1:]:
            total = (value.reshape([g] + [1] * length) + cost[a]).reshape(-1, g)
            j = total.argmin(0)
            back.append(j)
            value = total[j, np.arange(g)]
        if prob.penalty:
            value = value + prob.penalty * (ab[-1] - prob.end) ** 2
    q = int(np.argmin(value))
    if not np.isfinite(value[q]):
        return None
    idx = np.empty(prob.n, dtype=np.intp)
    idx[-1] = q
    for (a, length), j in zip(prob.runs[:0:-1], back[::-1], strict=True):
        idx[a:a + length] = np.unravel_index(j[idx[a + length]], [g] * length)
    prob.evals += g * g
    return moved(prob, y, h * ks[idx], lo, hi)
