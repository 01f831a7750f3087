"""Diffusion ODE solvers over a continuous ᾱ trajectory, one implementation each.

Every solver integrates the probability-flow ODE of a variance-preserving model from the noisiest
trajectory value down to ``final_alpha_bar`` (default 1: σ = 0, the clean sample). Each is written once, as a
generator that yields every model input (x, ᾱ) and is sent ε̂ (:class:`SolverRun`); the same code serves
:func:`sample`, the diffusers ``VRGScheduler`` and error analysis (``variance.propagation``). It works in the scaled
variables

==========  ================================================  ===========
symbol      meaning                                           code
==========  ================================================  ===========
x̃           x / √ᾱ  (``x̃ = x₀ + σ ε``)                          ``xt``
σ           √((1-ᾱ)/ᾱ)                                          ``g.s[i]``
λ           -log σ = ½ logSNR (DPM-Solver's λ)                  ``g.lam[i]``
x̂₀          x̃ - σ ε̂, the data prediction                       ``d``
==========  ================================================  ===========

where the ODE is ``dx̃/dσ = ε̂(x̃, σ)`` and DDIM is its Euler step ``x̃ ← x̃ + (σ' - σ) ε̂`` (finite at σ' = 0).
Step i goes from trajectory value i (noisiest first) to value i+1, the last one to ``final_alpha_bar``.

=============  ============================================================================  ====================
solver         method                                                                        model evaluations
=============  ============================================================================  ====================
``ddim``       DDIM, η = 0 (Song et al. 2021)                                                N
``dpmsolver1`` singlestep DPM-Solver++ order 1 (= DDIM)                                      N
``dpmsolver2`` singlestep DPM-Solver++(2S), data prediction, midpoint (Lu et al. 2022b)      N
``dpmsolver3`` singlestep DPM-Solver++(3S), data prediction, midpoint form of diffusers      N
``dpmpp_2m``   multistep DPM-Solver++(2M), data prediction, midpoint                         N
``deis``       multistep tAB-DEIS in ρ = σ, Lagrange basis in log ρ (Zhang & Chen 2023)      N
``plms``       PLMS: pseudo linear multistep with a Heun first step (Liu et al. 2022)        N + 1 (N ≥ 2)
``pndm``       F-PNDM: 3 Runge-Kutta (pseudo RK4) steps, then 4th-order pseudo linear steps  N + 9 (N ≥ 4)
=============  ============================================================================  ====================

Options and lower-order rules (they reproduce diffusers 0.42 on trajectories it can represent):

- singlestep ``dpmsolver{1,2,3}`` group consecutive trajectory values as ``DPMSolverSinglestepScheduler``:
  a group of order k starts with a first-order step, its intermediate points are trajectory values, and
  ``lower_order_final`` (default True; forced when N is not a multiple of the order or the end is σ = 0) ends
  with lower-order groups. Too few values for the order give lower-order groups, never an error.
- multistep ``dpmpp_2m`` and ``deis`` (``order`` 1, 2 or 3, default 3) warm up with lower orders; with
  ``lower_order_final`` (default True) and N < 15 the last two steps use orders ≤ 1 and ≤ 2.
- The step into σ = 0 is first order for all DPM-Solver and DEIS variants (diffusers' ``final_sigmas_type="zero"``):
  there the higher-order DPM-Solver++ midpoint term diverges (h = ∞). ``pndm``/``plms`` keep their order
  (their transfer is DDIM's, finite at σ = 0).
- ``plms`` (``PNDMScheduler(skip_prk_steps=True)``): the second noisiest value is evaluated twice (Euler predictor,
  then the corrected sample). ``pndm`` (``skip_prk_steps=False``): the three noisiest steps are pseudo RK4 steps,
  each evaluating at its start, twice at a midpoint and at its end; ``midpoint(ab_a, ab_b) -> ab_mid`` chooses the
  midpoint (default: the logSNR midpoint σ = √(σ_a σ_b); diffusers uses the integer timestep midway).
  The pseudo linear multistep coefficients are the constant Adams-Bashforth ones, as in the paper and diffusers.

All formulas are differentiable in ``alpha_bar`` (no ``.item()`` in the arithmetic; the multistep coefficient
functions are arithmetic only, shared with the optimizer's numpy fast path); x may be any float dtype on
any device (coefficients are 0-d float64 tensors on the trajectory's device, so x keeps its dtype). ``sample`` does
not change the grad mode: wrap it in ``torch.no_grad()`` for sampling.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator
from typing import Any

import torch
from torch import Tensor

from .schedule import alpha_bar_to_sigma
from .trajectories import validate_trajectory

__all__ = ["SOLVERS", "EpsFn", "SolverRun", "sample", "num_evaluations", "solver_options", "dpmpp_2m_coefficients",
           "deis_coefficients"]

EpsFn = Callable[[Tensor, Tensor], Tensor]
Callback = Callable[[dict[str, Any]], None]
_Run = Generator[Any, Tensor, Tensor]  # yields (x, ᾱ) per model evaluation, is sent ε̂, returns x̃

SOLVERS: tuple[str, ...] = ("ddim", "dpmsolver1", "dpmsolver2", "dpmsolver3", "dpmpp_2m", "pndm", "plms", "deis")
_OPTIONS: dict[str, tuple[str, ...]] = {
    "ddim": (),
    "dpmsolver1": ("lower_order_final",),
    "dpmsolver2": ("lower_order_final",),
    "dpmsolver3": ("lower_order_final",),
    "dpmpp_2m": ("lower_order_final",),
    "pndm": ("midpoint",),
    "plms": (),
    "deis": ("order", "lower_order_final"),
}
_AB = {1: (1.0,), 2: (1.5, -0.5), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def solver_options(solver: str) -> tuple[str, ...]:
    """The keyword options ``solver`` accepts."""
    _check_solver(solver)
    return _OPTIONS[solver]


def _check_solver(solver: str) -> None:
    if solver not in SOLVERS:
        raise ValueError(f"Unknown solver {solver!r}; allowed: {', '.join(SOLVERS)}.")


def _check_options(solver: str, options: dict[str, Any]) -> None:
    _check_solver(solver)
    bad = sorted(set(options) - set(_OPTIONS[solver]))
    if bad:
        allowed = ", ".join(_OPTIONS[solver]) or "none"
        raise ValueError(f"Solver {solver!r} got unknown option(s) {', '.join(bad)}; allowed: {allowed}.")
    if "lower_order_final" in options and not isinstance(options["lower_order_final"], bool):
        raise ValueError(f"lower_order_final must be True or False; got {options['lower_order_final']!r}.")
    if "order" in options and (isinstance(options["order"], bool) or options["order"] not in (1, 2, 3)):
        raise ValueError(f"deis order must be 1, 2 or 3; got {options['order']!r}.")
    if options.get("midpoint") is not None and not callable(options["midpoint"]):
        raise ValueError(f"midpoint must be a callable (ab_a, ab_b) -> ab_mid or None; got {options['midpoint']!r}.")


def num_evaluations(solver: str, steps: int) -> int:
    """Number of model evaluations (NFE) of ``solver`` over a trajectory of ``steps`` values.

    Example:
        >>> [num_evaluations(s, 10) for s in ("ddim", "plms", "pndm")]
        [10, 11, 19]
    """
    _check_solver(solver)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be a positive integer; got {steps!r}.")
    if solver == "pndm":
        if steps < 4:
            raise ValueError(
                f"Solver 'pndm' needs a trajectory of at least 4 values (3 Runge-Kutta warm-up steps, then "
                f"pseudo linear multistep); got {steps}. Use 'plms' for shorter trajectories."
            )
        return steps + 9
    if solver == "plms":
        return steps + 1 if steps >= 2 else 1
    return steps


class _Grid:
    """Noise levels noisiest first: entries 0..n-1 are the trajectory, entry n the end point of sampling.

    ``s``, ``lam`` are vectors (for coefficients computed for many steps at once); ``ab``, ``sqrt_ab``, ``ds``
    (σ_{i+1} - σ_i) are lists of 0-d tensors. The end point is a constant: its σ (maybe 0) and λ (maybe ∞)
    never reach autograd, and no formula that needs λ_end is used when σ_end = 0.
    """

    def __init__(self, alpha_bar: Tensor, final_alpha_bar: float) -> None:
        ab = alpha_bar.flip(0)  # [n] or [n, B] (a batch of trajectories)
        self.dev = ab.device
        self.n = ab.shape[0]
        self.final_zero = final_alpha_bar == 1.0
        s = alpha_bar_to_sigma(ab)
        s_end = math.sqrt((1 - final_alpha_bar) / final_alpha_bar)
        lam_end = -math.log(s_end) if s_end > 0 else math.inf
        self.s = torch.cat([s, s.new_full((1, *s.shape[1:]), s_end)])
        self.lam = torch.cat([-torch.log(s), s.new_full((1, *s.shape[1:]), lam_end)])
        self.ab = [*ab.unbind(0), ab.new_tensor(final_alpha_bar)]
        self.sqrt_ab = list(ab.sqrt().unbind(0))
        self.ds = list((self.s[1:] - self.s[:-1]).unbind(0))

    def index(self, idx: list[int]) -> Tensor:
        return torch.tensor(idx, dtype=torch.long, device=self.dev)


def _ev(xt: Tensor, ab: Tensor, sqrt_ab: Tensor | None = None) -> _Run:
    """One model evaluation: yield the unscaled model input x = √ᾱ x̃ and ᾱ, receive ε̂ (``yield from``)."""
    return (yield xt * (ab.sqrt() if sqrt_ab is None else sqrt_ab), ab)


def _at(xt: Tensor, g: _Grid, i: int) -> _Run:
    return _ev(xt, g.ab[i], g.sqrt_ab[i])


# --- orders ---------------------------------------------------------------------------------------
def _singlestep_orders(n: int, order: int, final_zero: bool, lower_order_final: bool) -> list[int]:
    """Order of each step, as ``DPMSolverSinglestepScheduler.get_order_list`` after ``set_timesteps``."""
    if lower_order_final or final_zero or n % order:
        if order == 3:
            orders = [1, 2, 3] * (n // 3 - 1) + [1, 2, 1] if n % 3 == 0 else [1, 2, 3] * (n // 3) + [1, 2][: n % 3]
        elif order == 2:
            orders = [1, 2] * (n // 2 - 1) + [1, 1] if n % 2 == 0 else [1, 2] * (n // 2) + [1]
        else:
            orders = [1] * n
    else:
        orders = list(range(1, order + 1)) * (n // order)
    if final_zero:
        orders[-1] = 1
    return orders


def _multistep_orders(n: int, order: int, final_zero: bool, lower_order_final: bool) -> list[int]:
    """Order of each step, as diffusers' multistep DPM-Solver / DEIS ``step`` (warm-up and final steps)."""
    lof = lower_order_final and n < 15
    orders = [min(order, i + 1) for i in range(n)]
    if n >= 2 and lof:
        orders[-2] = min(orders[-2], 2)
    if final_zero or lof:
        orders[-1] = 1
    return orders


