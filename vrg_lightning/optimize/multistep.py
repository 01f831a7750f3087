"""The solver-aware loss of the multistep solvers ``dpmpp_2m`` and ``deis`` in closed form, with its gradient: a fast
path of :func:`~vrg_lightning.variance.propagation` for them (tested equal to it, and its gradient to autograd).

Both are linear multistep methods in x̃ (noisiest value first, step i from value i to i+1, σ_n = 0)::

    x̃_{i+1} = (1 - B_i) x̃_i + B_i x̃_{i-1} + Σ_j C_{j,i} ε̂_{i-j}

``dpmpp_2m`` (``solvers._dpmpp_2m``, ``x̃ ← ρ x̃ + a x̂₀_i + b x̂₀_{i-1}`` with x̂₀ = x̃ - σ ε̂ and ρ + a + b = 1):
``B = b``, ``C_0 = -a σ_i``, ``C_1 = -b σ_{i-1}``; ``deis`` (``solvers._deis``): ``B = 0``, ``C_j`` its Lagrange
integrals; a first-order step ``B = 0``, ``C_0 = σ_{i+1} - σ_i``. The coefficients are the solver's own formulas
(:func:`~vrg_lightning.solvers.dpmpp_2m_coefficients`, :func:`~vrg_lightning.solvers.deis_coefficients`), evaluated
in numpy. With ``P_k = ∂x̃_n/∂x̃_k`` (``P_n = 1``, ``P_k = 1 - B_k P_{k+1}``: the coefficients of x̃ sum to 1)
the weight of evaluation k is ``w_k = Σ_j P_{k+j+1} C_{j,k+j}``. The recurrences are solved by doubling (log n
vector operations), the gradient of ``Σ_k w_k² MSE(ᾱ_k)`` by the adjoint of these formulas, and the coefficients'
own derivatives by complex steps: a step's coefficients depend on the values ``i-o+1 .. i+1`` only (o its order), so
``o + 1`` perturbed evaluations, each moving every ``(o+1)``-th value, give all of them.
"""

from __future__ import annotations

import numpy as np

from ..solvers import _multistep_orders, deis_coefficients, dpmpp_2m_coefficients
from ..variance import NumpyMSEFn
from .groups import COMPLEX_STEP
from .problem import SearchProblem

__all__ = ["MULTISTEP", "MultistepProblem", "multistep_weights", "multistep_terms"]

MULTISTEP = {"dpmpp_2m": 2, "deis": 3}  # solver -> its order (``lower_order_final`` as the solvers' default)


