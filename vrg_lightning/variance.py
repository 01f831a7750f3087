"""Cumulative prediction-error variance (cpe) of a sampling trajectory.

``cpe_paper`` is the published DDIM formula (VRG paper, eq. for DDIM), the one form of it in the package::

    cpe = Σ_i (s_i - s_{i-1})² · MSE(ᾱ_i),   s = √((1-ᾱ)/ᾱ),  s_{-1} = 0   (cleanest step first)

batched over ``[..., N]`` trajectories, optionally with a weight per term (the damped cpe of
:mod:`vrg_lightning.optimize.discretization`). :func:`cpe_paper_numpy` is its float64 numpy twin with an analytic
gradient, the optimizer's fast path; a test holds the two together.

``cpe_solver`` is its solver-aware generalisation. Every solver is linear in the model outputs, so its
final sample is ``c·x_start + Σ_j w_j ε̂_j``; an error δ_j in evaluation j moves it by ``w_j δ_j``, and with
independent errors of per-dimension variance MSE(ᾱ_j) (the paper's assumption)::

    cpe_solver = Σ_j w_j² · MSE(ᾱ_j)

The weights come from running the solver code itself (``solvers.SolverRun``) on a one-hot basis, so they
are exact for that code and differentiable in the trajectory. For the solvers of :data:`DDIM_LIKE` they are
s_{j-1} - s_j and ``cpe_solver`` equals ``cpe_paper``.

Shared aliases: :data:`MSEFn` (a differentiable MSE(ᾱ)), :data:`NumpyMSEFn` (its numpy value and derivative),
:data:`EpsFn` (a noise predictor ``eps_fn(x, alpha_bar)``, from :mod:`vrg_lightning.solvers`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .schedule import alpha_bar_to_sigma
from .solvers import SOLVERS, EpsFn, SolverRun, _check_final, _check_options
from .trajectories import validate_trajectory

__all__ = [
    "cpe_paper",
    "cpe_paper_numpy",
    "DDIM_LIKE",
    "EpsFn",
    "MSEFn",
    "NumpyMSEFn",
    "OBJECTIVES",
    "Propagation",
    "propagation",
    "propagation_weights",
    "cpe_solver",
    "cpe",
    "objective_for_cpe",
    "cpe_contributions",
]

OBJECTIVES = ("paper", "solver")
DDIM_LIKE = ("ddim", "dpmsolver1")  # Euler in σ: their solver-aware cpe is the paper's formula (tested)

MSEFn = Callable[[Tensor], Tensor]
NumpyMSEFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]  # ᾱ -> (MSE, dMSE/dᾱ), float64


def cpe_paper(alpha_bar: Tensor, mse: MSEFn, weights: Tensor | None = None) -> Tensor:
    """The paper's DDIM cpe of trajectories ``alpha_bar`` ``[..., N]`` (cleanest first) -> ``[...]``; differentiable.

    ``Σ_i (s_i - s_{i-1})² MSE(ᾱ_i) [· weights_i]``, ``s = √((1-ᾱ)/ᾱ)``, ``s_{-1} = 0``; ``weights`` (broadcast
    against ``alpha_bar``) multiply each term.

    Example:
        >>> ab = torch.tensor([0.9, 0.5], dtype=torch.float64)
        >>> round(float(cpe_paper(ab, lambda a: torch.ones_like(a))), 6)
        0.555556
        >>> cpe_paper(torch.stack([ab, ab]), lambda a: torch.ones_like(a)).shape
        torch.Size([2])
    """
    return _paper_terms(alpha_bar, mse, weights).sum(-1)


def _paper_terms(alpha_bar: Tensor, mse: MSEFn, weights: Tensor | None = None) -> Tensor:
    """(s_i - s_{i-1})² MSE(ᾱ_i) [· weights_i], cleanest step first (s_{-1} = 0), over the last axis."""
    s = alpha_bar_to_sigma(alpha_bar)
    terms = torch.diff(s, dim=-1, prepend=torch.zeros_like(s[..., :1])) ** 2 * mse(alpha_bar)
    return terms if weights is None else terms * weights


def cpe_paper_numpy(
    alpha_bar: np.ndarray, mse: NumpyMSEFn, *, grad: bool = False, weights: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """:func:`cpe_paper` of each row of ``alpha_bar`` ``[K, N]`` in float64 numpy, and optionally its gradient.

    Args:
        alpha_bar: trajectories, cleanest first (any values; non-finite results are the caller's to handle).
        mse: numpy MSE returning ``(MSE(ᾱ), dMSE/dᾱ)``, e.g. ``PiecewiseLinearMSE.value_and_grad``.
        grad: also return ``d cpe / d alpha_bar`` ``[K, N]``.
        weights: a weight per term (broadcast against ``alpha_bar``), as ``cpe_paper``'s.

    Returns:
        ``(cpe [K], gradient [K, N] or None)``.

    Example:
        >>> ab = np.array([[0.9, 0.5]])
        >>> f, g = cpe_paper_numpy(ab, lambda a: (np.ones_like(a), np.zeros_like(a)), grad=True)
        >>> round(float(f[0]), 6), g.shape
        (0.555556, (1, 2))
    """
    s = np.sqrt((1 - alpha_bar) / alpha_bar)
    ds = s.copy()
    ds[..., 1:] -= s[..., :-1]  # s_i - s_{i-1}, s_{-1} = 0
    m, dm = mse(alpha_bar)
    if weights is not None:
        m, dm = m * weights, dm * weights
    f = (ds * ds * m).sum(-1)
    if not grad:
        return f, None
    ds_dab = -0.5 / (s * alpha_bar * alpha_bar)
    g = 2 * ds * ds_dab * m + ds * ds * dm
    g[..., :-1] -= 2 * ds[..., 1:] * ds_dab[..., :-1] * m[..., 1:]
    return f, g


@dataclass(frozen=True)
class Propagation:
    """How a solver carries model outputs into its final sample: ``x_final = x_coef·x_start + Σ_j weights_j ε̂_j``.

    Attributes:
        weights: ``[M]`` float64, one per model evaluation, **cleanest evaluation first** (reverse evaluation
            order), so for solvers with one evaluation per trajectory value ``weights[j]`` belongs to ``alpha_bar[j]``.
        alpha_bar: ``[M]`` the ᾱ of each evaluation, same order (the trajectory itself unless the solver evaluates
            twice at a value, ``plms``, or at midpoints, ``pndm``); differentiable in the trajectory.
        x_coef: 0-d, the coefficient of the starting sample.
    """

    weights: Tensor
    alpha_bar: Tensor
    x_coef: Tensor


def propagation(solver: str, alpha_bar: Tensor, *, final_alpha_bar: float = 1.0, **options: Any) -> Propagation:
    """Propagation weights of ``solver`` over a trajectory, by running the solver on a one-hot basis.

    ``x`` is the basis vector of the start ([M+1, 1], float64) and the k-th model evaluation returns the k-th basis
    vector, so the solver's output holds (w_1, ..., w_M, c). Autograd flows to ``alpha_bar``. A batch ``[B, n]`` of
    trajectories (same length) is one run: weights and levels ``[B, M]``, ``x_coef`` ``[B]``.

    Example:
        >>> ab = torch.tensor([0.9, 0.5], dtype=torch.float64)
        >>> p = propagation("ddim", ab)
        >>> [round(float(w), 6) for w in p.weights], round(float(p.x_coef), 6)
        ([-0.333333, -0.666667], 1.414214)
    """
    if not torch.is_tensor(alpha_bar):
        alpha_bar = torch.as_tensor(alpha_bar, dtype=torch.float64)
    run = SolverRun(solver, alpha_bar, final_alpha_bar=final_alpha_bar, **options)
    m = run.num_evaluations
    basis = torch.eye(m + 1, dtype=torch.float64, device=alpha_bar.device).unsqueeze(-1)
    levels: list[Tensor] = []
    x = run.start(basis[m])
    while not run.done:
        levels.append(run.alpha_bar)
        x = run.send(basis[len(levels) - 1])
    weights, at = x[:m].flip(0), torch.stack(levels).flip(0)
    if alpha_bar.ndim == 1:
        return Propagation(weights=weights[:, 0], alpha_bar=at, x_coef=x[m, 0])
    return Propagation(weights=weights.T, alpha_bar=at.T, x_coef=x[m])


def propagation_weights(solver: str, alpha_bar: Tensor, *, final_alpha_bar: float = 1.0, **options: Any) -> Tensor:
    """The weights w_j of :func:`propagation` (cleanest evaluation first)."""
    return propagation(solver, alpha_bar, final_alpha_bar=final_alpha_bar, **options).weights


def _ddim_weights(alpha_bar: Tensor, final_alpha_bar: float) -> Tensor:
    """Closed form of the ddim (= dpmsolver1) weights, cleanest first: w_j = √ᾱ_end (s_{j-1} - s_j), s_{-1} = σ_end."""
    s = alpha_bar_to_sigma(alpha_bar)
    s_end = math.sqrt((1 - final_alpha_bar) / final_alpha_bar)
    return -torch.diff(s, prepend=s.new_full((1,), s_end)) * math.sqrt(final_alpha_bar)


def _solver_terms(
    alpha_bar: Tensor, mse: MSEFn, solver: str, final_alpha_bar: float, options: dict[str, Any]
) -> Tensor:
    """w_j² MSE(ᾱ_j), cleanest evaluation first; ddim/dpmsolver1 use their closed form (same numbers, tested)."""
    if solver in DDIM_LIKE and not options:
        ab = validate_trajectory(alpha_bar, "alpha_bar")
        final = _check_final(final_alpha_bar, ab)
        return _ddim_weights(ab, final) ** 2 * mse(ab)
    p = propagation(solver, alpha_bar, final_alpha_bar=final_alpha_bar, **options)
    return p.weights**2 * mse(p.alpha_bar)


def cpe_solver(alpha_bar: Tensor, mse: MSEFn, solver: str, *, final_alpha_bar: float = 1.0, **options: Any) -> Tensor:
    """Solver-aware cpe Σ_j w_j² MSE(ᾱ_j) of a trajectory (cleanest first); differentiable in ``alpha_bar``.

    Example:
        >>> ab = torch.tensor([0.9, 0.5], dtype=torch.float64)
        >>> one = lambda a: torch.ones_like(a)
        >>> round(float(cpe_solver(ab, one, "ddim")), 6), round(float(cpe_solver(ab, one, "dpmpp_2m")), 6)
        (0.555556, 0.555556)
    """
    _check_options(solver, options)
    return _solver_terms(alpha_bar, mse, solver, final_alpha_bar, options).sum()


def objective_for_cpe(objective: str | None) -> str:
    """The cpe objective to report for a stored entry: its own when it is one of :data:`OBJECTIVES`, else ``paper``.

    Tuned entries record how they were made (``"base"``, ``"disc"``), which is not a cpe objective.
    """
    return objective if objective in OBJECTIVES else "paper"


def _check_objective(objective: str, solver: str | None) -> None:
    if objective not in OBJECTIVES:
        raise ValueError(f"Unknown objective {objective!r}; allowed: {', '.join(OBJECTIVES)}.")
    if solver is not None:
        _check_options(solver, {})
    elif objective == "solver":
        raise ValueError(f"objective='solver' needs solver=<name>; allowed: {', '.join(SOLVERS)}.")


def cpe_contributions(
    alpha_bar: Tensor,
    mse: MSEFn,
    objective: str = "paper",
    solver: str | None = None,
    *,
    final_alpha_bar: float = 1.0,
    **options: Any,
) -> Tensor:
    """Per-evaluation terms of :func:`cpe` (they sum to it), cleanest evaluation first.

    ``paper``: (s_i - s_{i-1})² MSE(ᾱ_i), one per trajectory value (``solver`` and options are not used: the
    published formula is DDIM's, applied to every solver). ``solver``: w_j² MSE(ᾱ_j), one per model evaluation,
    at the noise levels ``propagation(...).alpha_bar`` (the trajectory, except for ``plms`` and ``pndm``).
    """
    _check_objective(objective, solver)
    if objective == "paper":
        return _paper_terms(validate_trajectory(alpha_bar, "alpha_bar"), mse)
    _check_options(solver, options)
    return _solver_terms(alpha_bar, mse, solver, final_alpha_bar, options)


def cpe(
    alpha_bar: Tensor,
    mse: MSEFn,
    objective: str = "paper",
    solver: str | None = None,
    *,
    final_alpha_bar: float = 1.0,
    **options: Any,
) -> Tensor:
    """The cpe of a trajectory for an objective: ``paper`` (:func:`cpe_paper`) or ``solver`` (:func:`cpe_solver`).

    Example:
        >>> ab = torch.tensor([0.9, 0.5, 0.2], dtype=torch.float64)
        >>> one = lambda a: torch.ones_like(a)
        >>> bool(torch.isclose(cpe(ab, one, "paper"), cpe(ab, one, "solver", "ddim")))
        True
    """
    return cpe_contributions(alpha_bar, mse, objective, solver, final_alpha_bar=final_alpha_bar, **options).sum()