# --- solvers --------------------------------------------------------------------------------------
def _ddim(g: _Grid) -> _Run:
    """DDIM (η = 0): x̃ ← x̃ + (σ_{i+1} - σ_i) ε̂_i."""
    xt = yield None
    for i in range(g.n):
        xt = xt + g.ds[i] * (yield from _at(xt, g, i))
    return xt


def _singlestep(g: _Grid, order: int, lower_order_final: bool = True) -> _Run:
    """Singlestep DPM-Solver++ (data prediction, midpoint), arXiv 2211.01095, grouped as diffusers.

    A group starts at value k with sample x̃_k; step i of order o = i - k + 1 lands on value i+1 with
    h = λ_{i+1} - λ_k, r = (λ_i - λ_k)/h, ρ = σ_{i+1}/σ_k = e^{-h}, D₁ = (x̂₀_i - x̂₀_k)/r:
    order 2: x̃ = ρ x̃_k + (1-ρ)(x̂₀_k + D₁/2); order 3: x̃ = ρ x̃_k + (1-ρ) x̂₀_k + ((ρ-1)/h + 1) D₁.
    """
    orders = _singlestep_orders(g.n, order, g.final_zero, lower_order_final)
    coef: dict[int, tuple[Tensor, ...]] = {}
    hi = [i for i, o in enumerate(orders) if o > 1]
    if hi:  # all higher-order coefficients at once: ρ, 1-ρ and the factor of (x̂₀_i - x̂₀_k)
        i, k = g.index(hi), g.index([j - orders[j] + 1 for j in hi])
        h = g.lam[i + 1] - g.lam[k]
        rho = g.s[i + 1] / g.s[k]
        third = torch.tensor([orders[j] == 3 for j in hi], device=g.dev).view(-1, *([1] * (h.dim() - 1)))
        c1 = torch.where(third, (rho - 1) / h + 1, 0.5 * (1 - rho)) * h / (g.lam[i] - g.lam[k])
        coef = dict(zip(hi, zip(rho.unbind(0), (1 - rho).unbind(0), c1.unbind(0), strict=True), strict=True))
    xt = yield None
    start = d_start = xt
    for i, o in enumerate(orders):
        eps = yield from _at(xt, g, i)
        if o == 1:
            start, d_start = xt, xt - g.s[i] * eps
            xt = xt + g.ds[i] * eps
        else:
            rho, one_m_rho, c1 = coef[i]
            xt = rho * start + one_m_rho * d_start + c1 * (xt - g.s[i] * eps - d_start)
    return xt