def _coefficients(solver: str, ab: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(B [..., n], C [3, ..., n])`` of trajectories ``ab [..., n]`` (noisiest first; real or complex)."""
    n = ab.shape[-1]
    orders = np.array(_multistep_orders(n, MULTISTEP[solver], True, True))
    s = np.sqrt((1 - ab) / ab)
    s_next = np.concatenate([s[..., 1:], np.zeros_like(s[..., :1])], -1)  # σ_{i+1}, σ_n = 0
    lam = -np.log(s)
    b, c = np.zeros_like(ab), np.zeros((3, *ab.shape), dtype=ab.dtype)
    one = np.flatnonzero(orders == 1)
    c[0][..., one] = s_next[..., one] - s[..., one]
    if solver == "dpmpp_2m":
        i = np.flatnonzero(orders == 2)
        _, a, bi = dpmpp_2m_coefficients(s_next[..., i], s[..., i], lam[..., i + 1] - lam[..., i],
                                         lam[..., i] - lam[..., i - 1])
        b[..., i], c[0][..., i], c[1][..., i] = bi, -a * s[..., i], -bi * s[..., i - 1]
    else:
        for o in (2, 3):
            i = np.flatnonzero(orders == o)
            if i.size:
                cs = deis_coefficients(s_next[..., i], -lam[..., i + 1], [-lam[..., i - j] for j in range(o)],
                                       s[..., i])
                for j, cj in enumerate(cs):
                    c[j][..., i] = cj
    return b, c


def _suffix(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``x_k = u_k + v_k x_{k+1}`` along the last axis, solved from the end (``v`` of the last entry 0), by doubling."""
    u, v, d, m = u.copy(), v.copy(), 1, u.shape[-1]
    while d < m:
        u[..., :-d] = u[..., :-d] + v[..., :-d] * u[..., d:]
        v[..., :-d] = v[..., :-d] * v[..., d:]
        d *= 2
    return u


def _propagate(b: np.ndarray, c: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
    """``(P [..., n+1] or None when B = 0, w [..., n])``, noisiest first."""
    n = b.shape[-1]
    pad = np.zeros((3, *b.shape[:-1], 2), dtype=c.dtype)
    cp = np.concatenate([c, pad], -1)  # C_{j, i} for i up to n + 1 (zero past the last step)
    if not b.any():
        return None, cp[0, ..., :n] + cp[1, ..., 1:n + 1] + cp[2, ..., 2:n + 2]
    ones = np.ones_like(b[..., :1])
    p = _suffix(np.concatenate([np.ones_like(b), ones], -1), np.concatenate([-b, 0 * ones], -1))
    pp = np.concatenate([p, 0 * ones, 0 * ones], -1)  # P_k for k up to n + 2
    w = sum(pp[..., j + 1:j + 1 + n] * cp[j, ..., j:j + n] for j in range(3))
    return p, w


def multistep_weights(solver: str, ab: np.ndarray) -> np.ndarray:
    """The weights of :func:`~vrg_lightning.variance.propagation` of ``solver`` (:data:`MULTISTEP`, final ᾱ 1,
    default options) for each row of ``ab [K, N]`` (cleanest first), cleanest evaluation first.

    Example:
        >>> import torch
        >>> from vrg_lightning.variance import propagation
        >>> ab = np.array([[0.99, 0.7, 0.3, 0.05]])
        >>> w = propagation("dpmpp_2m", torch.tensor(ab[0])).weights.numpy()
        >>> bool(np.allclose(multistep_weights("dpmpp_2m", ab)[0], w, rtol=1e-13))
        True
    """
    b, c = _coefficients(solver, ab[..., ::-1])
    return np.ascontiguousarray(_propagate(b, c)[1][..., ::-1])


def multistep_terms(solver: str, ab: np.ndarray, mse: NumpyMSEFn, grad: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """``Σ_k w_k² MSE(ᾱ_k)`` of each row of ``ab [K, N]`` (cleanest first) and optionally its gradient in ᾱ
    (``mse``: numpy ``(MSE, dMSE/dᾱ)``)."""
    x = np.ascontiguousarray(ab[..., ::-1])  # noisiest first (contiguous: a torch MSE takes it too)
    m, dm = mse(x)
    if not grad:
        b, c = _coefficients(solver, x)
        w = _propagate(b, c)[1]
        return (w * w * m).sum(-1), None
    k, n = x.shape[0], x.shape[1]
    colors = MULTISTEP[solver] + 1
    pert = (np.arange(n)[None, :] % colors == np.arange(colors)[:, None])  # [R, n]: colour r moves values ≡ r
    xc = x[None] + 1j * COMPLEX_STEP * pert[:, None, :]  # [R, K, n]
    bc, cc = _coefficients(solver, xc)
    b, c = bc[0].real, cc[:, 0].real
    p, w = _propagate(b, c)
    omega = 2 * w * m  # d loss / d w
    # adjoint: C̄_{j,i} = ω_{i-j} P_{i+1}; P̄_p = Σ_j ω_{p-1-j} C_{j,p-1} - B_{p-1} P̄_{p-1}; B̄_k = -P̄_k P_{k+1}
    p_next = np.ones((k, n)) if p is None else p[:, 1:]
    cbar = np.zeros((3, k, n))
    for j in range(3):
        cbar[j][:, j:] = omega[:, :n - j] * p_next[:, j:]
    bbar = None
    if p is not None:
        direct = np.zeros((k, n + 1))  # D_p, p = 0..n
        for j in range(3):
            direct[:, 1 + j:] += omega[:, :n - j] * c[j][:, j:]
        back = np.concatenate([-b[:, ::-1], np.zeros((k, 1))], -1)  # P̄ from p = n down to 0: v_p = -B_{p-1}
        pbar = _suffix(direct[:, ::-1], back)[:, ::-1]
        bbar = -pbar[:, :n] * p_next
    g = w * w * dm
    idx = np.arange(n)
    for d in range(-(colors - 2), 2):  # the coefficients of step i move with value i + d
        i = idx[(idx + d >= 0) & (idx + d < n)]
        r = (i + d) % colors
        part = (cbar[:, :, i] * cc[:, r, :, i].transpose(1, 2, 0).imag).sum(0)
        if bbar is not None:
            part = part + bbar[:, i] * bc[r, :, i].T.imag
        g[:, i + d] += part / COMPLEX_STEP
    return (w * w * m).sum(-1), np.ascontiguousarray(g[:, ::-1])


class MultistepProblem(SearchProblem):
    """The exact solver-aware loss of ``dpmpp_2m`` or ``deis`` (:data:`MULTISTEP`) in a problem's variables: the
    same box, start and penalty; its terms are :func:`multistep_terms`."""

    def __init__(self, prob: SearchProblem) -> None:
        super().__init__(prob.ab0, prob.mse_fn, prob.s, prob.deadline)

    def _terms(self, ab: np.ndarray, grad: bool) -> tuple[np.ndarray, np.ndarray | None]:
        with np.errstate(all="ignore"):
            return multistep_terms(self.s.solver, ab, self.np_mse, grad)
