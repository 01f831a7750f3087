"""The MSE interpolants: each numpy ``value_and_grad`` is its torch ``__call__`` (values and autograd gradients),
and ``knots`` are exactly where the torch function has kinks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vrg_lightning import profile
from vrg_lightning.interpolants import PchipLogMSE, PiecewiseLinearMSE
from vrg_lightning.schedule import alpha_bar_to_lambda


def table() -> tuple[torch.Tensor, torch.Tensor]:
    """Unsorted rows with a duplicate ᾱ (a zero-width segment) and wiggles, like a printed reference table."""
    ab = torch.tensor([0.999, 0.95, 0.8, 0.8, 0.6, 0.3, 0.1, 0.02, 0.004], dtype=torch.float64)
    lam = alpha_bar_to_lambda(ab)
    mse = 0.3 * torch.sigmoid(lam - 2) + 0.03 * torch.sin(3 * lam) ** 2 + 1e-4
    mse[3] += 0.01  # the duplicate row carries a different value
    perm = torch.tensor([4, 0, 8, 2, 6, 1, 3, 7, 5])
    return ab[perm], mse[perm]


def interpolants() -> list:
    ab, mse = table()
    keep = torch.cat([torch.ones(2, dtype=torch.bool), ab[2:] != 0.8])  # PCHIP needs distinct λ
    return [PiecewiseLinearMSE(ab, mse), PchipLogMSE(alpha_bar_to_lambda(ab[keep]), mse[keep])]


def autograd(fn, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    t = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    v = fn(t)
    (g,) = torch.autograd.grad(v.sum(), t)
    return v.detach().numpy(), g.numpy()


@pytest.mark.parametrize("kind", [0, 1], ids=["piecewise_linear", "pchip"])
def test_numpy_equals_torch(kind: int) -> None:
    fn = interpolants()[kind]
    g = np.random.default_rng(0)
    x = np.concatenate([g.uniform(1e-4, 0.9999, 200), [1e-5, 0.99999]])  # inside and beyond the knots
    x = x[np.min(np.abs(x[:, None] - fn.knots[None, :]), 1) > 1e-9]  # one-sided derivatives differ at a kink
    v, d = fn.value_and_grad(x.reshape(2, -1))
    tv, td = autograd(fn, x.reshape(2, -1))
    np.testing.assert_allclose(v, tv, rtol=1e-13)
    np.testing.assert_allclose(d, td, rtol=1e-9, atol=1e-12)
    assert d.shape == v.shape == (2, x.size // 2)
    assert np.count_nonzero(d) > 0.8 * d.size  # the gradients are not trivially zero


@pytest.mark.parametrize("kind", [0, 1], ids=["piecewise_linear", "pchip"])
def test_knots_are_the_kinks(kind: int) -> None:
    """At every knot inside (0, 1) the left and right slopes of the torch function differ; between knots the
    function is smooth (a second difference of the order of h² · curvature)."""
    fn = interpolants()[kind]
    knots = fn.knots
    assert np.all(np.diff(knots) >= 0)
    if kind == 0:
        np.testing.assert_array_equal(knots, np.sort(table()[0].numpy()))
    else:
        assert knots.size == 2  # C¹ inside: only the two ends, where the constant extension starts
    h = 1e-7

    def f(a: float) -> float:
        return float(fn(torch.tensor(a, dtype=torch.float64)))

    kinked = [k for k in np.unique(knots) if 0 < k - 2 * h and k + 2 * h < 1]
    slopes = [((f(k + h) - f(k)) / h, (f(k) - f(k - h)) / h) for k in kinked]
    assert all(abs(r - left) > 1e-4 for r, left in slopes), slopes
    mids = (np.unique(knots)[:-1] + np.unique(knots)[1:]) / 2
    for m in mids[np.diff(np.unique(knots)) > 1e-3]:
        assert abs(f(m + h) - 2 * f(m) + f(m - h)) < 1e-6 * h


def test_single_knot_is_constant() -> None:
    one = torch.tensor([0.2], dtype=torch.float64)
    for fn in (PiecewiseLinearMSE(torch.tensor([0.5], dtype=torch.float64), one),
               PchipLogMSE(torch.tensor([0.0], dtype=torch.float64), one)):
        v, d = fn.value_and_grad(np.array([0.1, 0.5, 0.9]))
        tv, td = autograd(fn, np.array([0.1, 0.5, 0.9]))
        np.testing.assert_allclose(v, [0.2] * 3, rtol=1e-15)
        np.testing.assert_allclose(tv, v, rtol=1e-15)
        assert not d.any() and not td.any()


def test_profile_reexports_and_validation() -> None:
    assert profile.PiecewiseLinearMSE is PiecewiseLinearMSE and profile.PchipLogMSE is PchipLogMSE
    with pytest.raises(ValueError, match=r"same length >= 1; got shapes \(0,\) and \(0,\)"):
        PiecewiseLinearMSE(torch.tensor([]), torch.tensor([]))
    with pytest.raises(ValueError, match=r"PchipLogMSE needs 1-D lam and mse .* \(2,\) and \(3,\)"):
        PchipLogMSE(torch.zeros(2), torch.ones(3))