def dpmpp_2m_coefficients(s_next: Any, s: Any, h: Any, h_prev: Any) -> tuple[Any, Any, Any]:
    """``(ρ, a, b)`` of a DPM-Solver++(2M) step ``x̃ ← ρ x̃ + a x̂₀_i + b x̂₀_{i-1}`` (ρ + a + b = 1) from σ_{i+1}, σ_i,
    h = λ_{i+1} - λ_i, h_prev = λ_i - λ_{i-1}."""
    rho = s_next / s
    half_q = 0.5 * h / h_prev
    return rho, (1 - rho) * (1 + half_q), -(1 - rho) * half_q


def _dpmpp_2m(g: _Grid, lower_order_final: bool = True) -> _Run:
    """DPM-Solver++(2M), arXiv 2211.01095 Alg. 2 (midpoint form of diffusers).

    h = λ_{i+1} - λ_i, r = (λ_i - λ_{i-1})/h, ρ = σ_{i+1}/σ_i: x̃ ← ρ x̃ + (1-ρ)(x̂₀_i + (x̂₀_i - x̂₀_{i-1})/(2r)).
    """
    orders = _multistep_orders(g.n, 2, g.final_zero, lower_order_final)
    coef: dict[int, tuple[Tensor, ...]] = {}
    hi = [i for i, o in enumerate(orders) if o > 1]
    if hi:  # x̃ ← ρ x̃ + a x̂₀_i + b x̂₀_{i-1}
        i = g.index(hi)
        rho, a, b = dpmpp_2m_coefficients(g.s[i + 1], g.s[i], g.lam[i + 1] - g.lam[i], g.lam[i] - g.lam[i - 1])
        coef = dict(zip(hi, zip(rho.unbind(0), a.unbind(0), b.unbind(0), strict=True), strict=True))
    xt = yield None
    d_prev = xt
    for i, o in enumerate(orders):
        eps = yield from _at(xt, g, i)
        d = xt - g.s[i] * eps
        if o == 1:
            xt = xt + g.ds[i] * eps
        else:
            rho, a, b = coef[i]
            xt = rho * xt + a * d + b * d_prev
        d_prev = d
    return xt


