"""Discretisation error of DDIM, the part of the final-sample error that cpe does not model, and a VRG variant
that minimises both (``vrg tune`` candidates of kind ``disc``).

DDIM is Euler's method in σ on x̃ = x/√ᾱ, ``dx̃/dσ = ε(x̃, σ)``. The local error of the step from σ_i to σ_{i-1}
(trajectory cleanest first, σ_{-1} = 0) is ``∫ ε dσ - Δσ_i ε(σ_i) ≈ -½ Δσ_i² g(σ_i)`` with
``g = dε/dσ`` the total derivative along the sampling path (``= d²x̃/dσ²``). With the paper's assumption that
errors pass to x₀ unchanged, the bias of the final sample per dimension is ``b = Σ_i ½ Δσ_i² g(σ_i)``, and

    E‖x̂₀ - x₀‖²/d  ≈  cpe + disc,    disc = E‖b‖²/d.

``G(λ) = E‖g‖²/d`` is measured once per model along a few many-step sample paths (:func:`estimate_curvature`,
plain tensors, stored in the checkpoint). Two bounds of ``disc`` from ``G`` alone:

- ``"coherent"``: ``(Σ_i ½ Δσ_i² √G_i)²`` (the local errors point the same way; Cauchy-Schwarz upper bound),
- ``"independent"``: ``Σ_i ¼ Δσ_i⁴ G_i`` (uncorrelated local errors).

:func:`discretization_error` measures the real thing (a trajectory's samples against a many-step reference from
the same noise) to check which one predicts it; :func:`optimize_disc` minimises ``cpe + disc (+ start penalty)``
in the optimizer's trust region (:func:`vrg_lightning.optimize.trust_bounds`).

Damping. The paper's cpe lets an error made in x̃ at any σ reach x₀ unchanged. Along the exact flow it does not:
for data with per-dimension variance c² the ODE is linear, ``x̃(σ) ∝ √(c² + σ²)``, so an error made by the step that
lands on σ_{i-1} reaches x₀ multiplied by ``c / √(c² + σ_{i-1}²)``. With σ_max ≈ 157 the paper's noisiest term
(Δσ ≈ 100, factor ≈ 1) dominates cpe although its error is damped ~50× in x₀ — which is why the optimizer moves
the start. ``damping=True`` weights each term (cpe and the local errors) by that factor² (c² from the paths' end
samples, :attr:`Curvature.data_var`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch
from scipy.optimize import minimize
from torch import Tensor

from ..schedule import alpha_bar_to_lambda, alpha_bar_to_sigma
from ..solvers import sample as solver_sample
from ..trajectories import is_trajectory, validate_trajectory
from ..variance import DDIM_LIKE, EpsFn, MSEFn, cpe_paper
from .settings import OptimizeSettings
from .variables import Variables

__all__ = ["DISC_MODES", "DISC_SOLVERS", "Curvature", "DiscResult", "estimate_curvature", "damping_factors",
           "damped_cpe", "disc_error", "discretization_error", "reference_trajectory", "optimize_disc"]

DISC_MODES = ("coherent", "independent", "none")
DISC_SOLVERS = DDIM_LIKE  # Euler in σ: the model above holds for these


@dataclass(frozen=True)
class Curvature:
    """``G(λ) = E‖dε/dσ‖²/d`` along sampling paths at increasing λ (plain lists; ``to_dict``/``from_dict``)."""

    lam: tuple[float, ...]
    g2: tuple[float, ...]
    num_samples: int = 0
    steps: int = 0
    data_var: float = 0.25

    def __post_init__(self) -> None:
        lam, g2 = np.asarray(self.lam, dtype=np.float64), np.asarray(self.g2, dtype=np.float64)
        if lam.ndim != 1 or lam.size < 2 or lam.shape != g2.shape:
            raise ValueError(f"Curvature needs two equally long lists of >= 2 values; got {lam.size} and {g2.size}.")
        if not (np.all(np.diff(lam) > 0) and np.all(np.isfinite(g2)) and np.all(g2 >= 0)):
            raise ValueError("Curvature.lam must increase strictly and g2 must be finite and >= 0.")

    def __call__(self, alpha_bar: Tensor) -> Tensor:
        """``G`` at ``alpha_bar`` (log-linear in λ, constant beyond the ends), differentiable."""
        lam = alpha_bar_to_lambda(alpha_bar)
        xp = torch.tensor(self.lam, dtype=lam.dtype)
        fp = torch.tensor(self.g2, dtype=lam.dtype).clamp(min=1e-300).log()
        x = lam.clamp(float(xp[0]), float(xp[-1]))
        i = torch.searchsorted(xp, x.detach()).clamp(1, xp.numel() - 1)
        w = (x - xp[i - 1]) / (xp[i] - xp[i - 1])
        return torch.exp(fp[i - 1] + w * (fp[i] - fp[i - 1]))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["lam"], d["g2"] = [float(v) for v in self.lam], [float(v) for v in self.g2]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Curvature:
        return cls(tuple(float(v) for v in d["lam"]), tuple(float(v) for v in d["g2"]), int(d.get("num_samples", 0)),
                   int(d.get("steps", 0)), float(d.get("data_var", 0.25)))


@torch.no_grad()
def estimate_curvature(eps_fn: EpsFn, x: Tensor, alpha_bar: Tensor) -> Curvature:
    """Measure ``G(λ)`` along DDIM paths from ``x`` over a fine trajectory (e.g. 200 logSNR steps).

    ``g`` between consecutive evaluations is the finite difference ``(ε̂_{k+1} - ε̂_k)/(σ_{k+1} - σ_k)`` on the
    same path, placed at the mean λ of the two.

    Example:
        >>> ab = torch.linspace(0.99, 0.01, 50, dtype=torch.float64)
        >>> c = estimate_curvature(lambda x, a: torch.zeros_like(x), torch.randn(4, 3), ab)
        >>> max(c.g2)
        0.0
    """
    ab = validate_trajectory(alpha_bar, "alpha_bar")
    rec: list[tuple[float, Tensor]] = []
    def keep(d: dict[str, Any]) -> None:
        rec.append((float(d["alpha_bar"]), d["eps"].double()))

    out = solver_sample("ddim", eps_fn, x, ab, callback=keep)
    lam, g2 = [], []
    for (a0, e0), (a1, e1) in zip(rec[:-1], rec[1:], strict=True):  # noisiest first
        s0, s1 = (float(alpha_bar_to_sigma(torch.tensor(a, dtype=torch.float64))) for a in (a0, a1))
        g = (e1 - e0) / (s1 - s0)
        lam.append(0.5 * (math.log(a0 / (1 - a0)) + math.log(a1 / (1 - a1))))
        g2.append(float(g.square().mean()))
    var = float(out.double().clamp(-1, 1).var(0).mean()) if x.shape[0] > 1 else 0.25
    return Curvature(tuple(lam), tuple(g2), int(x.shape[0]), int(ab.numel()), var)


def damping_factors(alpha_bar: Tensor, data_var: float) -> Tensor:
    """``c² / (c² + σ_{i-1}²)`` per step (cleanest first, σ_{-1} = 0): how much of an error's variance made by step
    i reaches x₀ along the exact flow of Gaussian data with variance ``c² = data_var`` (module docstring).

    Example:
        >>> damping_factors(torch.tensor([0.5, 0.2], dtype=torch.float64), 1.0).tolist()
        [1.0, 0.5]
    """
    s = alpha_bar_to_sigma(alpha_bar)
    lands = torch.cat([torch.zeros_like(s[..., :1]), s[..., :-1]], -1)
    return data_var / (data_var + lands**2)


def damped_cpe(alpha_bar: Tensor, mse: MSEFn, data_var: float) -> Tensor:
    """``Σ_i (s_i - s_{i-1})² MSE(ᾱ_i) · c²/(c² + s_{i-1}²)``: the paper's cpe
    (:func:`~vrg_lightning.variance.cpe_paper`) weighted by the Gaussian-flow propagation :func:`damping_factors`.

    Example:
        >>> ab = torch.tensor([0.9, 0.5], dtype=torch.float64)
        >>> one = lambda a: torch.ones_like(a)
        >>> float(damped_cpe(ab, one, 1.0)), float(cpe_paper(ab, one))  # the noisier term is damped by 1/(1 + 1/9)
        (0.5111111111111111, 0.5555555555555556)
    """
    return cpe_paper(alpha_bar, mse, damping_factors(alpha_bar, data_var))


def disc_error(alpha_bar: Tensor, curvature: Callable[[Tensor], Tensor], mode: str = "coherent",
               data_var: float | None = None) -> Tensor:
    """Predicted DDIM discretisation error ``disc`` of a trajectory (module docstring), differentiable; with
    ``data_var`` each local error is damped by :func:`damping_factors` (its square root, on the error).

    Example:
        >>> ab = torch.tensor([0.9, 0.5], dtype=torch.float64)
        >>> float(disc_error(ab, lambda a: torch.full_like(a, 4.0), "independent")) > 0
        True
    """
    if mode not in DISC_MODES:
        raise ValueError(f"Unknown disc mode {mode!r}; allowed: {', '.join(DISC_MODES)}.")
    s = alpha_bar_to_sigma(alpha_bar)
    ds = torch.diff(s, dim=-1, prepend=torch.zeros_like(s[..., :1]))
    g2 = curvature(alpha_bar)
    if data_var is not None:
        g2 = g2 * damping_factors(alpha_bar, data_var)
    if mode == "coherent":
        return (0.5 * ds**2 * g2.sqrt()).sum(-1) ** 2
    if mode == "none":
        return (ds * 0).sum(-1)
    return (0.25 * ds**4 * g2).sum(-1)


def reference_trajectory(alpha_bar: Tensor, steps: int = 200) -> Tensor:
    """A fine logSNR-uniform trajectory with the same noisiest and cleanest ᾱ as ``alpha_bar`` (for
    :func:`discretization_error`: the reference must start from the same noise level as the trajectory).

    Example:
        >>> ref = reference_trajectory(torch.tensor([0.9, 0.5, 0.1], dtype=torch.float64), 5)
        >>> [round(v, 3) for v in ref[[0, -1]].tolist()]
        [0.9, 0.1]
    """
    ab = validate_trajectory(alpha_bar, "alpha_bar")
    lam = torch.linspace(float(alpha_bar_to_lambda(ab[0])), float(alpha_bar_to_lambda(ab[-1])), steps,
                         dtype=torch.float64)
    return torch.sigmoid(lam)


@torch.no_grad()
def discretization_error(
    eps_fn: EpsFn, x: Tensor, alpha_bar: Tensor, solver: str, reference: Tensor, reference_solver: str = "dpmpp_2m"
) -> float:
    """Measured ``E‖x̂₀ - x₀^ref‖²/d``: ``solver`` over ``alpha_bar`` vs ``reference_solver`` over ``reference`` (a
    many-step trajectory with the same noisiest ᾱ), both from ``x``. Unclamped samples, float64 average.

    Example:
        >>> f = lambda x, a: x / (1 - a).sqrt()  # exact ε when x₀ = 0: every solver lands on 0
        >>> ab = torch.tensor([0.9, 0.5, 0.1], dtype=torch.float64)
        >>> discretization_error(f, torch.ones(2, 3, dtype=torch.float64), ab, "ddim", ab) < 1e-20
        True
    """
    a = solver_sample(solver, eps_fn, x, alpha_bar)
    b = solver_sample(reference_solver, eps_fn, x, reference)
    return float((a.double() - b.double()).square().mean())


@dataclass
class DiscResult:
    """Result of :func:`optimize_disc` (``alpha_bar``/``base_alpha_bar`` float64 tensors, cleanest first; ``cpe_*``
    and ``disc_*`` the two parts of the loss without the start penalty; ``seconds`` the wall time).

    ``to_dict()`` gives the plain dict ``vrg tune`` stores; ``result["key"]`` reads the same values (old callers).
    """

    alpha_bar: Tensor
    base_alpha_bar: Tensor
    cpe_before: float
    cpe_after: float
    disc_before: float
    disc_after: float
    loss_before: float
    loss: float
    seconds: float
    disc_mode: str
    damping: bool

    def to_dict(self) -> dict[str, Any]:
        """Plain types only: lists of floats, numbers, strings."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["alpha_bar"] = [float(v) for v in self.alpha_bar]
        d["base_alpha_bar"] = [float(v) for v in self.base_alpha_bar]
        return d

    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]


