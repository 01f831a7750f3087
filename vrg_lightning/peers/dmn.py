"""DMN: optimised time steps from an analytic bound on the solver's discretisation error (Xue et al., "Accelerating
Diffusion Sampling with Optimized Time Steps", CVPR 2024, arXiv 2402.17376), from the schedule and the solver alone
(no model call).

=================  ==========================================================================  ================
symbol             meaning                                                                     code
=================  ==========================================================================  ================
λ                  logSNR = log(ᾱ/(1-ᾱ)) of a step (the variables); ½λ = -log σ (DPM-Solver's)  ``lam``
λ₀ < ... < λ_N     the N+1 points of an N-step run: λ₀ = λ(ᾱ(t=T-1)), λ_N = λ(ᾱ(t=0))          ``lam``
x̂₀ₙ                the data prediction at point n                                              (``d`` in solvers)
Jₛₙ                weight of x̂₀ₙ in step s, in x/σ_vp units: x̃ₛ₊₁/σₛ₊₁ = x̃ₛ/σₛ + Σₙ Jₛₙ x̂₀ₙ          ``J[s, n]``
Dₙ                 the authors' scale of x̂₀ₙ's error, σ_vp²/α_vp = (1-ᾱₙ)/√ᾱₙ                      ``scale``
=================  ==========================================================================  ================

A data-prediction multistep solver (DPM-Solver++ family: DDIM, DPM-Solver++(2M)) updates x̃ₛ₊₁ = ρₛ x̃ₛ +
Σₙ wₛₙ x̂₀ₙ with ρₛ = σₛ₊₁/σₛ, an exponential integrator of d(x̃/σ)/d(½λ) = e^{½λ} x̂₀ (Lu et al. 2022b), so
Jₛₙ = wₛₙ/σₛ₊₁ (for DDIM, Jₛₛ = e^{½λₛ₊₁} - e^{½λₛ}). The weights are read off the toolkit's own solver
(:class:`~vrg_lightning.solvers.SolverRun`, fed data predictions that are unit vectors), so they are exactly the
coefficients ``sample`` uses, with its warm-up and lower-order final steps. The bound is the authors' (their
``sel_lambdas_lof_obj``)::

    B(λ) = Σ_{s ∈ W} ‖(Dₙ Jₛₙ)ₙ‖₂ + Σₙ |Σ_{s ∉ W} Dₙ Jₛₙ|,      W = {s < 3} ∪ {N-1}

(the first ``warmup_steps`` = 3 steps and the last one each count on their own, in root-sum-square; the others'
contributions to each x̂₀ₙ are summed before the absolute value). B is minimised over the N-1 interior λ with
``scipy.optimize.minimize(method="trust-constr")`` (BFGS Hessian, the exact gradient by autograd through the
solver's coefficients), the ends fixed, from the N+1 points of a DPM-Solver base (``init``, default ``logSNR``: the
authors' uniform-λ start). The steps stay monotone by construction: the gaps are λₖ₊₁ - λₖ = ``min_gap`` +
(λ_N - λ₀ - N·``min_gap``)·softmax(0, u)ₖ over free variables u. (The authors constrain λ linearly instead;
trust-constr's interior-point iterates leave such a region at times, where the solver's coefficients cannot be
evaluated, even with ``keep_feasible``.) The result is kept only when its bound is below the start's. As the
toolkit's DPM-Solver bases do, the trajectory keeps λ₀..λ_{N-1} and drops the end point λ_N: its last step lands
on σ = 0.

Covered solvers (:data:`DMN_SOLVERS`): ``ddim``, ``dpmsolver1`` (= DDIM) and ``dpmpp_2m``, the data-prediction
multistep methods the bound is derived for (the authors apply it to DPM-Solver++ and UniPC). Not covered: the
singlestep ``dpmsolver2``/``dpmsolver3`` (their steps restart from a group's first value, not from the previous
step), and ``deis``, ``plms``, ``pndm`` (Adams-Bashforth on ε̂ in σ, not exponential integrators in λ).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..io import from_plain_dict
from ..schedule import NoiseSchedule, alpha_bar_to_lambda
from ..solvers import SOLVERS, SolverRun
from ..trajectories import make_trajectory, validate_trajectory
from .common import PeerResult, check_int, check_number, in_schedule_range

__all__ = ["DMN_SOLVERS", "DMN_INITS", "DMNSettings", "check_dmn_solver", "step_weights", "dmn_bound", "dmn"]

DMN_SOLVERS: tuple[str, ...] = ("ddim", "dpmsolver1", "dpmpp_2m")
DMN_INITS: tuple[str, ...] = ("logSNR", "time_uniform", "time_quadratic")
PAPER = "Xue et al., CVPR 2024 (arXiv 2402.17376)"


@dataclass(frozen=True)
class DMNSettings:
    """Settings of :func:`dmn` (frozen; ``to_dict``/``from_dict`` round-trip).

    Args:
        init: the start, a DPM-Solver base (:data:`DMN_INITS`; ``logSNR`` is the authors' uniform-λ start).
        warmup_steps: the first steps that count on their own in the bound (the authors' ``truncNum`` = 3).
        min_gap: the smallest logSNR gap between consecutive points (> 0).
        max_iter: iterations of ``trust-constr``.
        gtol: its tolerance on the Lagrangian's gradient.
    """

    init: str = "logSNR"
    warmup_steps: int = 3
    min_gap: float = 1e-3
    max_iter: int = 1000
    gtol: float = 1e-8

    def __post_init__(self) -> None:
        if self.init not in DMN_INITS:
            raise ValueError(f"DMN init must be one of {', '.join(DMN_INITS)}; got {self.init!r}.")
        check_int("warmup_steps", self.warmup_steps, 0)
        check_int("max_iter", self.max_iter, 1)
        object.__setattr__(self, "min_gap", check_number("min_gap", self.min_gap, 0.0, open_lo=True))
        object.__setattr__(self, "gtol", check_number("gtol", self.gtol, 0.0, open_lo=True))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DMNSettings:
        """Inverse of :meth:`to_dict`; unknown keys are ignored, missing keys take their defaults."""
        return from_plain_dict(cls, d)


def check_dmn_solver(solver: str) -> str:
    """``solver`` if DMN's bound covers it (:data:`DMN_SOLVERS`), else a ``ValueError`` saying why not and what to
    use instead."""
    if solver not in SOLVERS:
        raise ValueError(f"Unknown solver {solver!r}; allowed: {', '.join(SOLVERS)}.")
    if solver not in DMN_SOLVERS:
        why = ("a singlestep method (its steps restart from a group's first value)" if solver.startswith("dpmsolver")
               else "an Adams-Bashforth-type method on the noise prediction, not an exponential integrator in logSNR")
        raise ValueError(f"DMN's error bound covers the data-prediction multistep solvers {', '.join(DMN_SOLVERS)}; "
                         f"{solver!r} is {why}. Use the 'gits' base or VRG for {solver!r}.")
    return solver


def step_weights(solver: str, alpha_bar: Tensor, end_alpha_bar: float) -> Tensor:
    """``J`` ``[N, N]``: weight of the data prediction at point n (column, noisiest first) in step s (row) of
    ``solver`` over ``alpha_bar`` (N values, cleanest first) ending at ``end_alpha_bar``, in x/σ_vp units
    (module docstring); differentiable in ``alpha_bar``.

    Example:
        >>> ab = torch.tensor([0.9, 0.5, 0.1], dtype=torch.float64)
        >>> J = step_weights("ddim", ab, 0.99)  # DDIM: J[s, s] = e^{λ_{s+1}/2} - e^{λ_s/2}, nothing else
        >>> e = (torch.cat([ab.flip(0), torch.tensor([0.99], dtype=torch.float64)]) / (1 - torch.cat(
        ...     [ab.flip(0), torch.tensor([0.99], dtype=torch.float64)]))).sqrt()
        >>> bool(torch.allclose(J, torch.diag(e[1:] - e[:-1])))
        True
    """
    check_dmn_solver(solver)
    run = SolverRun(solver, alpha_bar, final_alpha_bar=float(end_alpha_bar))
    n = alpha_bar.numel()
    unit = torch.eye(n, dtype=torch.float64)
    x = run.start(torch.zeros(n, dtype=torch.float64))  # x̃ and the predictions as coefficients of x̂₀ₙ = eₙ
    states, sigmas = [], []
    while not run.done:
        a = run.alpha_bar
        sigma = ((1 - a) / a).sqrt()
        xt = x / a.sqrt()
        states.append(xt)
        sigmas.append(sigma)
        x = run.send((xt - unit[run.index]) / sigma)  # ε̂ whose data prediction x̃ - σ ε̂ is unit vector n
    end = torch.tensor(float(end_alpha_bar), dtype=torch.float64)
    states.append(x / end.sqrt())
    sigmas.append(((1 - end) / end).sqrt())
    st, sg = torch.stack(states), torch.stack(sigmas)
    return (st[1:] - (sg[1:] / sg[:-1])[:, None] * st[:-1]) / sg[1:, None]


def _bound(solver: str, alpha_bar: Tensor, end_alpha_bar: float, warmup_steps: int) -> Tensor:
    J = step_weights(solver, alpha_bar, end_alpha_bar)
    ab = alpha_bar.flip(0)
    v = J * ((1 - ab) / ab.sqrt())[None, :]  # Dₙ Jₛₙ
    n = v.shape[0]
    alone = torch.zeros(n, dtype=torch.bool)
    alone[: min(warmup_steps, n)] = True
    alone[-1] = True
    own = torch.linalg.vector_norm(v[alone], dim=1).sum()
    return own + v[~alone].sum(0).abs().sum()


def dmn_bound(solver: str, alpha_bar: Tensor, end_alpha_bar: float, warmup_steps: int = 3) -> float:
    """The authors' bound B (module docstring) of ``solver`` over a trajectory ``alpha_bar`` (cleanest first) whose
    steps end at ``end_alpha_bar`` (λ_N, above its cleanest value; the schedule's ᾱ(t=0) in :func:`dmn`).

    Raises:
        ValueError: a solver the bound does not cover, an invalid trajectory or end point.

    Example:
        >>> ab = torch.tensor([0.9, 0.5, 0.1], dtype=torch.float64)
        >>> dmn_bound("ddim", ab, 0.99) < dmn_bound("ddim", torch.tensor([0.6, 0.5, 0.1], dtype=torch.float64), 0.99)
        True
    """
    ab = validate_trajectory(alpha_bar, "alpha_bar")
    check_int("warmup_steps", warmup_steps, 0)
    with torch.no_grad():
        return float(_bound(solver, ab, end_alpha_bar, warmup_steps))


def _start(schedule: NoiseSchedule, init: str, steps: int) -> np.ndarray:
    """The N+1 logSNR points of base ``init`` (noisiest first), its dropped end point ᾱ(t=0) included."""
    ab = make_trajectory(schedule, init, steps).flip(0)
    ab = torch.cat([ab, torch.tensor([schedule.alpha_bar_max], dtype=torch.float64)])
    return alpha_bar_to_lambda(ab).numpy()


def _trajectory(lam: np.ndarray, schedule: NoiseSchedule) -> Tensor:
    """ᾱ (cleanest first) of the points λ₀..λ_{N-1} (the end point dropped), the noisiest exactly ᾱ(t=T-1)."""
    ab = torch.sigmoid(torch.as_tensor(lam[:-1], dtype=torch.float64))
    ab[0] = schedule.alpha_bar_min
    return in_schedule_range(ab, schedule).flip(0)


def dmn(schedule: NoiseSchedule, solver: str, steps: int, settings: DMNSettings | None = None) -> PeerResult:
    """The DMN trajectory of ``steps`` values for ``solver`` on ``schedule`` (module docstring); no model call.

    Args:
        schedule: the model's noise schedule (the ends: ᾱ(t=T-1) and the dropped end point ᾱ(t=0)).
        solver: one of :data:`DMN_SOLVERS`.
        steps: the number of values (model evaluations), <= the schedule's ``num_train_timesteps``.
        settings: :class:`DMNSettings`.

    Returns:
        :class:`~vrg_lightning.peers.common.PeerResult`; its bound is never above its start's (the start is kept
        when the optimiser does not improve it); provenance ``bound_before``/``bound_after``, ``iterations``,
        ``message``, ``model_evaluations`` 0.

    Raises:
        ValueError: a solver the bound does not cover, a bad step count or settings.

    Example:
        >>> r = dmn(NoiseSchedule(), "dpmpp_2m", 5)
        >>> r.provenance["bound_after"] < r.provenance["bound_before"], r.alpha_bar.numel()
        (True, 5)
    """
    from scipy.optimize import BFGS, minimize

    s = settings or DMNSettings()
    if not isinstance(s, DMNSettings):
        raise ValueError(f"settings must be a DMNSettings; got {type(s).__name__}.")
    check_dmn_solver(solver)
    check_int("steps", steps, 1)
    t0 = time.perf_counter()
    lam0 = _start(schedule, s.init, steps)
    lo, hi = float(lam0[0]), float(lam0[-1])
    if steps > 1 and (hi - lo) / steps <= s.min_gap:
        raise ValueError(f"min_gap={s.min_gap} leaves no room for {steps} steps in the schedule's logSNR range "
                         f"[{lo:.4g}, {hi:.4g}]; use a smaller min_gap or fewer steps.")
    end = schedule.alpha_bar_max
    free = hi - lo - steps * s.min_gap  # what the gaps share above their floor

    def points(u: Tensor) -> Tensor:
        """λ₀..λ_{N-1} from u: gaps min_gap + free · softmax([0, u]), monotone by construction."""
        gaps = s.min_gap + free * torch.softmax(torch.cat([u.new_zeros(1), u]), 0)
        return lo + torch.cat([u.new_zeros(1), torch.cumsum(gaps, 0)[:-1]])

    def bound_of(u: np.ndarray) -> tuple[float, np.ndarray]:
        y = torch.tensor(u, dtype=torch.float64, requires_grad=True)
        value = _bound(solver, torch.sigmoid(points(y)).flip(0), end, s.warmup_steps)
        (g,) = torch.autograd.grad(value, y)
        return float(value.detach()), g.numpy()

    start = _trajectory(lam0, schedule)
    before = dmn_bound(solver, start, end, s.warmup_steps)
    ab, after, iterations, message = start, before, 0, "no interior step to move"
    if steps > 1:
        share = np.clip((np.diff(lam0) - s.min_gap) / free, 1e-12, None)
        with warnings.catch_warnings():  # BFGS's "delta_grad == 0" notes at the kinks of |.|
            warnings.simplefilter("ignore", UserWarning)
            res = minimize(bound_of, np.log(share[1:]) - np.log(share[0]), jac=True, method="trust-constr",
                           hess=BFGS(), options={"maxiter": s.max_iter, "gtol": s.gtol})
        iterations, message = int(res.nit), str(res.message)
        with torch.no_grad():
            inner = points(torch.as_tensor(res.x, dtype=torch.float64)).numpy()
        cand = _trajectory(np.concatenate([inner, [hi]]), schedule)
        value = dmn_bound(solver, cand, end, s.warmup_steps)
        if value < before:
            ab, after = cand, value
    prov = {"settings": s.to_dict(), "seconds": time.perf_counter() - t0, "model_evaluations": 0, "paper": PAPER,
            "bound_before": before, "bound_after": after, "iterations": iterations, "message": message,
            "end_alpha_bar": end}
    return PeerResult("dmn", solver, steps, ab, prov)