def deis_coefficients(s_next: Any, log_next: Any, nodes: list[Any], s_node: Any) -> list[Any]:
    """tAB-DEIS ``c_j = ∫_{σ_i}^{σ_{i+1}} ℓ_j(log ρ) dρ``, ℓ_j the Lagrange basis over ``nodes`` log σ_i, ...,
    log σ_{i-o+1} (newest first, o = 2 or 3); ``s_node`` = σ_i."""
    ends, coefs = ((s_next, log_next), (s_node, nodes[0])), []
    for j in range(len(nodes)):
        c = [u for k, u in enumerate(nodes) if k != j]
        if len(nodes) == 2:  # ∫ (v - c) dρ = ρ (v - c - 1),  v = log ρ
            f = [r * (v - c[0] - 1) for r, v in ends]
            den = nodes[j] - c[0]
        else:  # ∫ (v - c)(v - d) dρ = ρ (v² - 2v + 2 - (c + d)(v - 1) + c d)
            f = [r * (v * v - 2 * v + 2 - (c[0] + c[1]) * (v - 1) + c[0] * c[1]) for r, v in ends]
            den = (nodes[j] - c[0]) * (nodes[j] - c[1])
        coefs.append((f[0] - f[1]) / den)
    return coefs


def _deis(g: _Grid, order: int = 3, lower_order_final: bool = True) -> _Run:
    """tAB-DEIS (arXiv 2204.13902) in ρ = σ: x̃ ← x̃ + Σ_j c_j ε̂_{i-j}, c_j = ∫ ℓ_j(log ρ) dρ over [σ_i, σ_{i+1}]."""
    orders = _multistep_orders(g.n, order, g.final_zero, lower_order_final)
    coef: dict[int, tuple[Tensor, ...]] = {}
    for o in (2, 3):
        steps = [i for i, oi in enumerate(orders) if oi == o]
        if steps:  # all steps of order o at once
            i = g.index(steps)
            cs = deis_coefficients(g.s[i + 1], -g.lam[i + 1], [-g.lam[i - j] for j in range(o)], g.s[i])
            coef.update(zip(steps, zip(*(c.unbind(0) for c in cs), strict=True), strict=True))
    xt = yield None
    hist: list[Tensor] = []
    for i, o in enumerate(orders):
        hist = [(yield from _at(xt, g, i)), *hist[:2]]
        xt = xt + (g.ds[i] * hist[0] if o == 1 else sum(c * e for c, e in zip(coef[i], hist[:o], strict=True)))
    return xt