def optimize_disc(
    base_alpha_bar: Tensor,
    mse_fn: MSEFn,
    curvature: Callable[[Tensor], Tensor],
    settings: OptimizeSettings,
    *,
    mode: str = "coherent",
    damping: bool = False,
    data_var: float = 0.25,
    starts: tuple[Tensor, ...] = (),
    max_iter: int = 500,
) -> dict[str, Any]:
    """Minimise ``cpe_paper + disc + λ_reg (ᾱ_{N-1} - ᾱ⁰_{N-1})²`` in the trust region of ``settings``
    (:class:`~vrg_lightning.optimize.OptimizeSettings`: ``lp``, ``trust``, ``reg_lambda``, ``pin_start``); with
    ``damping`` both terms carry the Gaussian-flow factors (:func:`damped_cpe`, ``data_var`` = c²). Pinned in
    ``alpha`` trust, the last ratio is whatever holds the noisiest ᾱ (the other ratios keep their boxes).

    L-BFGS-B over the optimizer's variables (log α_i for ``alpha`` trust, λ_i for ``logsnr``), from the base and
    each of ``starts`` (clipped into the box); the result is restored into ``settings.alpha_bar_range``
    (:meth:`~vrg_lightning.optimize.variables.Variables.restore_range`). Never worse than the base.

    Returns:
        :class:`DiscResult`.

    Example:
        >>> from vrg_lightning.optimize import OptimizeSettings
        >>> base = torch.tensor([0.9, 0.5, 0.1], dtype=torch.float64)
        >>> r = optimize_disc(base, lambda a: 0.1 + a, lambda a: torch.ones_like(a), OptimizeSettings(lp=0.05))
        >>> r.loss <= r.loss_before
        True
    """
    t0 = time.perf_counter()
    ab0 = validate_trajectory(torch.as_tensor(base_alpha_bar).detach().cpu(), "base_alpha_bar").clone()
    var = Variables(ab0, settings)
    lo, hi = var.lo, var.hi
    end0 = float(ab0[-1])

    def to_ab(y: Tensor) -> Tensor:
        ab = var.alpha_bar(y)
        if settings.pin_start and var.alpha:  # hold the noisiest ᾱ: rescale the last ratio
            ab = torch.cat([ab[:-1], ab.new_tensor([end0])])
        return ab

    def parts(ab: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if damping:
            c, d = damped_cpe(ab, mse_fn, data_var), disc_error(ab, curvature, mode, data_var)
        else:
            c, d = cpe_paper(ab, mse_fn), disc_error(ab, curvature, mode)
        pen = ab.new_zeros(()) if settings.pin_start else settings.reg_lambda * (ab[-1] - end0) ** 2
        return c, d, c + d + pen

    def fg(y: np.ndarray) -> tuple[float, np.ndarray]:
        yt = torch.tensor(y, dtype=torch.float64, requires_grad=True)
        ab = to_ab(yt)
        if not is_trajectory(ab):
            return 1e300, np.zeros_like(y)
        loss = parts(ab)[2]
        (grad,) = torch.autograd.grad(loss, yt)
        return float(loss.detach()), grad.numpy()

    best_ab = ab0
    with torch.no_grad():
        c0, d0, f0 = (float(v) for v in parts(ab0))
    best_f = f0
    bounds = list(zip(lo.tolist(), hi.tolist(), strict=True))
    for s in (ab0, *starts):
        y = np.clip(var.from_alpha_bar(validate_trajectory(s, "start")), lo, hi)
        res = minimize(fg, y, jac=True, method="L-BFGS-B", bounds=bounds, options={"maxiter": max_iter})
        x = np.clip(res.x, lo, hi) if settings.pin_start else var.restore_range(res.x)  # the trained range
        with torch.no_grad():
            ab = to_ab(torch.as_tensor(x, dtype=torch.float64))
            f = float(parts(ab)[2]) if is_trajectory(ab) else math.inf
        if f < best_f:
            best_ab, best_f = ab, f
    with torch.no_grad():
        c1, d1, f1 = (float(v) for v in parts(best_ab))
    return DiscResult(alpha_bar=best_ab, base_alpha_bar=ab0, cpe_before=c0, cpe_after=c1, disc_before=d0,
                      disc_after=d1, loss_before=f0, loss=f1, seconds=time.perf_counter() - t0, disc_mode=mode,
                      damping=bool(damping))
