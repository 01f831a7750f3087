"""MSE(ᾱ) interpolants of an error profile: a torch ``__call__`` (differentiable, any device) and, beside it, the
same function in float64 numpy with its derivative (``value_and_grad``, the optimizer's fast path) and its ``knots``
(the ᾱ where it has a kink). ``tests/test_interpolants.py`` holds the two forms together.

- :class:`PiecewiseLinearMSE` (``ErrorProfile.mse_function("paper")``): linear in ᾱ between table rows, as the
  published code does; constant beyond the table. Every row is a kink.
- :class:`PchipLogMSE` (``mode="fit"``): ``exp`` of a shape-preserving cubic (PCHIP) of log MSE in λ = logSNR. C¹
  inside, constant beyond the outermost knots, so its only kinks are the two ends.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.interpolate import PchipInterpolator
from torch import Tensor

from .schedule import alpha_bar_to_lambda

__all__ = ["PiecewiseLinearMSE", "PchipLogMSE"]


def _knots_and_values(cls: str, name: str, x: Tensor, mse: Tensor) -> tuple[Tensor, Tensor]:
    """``(x, mse)`` as tensors, checked to be 1-D of the same length >= 1 (the interpolants' input rule)."""
    x, mse = torch.as_tensor(x), torch.as_tensor(mse)
    if x.ndim != 1 or x.numel() < 1 or mse.shape != x.shape:
        raise ValueError(f"{cls} needs 1-D {name} and mse of the same length >= 1; got shapes {tuple(x.shape)} and "
                         f"{tuple(mse.shape)}.")
    return x, mse


class PiecewiseLinearMSE:
    """MSE(ᾱ) linear in ᾱ between knots (the reference's interpolation), constant outside.

    Args:
        alpha_bar: the table's ᾱ values (any order; rows with equal ᾱ give zero-width segments, which take the
            left value).
        mse: the MSE of each row.

    Example:
        >>> f = PiecewiseLinearMSE(torch.tensor([0.25, 0.75], dtype=torch.float64), torch.tensor([1.0, 3.0]))
        >>> float(f(torch.tensor(0.5, dtype=torch.float64))), f.value_and_grad(np.array([0.5, 0.9]))
        (2.0, (array([2., 3.]), array([4., 0.])))
    """

    def __init__(self, alpha_bar: Tensor, mse: Tensor) -> None:
        alpha_bar, mse = _knots_and_values("PiecewiseLinearMSE", "alpha_bar", alpha_bar, mse)
        order = torch.argsort(alpha_bar)
        self.alpha_bar = alpha_bar[order].to(torch.float64)
        self.mse = mse[order].to(torch.float64)
        self._xp, self._fp = xp, fp = self.alpha_bar.numpy(), self.mse.numpy()  # numpy views (the fast path)
        width = np.diff(xp)  # zero-width segments (duplicate rows) take the left value, as __call__
        self._slopes = np.concatenate([[0.0], np.where(width > 0, np.diff(fp) / np.where(width > 0, width, 1.0), 0.0)])

    @property
    def knots(self) -> np.ndarray:
        """ᾱ of every table row (the kinks), increasing."""
        return self.alpha_bar.numpy()

    def __call__(self, alpha_bar: Tensor) -> Tensor:
        xp, fp = self.alpha_bar.to(alpha_bar.device), self.mse.to(alpha_bar.device)
        if xp.numel() == 1:
            return fp.expand_as(alpha_bar).to(alpha_bar.dtype) + 0 * alpha_bar
        x = alpha_bar.clamp(float(xp[0]), float(xp[-1]))
        idx = torch.searchsorted(xp, x.detach().contiguous()).clamp(1, xp.numel() - 1)
        x0, x1, y0, y1 = xp[idx - 1], xp[idx], fp[idx - 1], fp[idx]
        width = x1 - x0  # rows printed with the same alpha_bar give zero-width segments: take the left value
        return y0 + (x - x0) * torch.where(width > 0, (y1 - y0) / torch.where(width > 0, width, 1.0), 0.0)

    def value_and_grad(self, alpha_bar: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(MSE, dMSE/dᾱ)`` at ``alpha_bar`` (float64 numpy, any shape); the derivative is 0 beyond the table."""
        xp, fp = self._xp, self._fp
        if xp.size == 1:
            return np.full_like(alpha_bar, fp[0], dtype=np.float64), np.zeros_like(alpha_bar, dtype=np.float64)
        xc = np.clip(alpha_bar, xp[0], xp[-1])
        i = np.clip(np.searchsorted(xp, xc), 1, xp.size - 1)
        return fp[i - 1] + (xc - xp[i - 1]) * self._slopes[i], np.where(xc == alpha_bar, self._slopes[i], 0.0)


class PchipLogMSE:
    """MSE(ᾱ) = exp(PCHIP of log MSE in λ), constant beyond the outermost knots.

    Args:
        lam: the knots' λ = logSNR (any order).
        mse: the MSE at each knot (> 0).

    Example:
        >>> f = PchipLogMSE(torch.tensor([-2.0, 0.0, 2.0]), torch.tensor([1.0, 0.5, 0.1]))
        >>> ab = np.array([0.3, 0.6])
        >>> np.allclose(f(torch.as_tensor(ab)).numpy(), f.value_and_grad(ab)[0])
        True
    """

    def __init__(self, lam: Tensor, mse: Tensor) -> None:
        lam, mse = _knots_and_values("PchipLogMSE", "lam", lam, mse)
        order = torch.argsort(lam)
        x = lam[order].to(torch.float64)
        y = torch.log(mse[order].to(torch.float64))
        self.lam, self.log_mse = x, y
        if x.numel() >= 2:
            d = PchipInterpolator(x.numpy(), y.numpy()).derivative()(x.numpy())
            self.slopes = torch.as_tensor(np.asarray(d), dtype=torch.float64)
        else:
            self.slopes = torch.zeros_like(x)
        self._np = (self.lam.numpy(), self.log_mse.numpy(), self.slopes.numpy())  # numpy views (the fast path)

    @property
    def knots(self) -> np.ndarray:
        """ᾱ of the two outermost knots, where the constant extension meets the cubic (the only kinks)."""
        return torch.sigmoid(self.lam[[0, -1]]).numpy()

    def __call__(self, alpha_bar: Tensor) -> Tensor:
        dev = alpha_bar.device
        xp, yp, dp = self.lam.to(dev), self.log_mse.to(dev), self.slopes.to(dev)
        lam = alpha_bar_to_lambda(alpha_bar.to(torch.float64))
        if xp.numel() == 1:
            return torch.exp(yp[0] + 0 * lam)
        x = lam.clamp(float(xp[0]), float(xp[-1]))
        i = torch.searchsorted(xp, x.detach().contiguous()).clamp(1, xp.numel() - 1)
        x0, x1 = xp[i - 1], xp[i]
        h = x1 - x0
        u = (x - x0) / h
        h00, h10 = (1 + 2 * u) * (1 - u) ** 2, u * (1 - u) ** 2
        h01, h11 = u**2 * (3 - 2 * u), u**2 * (u - 1)
        return torch.exp(h00 * yp[i - 1] + h10 * h * dp[i - 1] + h01 * yp[i] + h11 * h * dp[i])

    def value_and_grad(self, alpha_bar: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(MSE, dMSE/dᾱ)`` at ``alpha_bar`` in (0, 1) (float64 numpy, any shape); the derivative is 0 beyond the
        outermost knots."""
        xp, yp, dp = self._np
        lam = np.log(alpha_bar) - np.log1p(-alpha_bar)
        if xp.size == 1:
            return np.exp(yp[0] + 0 * lam), np.zeros_like(lam)
        x = np.clip(lam, xp[0], xp[-1])
        i = np.clip(np.searchsorted(xp, x), 1, xp.size - 1)
        h = xp[i] - xp[i - 1]
        u = (x - xp[i - 1]) / h
        h00, h10, h01, h11 = (1 + 2 * u) * (1 - u) ** 2, u * (1 - u) ** 2, u**2 * (3 - 2 * u), u**2 * (u - 1)
        d00, d10, d01, d11 = 6 * u**2 - 6 * u, 3 * u**2 - 4 * u + 1, 6 * u - 6 * u**2, 3 * u**2 - 2 * u
        y0, y1, m0, m1 = yp[i - 1], yp[i], h * dp[i - 1], h * dp[i]
        v = np.exp(h00 * y0 + h10 * m0 + h01 * y1 + h11 * m1)
        dv_dlam = v * (d00 * y0 + d10 * m0 + d01 * y1 + d11 * m1) / h
        return v, np.where(x == lam, dv_dlam / (alpha_bar * (1 - alpha_bar)), 0.0)