def _pseudo_linear(xt: Tensor, g: _Grid, i0: int, ets: list[Tensor]) -> _Run:
    """Pseudo linear multistep from value i0: x̃ ← x̃ + (σ_{i+1} - σ_i) Σ_j b_j ε̂_{i-j}, Adams-Bashforth b (≤ 4th)."""
    for i in range(i0, g.n):
        ets = [(yield from _at(xt, g, i)), *ets[:3]]
        e = sum(b * e for b, e in zip(_AB[len(ets)], ets, strict=True))
        xt = xt + g.ds[i] * e
    return xt


def _plms(g: _Grid) -> _Run:
    """PLMS (arXiv 2202.09778; diffusers ``PNDMScheduler(skip_prk_steps=True)``): Heun first step, then PLMS."""
    xt = yield None
    if g.n == 1:
        return (yield from _pseudo_linear(xt, g, 0, []))
    ds = g.ds[0]
    e0 = yield from _at(xt, g, 0)
    e1 = yield from _at(xt + ds * e0, g, 1)
    return (yield from _pseudo_linear(xt + ds * 0.5 * (e0 + e1), g, 1, [e0]))


def _logsnr_midpoint(ab_a: Tensor, ab_b: Tensor) -> Tensor:
    """ᾱ at the logSNR midpoint: σ = √(σ_a σ_b)."""
    return 1 / (1 + alpha_bar_to_sigma(ab_a) * alpha_bar_to_sigma(ab_b))


def _pndm(g: _Grid, midpoint: Callable[[Tensor, Tensor], Tensor] | None = None) -> _Run:
    """F-PNDM (arXiv 2202.09778 Alg. 2; diffusers ``PNDMScheduler(skip_prk_steps=False)``).

    Steps 0-2 are pseudo RK4 steps (ε̂ at the start, twice at the midpoint m, at the end; x̃ ← x̃ + Δσ (e₁+2e₂+2e₃+e₄)/6,
    each stage a DDIM transfer from the step's start), then 4th-order pseudo linear multistep.
    """
    num_evaluations("pndm", g.n)
    mid = _logsnr_midpoint if midpoint is None else midpoint
    xt = yield None
    ets: list[Tensor] = []
    for i in range(3):
        ab_m = mid(g.ab[i], g.ab[i + 1])
        if not torch.is_tensor(ab_m) or ab_m.shape != g.ab[i].shape or not bool(
                ((ab_m > g.ab[i]) & (ab_m < g.ab[i + 1])).all()):
            raise ValueError(
                f"midpoint must return a 0-d tensor strictly between its arguments {float(g.ab[i].max()):.8g} and "
                f"{float(g.ab[i + 1].min()):.8g}; got {ab_m!r}."
            )
        ab_m = ab_m.to(torch.float64)
        s0, sm, ds = g.s[i], alpha_bar_to_sigma(ab_m), g.ds[i]
        e1 = yield from _at(xt, g, i)
        e2 = yield from _ev(xt + (sm - s0) * e1, ab_m)
        e3 = yield from _ev(xt + (sm - s0) * e2, ab_m)
        e4 = yield from _at(xt + ds * e3, g, i + 1)
        xt = xt + ds * ((e1 + 2 * e2 + 2 * e3 + e4) / 6)
        ets = [e1, *ets]
    return (yield from _pseudo_linear(xt, g, 3, ets))


