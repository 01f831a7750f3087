"""One optimisation problem in the optimizer's variables (:mod:`.variables`): the *chain* loss

    loss(y) = Σ_i r_i (s_i - s_{i-1})² MSE(ᾱ_i)  +  Σ_i (l_i y_i + μ/2 (y_i - c_i)²)  +  λ_reg (ᾱ_{N-1} - ᾱ_{N-1}^o)²

(trajectory cleanest first, s = √((1-ᾱ)/ᾱ), s_{-1} = 0). By default ``r_i = 1`` and there is no separable part: the
paper loss, :func:`~vrg_lightning.variance.cpe_paper_numpy` plus the start penalty. The solver-aware search
(:mod:`.surrogate`) sets, for its chain models, a weight per term ``r`` (:attr:`SearchProblem.term_weights`), a
linear part ``l`` and a proximal part ``μ, c``. Every term depends on two consecutive steps only, so the grid searches
of :mod:`.chain` solve it exactly on a grid.

The MSE is used in numpy (``value_and_grad`` of the interpolants of :mod:`vrg_lightning.interpolants`, or any torch
MSE callable through :func:`numpy_mse`).
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..variance import MSEFn, NumpyMSEFn, cpe_paper_numpy
from .settings import OptimizeSettings
from .variables import Variables

__all__ = ["Deadline", "SearchProblem", "numpy_mse"]

RESOLUTION = 1e-11  # the grid refinement's last scale, relative to max(1, max |z|) (SearchProblem.resolution)


def numpy_mse(mse_fn: MSEFn) -> NumpyMSEFn:
    """``(MSE, dMSE/dᾱ)`` in float64 numpy of an MSE callable: its own ``value_and_grad`` if it has one, else the
    torch function and its elementwise derivative by autograd.

    Example:
        >>> f = numpy_mse(lambda a: 0.1 + a**2)
        >>> [v.tolist() for v in f(np.array([0.5]))]
        [[0.35], [1.0]]
    """
    fn = getattr(mse_fn, "value_and_grad", None)
    if fn is not None:
        return fn

    def via_torch(alpha_bar: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        t = torch.tensor(alpha_bar, dtype=torch.float64, requires_grad=True)
        with torch.enable_grad():
            v = mse_fn(t)
            g = torch.autograd.grad(v.sum(), t, allow_unused=True)[0] if v.requires_grad else None
        grad = np.zeros_like(alpha_bar, dtype=np.float64) if g is None else g.numpy()
        return v.detach().to(torch.float64).numpy(), grad

    return via_torch


class Deadline:
    """A ``time.perf_counter()`` value after which the searches stop early (``None``: never), shared by a problem
    and the models built from it; :attr:`cut` records that it stopped one.

    Example:
        >>> Deadline().expired(), Deadline(-math.inf).expired()
        (False, True)
    """

    def __init__(self, at: float | None = None) -> None:
        self.at, self.cut = at, False

    def expired(self) -> bool:
        """Whether the deadline has passed (and so :attr:`cut` is set); checked between passes and iterations."""
        if self.at is not None and not self.cut and time.perf_counter() >= self.at:
            self.cut = True
        return self.cut


class SearchProblem:
    """The chain loss of a base trajectory in the variables of ``settings`` (module docstring).

    Args:
        base_alpha_bar: the base trajectory (float64, cleanest first).
        mse_fn: MSE(ᾱ) (torch callable; its numpy form from :func:`numpy_mse`).
        settings: the trust region, penalty and start of :class:`~.settings.OptimizeSettings`.
        deadline: a :class:`Deadline` to share (that of the problem a model is built from); default none.

    Attributes:
        vars: the :class:`~.variables.Variables`; ``alpha``, ``lo``, ``hi``, ``y0`` are its.
        term_weights: ``[N]`` a weight per paper term, or ``None`` (all 1).
        lin, mu, center: the separable part (``None``/0 when absent).
        evals: loss evaluations so far (rows).
        deadline: the :class:`Deadline` of the searches (shared with the models built from the problem).
    """

    def __init__(self, base_alpha_bar: Tensor, mse_fn: MSEFn, settings: OptimizeSettings,
                 deadline: Deadline | None = None) -> None:
        self.ab0, self.mse_fn, self.s = base_alpha_bar, mse_fn, settings
        self.n = base_alpha_bar.numel()
        self.vars = v = Variables(base_alpha_bar, settings)
        self.alpha, self.lo, self.hi, self.y0 = v.alpha, v.lo, v.hi, v.y0
        self.pinned = settings.pin_start
        self.penalty = 0.0 if self.pinned else settings.reg_lambda
        self.end = float(base_alpha_bar[-1])
        self.np_mse: NumpyMSEFn = numpy_mse(mse_fn)
        self.term_weights: np.ndarray | None = None
        self.lin: np.ndarray | None = None
        self.mu, self.center = 0.0, None
        self.evals = 0
        self.deadline = Deadline() if deadline is None else deadline
        self.resolution = RESOLUTION

    def expired(self) -> bool:
        """Whether the :attr:`deadline` has passed (:meth:`Deadline.expired`)."""
        return self.deadline.expired()

    def separable(self, values: np.ndarray, index: Any = slice(None)) -> np.ndarray | float:
        """``l_i v + μ/2 (v - c_i)²`` of values ``v`` of the variables ``index`` (broadcast along the last axes)."""
        out = 0.0
        if self.lin is not None:
            out = out + self.lin[index] * values
        if self.mu:
            out = out + 0.5 * self.mu * (values - self.center[index]) ** 2
        return out

    def _terms(self, ab: np.ndarray, grad: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """The terms' sum of trajectories ``[K, N]`` and optionally its gradient in ᾱ (penalty and separable part
        excluded)."""
        return cpe_paper_numpy(ab, self.np_mse, grad=grad, weights=self.term_weights)

    def grid_pass(self, y: np.ndarray, h: float, lo: np.ndarray, hi: np.ndarray) -> np.ndarray | None:
        """One pass of the grid refinement (:func:`~.chain.grid_pass`; a problem with other terms has its own)."""
        from .chain import grid_pass

        return grid_pass(self, y, h, lo, hi)

    def rows(self, ys: np.ndarray, grad: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """Loss of each row of ``ys`` ``[K, N]`` and optionally its gradient in ``y`` (no finiteness check)."""
        ab = self.vars.alpha_bar_np(ys)
        f, g = self._terms(ab, grad)
        self.evals += ys.shape[0]
        if self.penalty:
            f = f + self.penalty * (ab[:, -1] - self.end) ** 2
        if self.lin is not None or self.mu:
            f = f + self.separable(ys).sum(-1)
        if not grad:
            return f, None
        if self.penalty:
            g[:, -1] += 2 * self.penalty * (ab[:, -1] - self.end)  # type: ignore[index]
        gy = self.vars.chain_rule(g, ab)  # type: ignore[arg-type]
        if self.lin is not None:
            gy = gy + self.lin
        if self.mu:
            gy = gy + self.mu * (ys - self.center)
        return f, gy

    def losses(self, ys: np.ndarray) -> np.ndarray:
        """Loss of each row of ``ys`` ``[K, N]`` (``inf`` where not finite)."""
        with np.errstate(all="ignore"):
            f = self.rows(ys)[0]
        return np.where(np.isfinite(f), f, np.inf)

    def loss(self, y: np.ndarray) -> float:
        """Loss at ``y`` (``inf`` where not finite)."""
        return float(self.losses(y[None])[0])

    def value_and_grad(self, y: np.ndarray) -> tuple[float, np.ndarray]:
        """Loss and gradient at ``y`` (``inf`` and zeros where not finite)."""
        with np.errstate(all="ignore"):
            f, g = self.rows(y[None], True)
        fv, gv = float(f[0]), g[0]  # type: ignore[index]
        if not math.isfinite(fv) or not np.isfinite(gv).all():
            return math.inf, np.zeros_like(y)
        return fv, gv

    def alpha_bar(self, y: np.ndarray) -> Tensor:
        """The trajectory of ``y`` (float64 tensor; the pinned noisiest value restored exactly)."""
        with torch.no_grad():
            ab = self.vars.alpha_bar(torch.as_tensor(y, dtype=torch.float64))
        if self.pinned:
            ab[-1] = float(self.ab0[-1])
        return ab

    def feasible(self, y: np.ndarray) -> np.ndarray:
        """``y`` restored into the feasible set (box, range of the noisiest step; pinned sum)."""
        if self.alpha and self.pinned:
            return self.vars.project_pinned(np.clip(y, self.lo, self.hi))
        return self.vars.restore_range(y)