_IMPL: dict[str, Callable[..., _Run]] = {
    "ddim": _ddim,
    "dpmsolver1": lambda g, **o: _singlestep(g, 1, **o),
    "dpmsolver2": lambda g, **o: _singlestep(g, 2, **o),
    "dpmsolver3": lambda g, **o: _singlestep(g, 3, **o),
    "dpmpp_2m": _dpmpp_2m,
    "pndm": _pndm,
    "plms": _plms,
    "deis": _deis,
}


def _check_final(final_alpha_bar: float, alpha_bar: Tensor) -> float:
    if isinstance(final_alpha_bar, Tensor):
        final_alpha_bar = float(final_alpha_bar)  # a constant end point, never differentiated
    ok = isinstance(final_alpha_bar, (int, float)) and not isinstance(final_alpha_bar, bool)
    cleanest = float(alpha_bar[0].detach())
    if not ok or not (cleanest < final_alpha_bar <= 1.0):
        raise ValueError(
            f"final_alpha_bar must be a number in ({cleanest:.8g}, 1] (above the cleanest trajectory value, "
            f"1 = the clean sample); got {final_alpha_bar!r}."
        )
    return float(final_alpha_bar)


class SolverRun:
    """One run of ``solver`` over a trajectory, one model evaluation at a time: the solver code behind
    :func:`sample` and :class:`~vrg_lightning.scheduler.VRGScheduler` (each solver is a generator that yields its
    model inputs and is sent ε̂).

    Construction validates the arguments (as :func:`sample`) and precomputes the grid, orders and coefficients;
    :meth:`start` takes the starting sample and returns the first model input; :meth:`send` takes ε̂ at the pending
    model input and returns the next model input or, after the last evaluation, the final sample (:attr:`done`).
    :attr:`alpha_bar` is the ᾱ of the pending evaluation (0-d float64, ``None`` when done); :attr:`index` counts the
    evaluations made. A 2-D ``alpha_bar`` ``[B, n]`` runs B trajectories at once (coefficients and ᾱ ``[B]``, x
    broadcasting over its last dimension), as ``variance.propagation`` does for many trajectories.

    Example:
        >>> run = SolverRun("ddim", torch.tensor([0.9, 0.5], dtype=torch.float64))
        >>> x = run.start(torch.ones(1))
        >>> while not run.done:
        ...     x = run.send(torch.zeros_like(x))  # ε̂ = 0: x̃ stays 1 / √0.5
        >>> x, run.index
        (tensor([1.4142]), 2)
    """

    def __init__(self, solver: str, alpha_bar: Tensor, *, final_alpha_bar: float = 1.0, **options: Any) -> None:
        _check_options(solver, options)
        if torch.is_tensor(alpha_bar) and alpha_bar.ndim == 2:  # a batch: coefficients [B] (x broadcasts over B)
            ab = torch.stack([validate_trajectory(row, "alpha_bar") for row in alpha_bar])
            self.final_alpha_bar = _check_final(final_alpha_bar, ab[:, 0].max().reshape(1))
            ab = ab.T
        else:
            ab = validate_trajectory(alpha_bar, "alpha_bar")
            self.final_alpha_bar = _check_final(final_alpha_bar, ab)
        self.solver, self.num_evaluations = solver, num_evaluations(solver, ab.shape[0])
        self.grid = _Grid(ab, self.final_alpha_bar)
        self._gen = _IMPL[solver](self.grid, **options)
        next(self._gen)  # the preamble: orders and coefficients, before the starting sample is known
        self.alpha_bar: Tensor | None = None
        self.index, self.done, self._started = 0, False, False

    def start(self, x: Tensor) -> Tensor:
        """Begin at ``x`` (the sample at the noisiest trajectory value); returns the first model input."""
        if self._started:
            raise ValueError("SolverRun.start was already called; make a new SolverRun to sample again.")
        if not torch.is_tensor(x) or not x.is_floating_point():
            raise ValueError(f"x must be a floating-point tensor; got {type(x).__name__} {getattr(x, 'dtype', '')}.")
        self._started = True
        return self._advance(x / self.grid.sqrt_ab[0])

    def send(self, eps: Tensor) -> Tensor:
        """ε̂ at the pending model input; returns the next model input, or the final sample when :attr:`done`."""
        if not self._started or self.done:
            state = "the run is done" if self.done else "call start(x) first"
            raise ValueError(f"SolverRun.send needs a pending evaluation; {state}.")
        self.index += 1
        return self._advance(eps)

    def _advance(self, value: Tensor) -> Tensor:
        try:
            x, self.alpha_bar = self._gen.send(value)
        except StopIteration as stop:
            self.done, self.alpha_bar = True, None
            final = self.final_alpha_bar
            return stop.value * math.sqrt(final) if final != 1.0 else stop.value
        return x


def sample(
    solver: str,
    eps_fn: EpsFn,
    x: Tensor,
    alpha_bar: Tensor,
    *,
    final_alpha_bar: float = 1.0,
    callback: Callback | None = None,
    **options: Any,
) -> Tensor:
    """Integrate from ``x`` at the noisiest ᾱ of the trajectory to ``final_alpha_bar`` with ``solver``.

    Args:
        solver: one of :data:`SOLVERS` (module docstring: methods, evaluations, lower-order rules).
        eps_fn: ``eps_fn(x, alpha_bar_0d) -> ε̂`` shaped like x; ``alpha_bar_0d`` is a 0-d float64 tensor.
        x: the starting sample at ᾱ = ``alpha_bar.max()`` (e.g. ``torch.randn``), any float dtype and device.
        alpha_bar: the trajectory, float64, strictly decreasing (cleanest first).
        final_alpha_bar: the end point of sampling (1 = σ 0, the clean sample).
        callback: called after each model evaluation with ``{"x", "i", "alpha_bar", "eps"}``
            (``i`` counts evaluations, ``x`` is the model input).
        **options: solver options, see :func:`solver_options` (``lower_order_final``, ``order``, ``midpoint``).

    Returns:
        The sample at ``final_alpha_bar``, same shape and dtype as ``x``.

    Raises:
        ValueError: unknown solver or option, invalid trajectory or end point, a trajectory too short for
            ``pndm``, or an ``eps_fn`` output of the wrong shape.

    Example:
        >>> ab = torch.tensor([0.9, 0.5, 0.1], dtype=torch.float64)
        >>> x = torch.ones(2)
        >>> sample("ddim", lambda x, a: torch.zeros_like(x), x, ab)  # ε̂ = 0: x̃ stays x / √0.1
        tensor([3.1623, 3.1623])
        >>> out = sample("dpmpp_2m", lambda x, a: x / (1 - a).sqrt(), x, ab)  # the exact ε when x₀ = 0
        >>> bool(out.abs().max() < 1e-6)
        True
    """
    run = SolverRun(solver, alpha_bar, final_alpha_bar=final_alpha_bar, **options)
    x = run.start(x)
    while not run.done:
        ab = run.alpha_bar
        eps = eps_fn(x, ab)
        if not torch.is_tensor(eps) or eps.shape != x.shape:
            got = tuple(eps.shape) if torch.is_tensor(eps) else type(eps).__name__
            raise ValueError(f"eps_fn must return a tensor shaped like x {tuple(x.shape)}; got {got}.")
        if callback is not None:
            callback({"x": x, "i": run.index, "alpha_bar": ab, "eps": eps})
        x = run.send(eps)
    return x
