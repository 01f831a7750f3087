"""Discretisation-error model of DDIM: curvature along paths, predicted vs measured error (Gaussian data, where the
exact ε is known), damping, and the cpe + disc optimizer."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from vrg_lightning.discretization import (
    DISC_SOLVERS,
    Curvature,
    DiscResult,
    damped_cpe,
    damping_factors,
    disc_error,
    discretization_error,
    estimate_curvature,
    optimize_disc,
    reference_trajectory,
)
from vrg_lightning.optimize import OptimizeSettings, optimize_trajectory, trust_bounds
from vrg_lightning.schedule import NoiseSchedule, alpha_bar_to_lambda, alpha_bar_to_sigma
from vrg_lightning.trajectories import make_trajectory
from vrg_lightning.variance import DDIM_LIKE, cpe_contributions, cpe_paper

C2 = 0.3  # data variance of the Gaussian toy model


def gaussian_eps(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """The exact ε of x₀ ~ N(0, C2·I): E[ε | x_t] = √(1-ᾱ) x_t / (ᾱ C2 + 1 - ᾱ)."""
    return (1 - a).sqrt() * x / (a * C2 + 1 - a)


@pytest.fixture(scope="module")
def setup() -> tuple[NoiseSchedule, torch.Tensor, Curvature]:
    sch = NoiseSchedule()
    x = torch.randn(64, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    return sch, x, estimate_curvature(gaussian_eps, x, make_trajectory(sch, "logSNR", 400))


def test_curvature_matches_the_analytic_path_derivative(setup) -> None:
    # x̃(σ) = k √(C2 + σ²) along the exact flow, so dε/dσ = k C2 / (C2 + σ²)^{3/2} and G = E k² C2² / (C2 + σ²)³.
    sch, x, cur = setup
    s_max = float(alpha_bar_to_sigma(make_trajectory(sch, "logSNR", 400)[-1:]))
    ab_max = 1 / (1 + s_max**2)
    k2 = float((x / math.sqrt(ab_max)).square().mean()) / (C2 + s_max**2)
    lam = torch.tensor(cur.lam, dtype=torch.float64)
    s2 = torch.exp(-lam)
    want = k2 * C2**2 / (C2 + s2) ** 3
    rel = (torch.tensor(cur.g2, dtype=torch.float64) / want - 1).abs()
    assert float(rel.max()) < 0.05
    assert abs(cur.data_var - C2) < 0.08  # final samples: variance C2 (clamped to [-1, 1])


@pytest.mark.parametrize("base", ["time_uniform", "logSNR", "time_quadratic"])
def test_coherent_damped_prediction_tracks_the_measured_error(setup, base: str) -> None:
    sch, x, cur = setup
    for n, tol in ((20, 2.5), (50, 1.6)):
        ab = make_trajectory(sch, base, n)
        measured = discretization_error(gaussian_eps, x, ab, "ddim", reference_trajectory(ab, 2000))
        coherent = float(disc_error(ab, cur, "coherent", C2))
        independent = float(disc_error(ab, cur, "independent", C2))
        assert 1 / tol < coherent / measured < tol, (n, base, measured, coherent)
        if n == 50:
            assert independent < measured / 3  # the local errors of one path add up coherently


def test_measured_error_vanishes_with_the_reference_itself(setup) -> None:
    sch, x, _ = setup
    ab = reference_trajectory(make_trajectory(sch, "logSNR", 10), 300)
    assert discretization_error(gaussian_eps, x, ab, "dpmpp_2m", ab) == 0.0


def test_damping_and_damped_cpe() -> None:
    ab = make_trajectory(NoiseSchedule(), "time_uniform", 10)
    f = damping_factors(ab, 0.25)
    assert float(f[0]) == 1.0 and bool((f[1:] < 1).all()) and bool((f[1:] > 0).all())
    mse = lambda a: 0.1 + 0 * a  # noqa: E731
    assert float(damped_cpe(ab, mse, 0.25)) < float(cpe_paper(ab, mse))
    assert torch.isclose(damped_cpe(ab, mse, 1e12), cpe_paper(ab, mse))  # no damping for huge data variance
    # each paper term times its factor, batched like cpe_paper
    torch.testing.assert_close(damped_cpe(ab, mse, 0.25), (cpe_contributions(ab, mse) * f).sum(), rtol=1e-14, atol=0)
    rows = torch.stack([ab, ab**1.1])
    assert damped_cpe(rows, mse, 0.25).shape == (2,)
    torch.testing.assert_close(damped_cpe(rows, mse, 0.25)[1], damped_cpe(ab**1.1, mse, 0.25))
    assert DISC_SOLVERS == DDIM_LIKE


def test_curvature_validation_and_round_trip() -> None:
    c = Curvature((-1.0, 0.0, 2.0), (1.0, 2.0, 4.0), 3, 10, 0.2)
    assert Curvature.from_dict(c.to_dict()) == c
    v = c(torch.sigmoid(torch.tensor([-5.0, -0.5, 1.0, 9.0], dtype=torch.float64)))
    assert torch.allclose(v, torch.tensor([1.0, math.sqrt(2), 2 * math.sqrt(2), 4.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="increase strictly"):
        Curvature((0.0, 0.0), (1.0, 1.0))
    with pytest.raises(ValueError, match="two equally long"):
        Curvature((0.0,), (1.0,))
    with pytest.raises(ValueError, match="Unknown disc mode 'x'"):
        disc_error(torch.tensor([0.9, 0.5], dtype=torch.float64), c, "x")


@pytest.mark.parametrize("trust", ["alpha", "logsnr"])
@pytest.mark.parametrize("pin", [False, True])
def test_optimize_disc_improves_within_the_trust_region(setup, trust: str, pin: bool) -> None:
    sch, _, cur = setup
    base = make_trajectory(sch, "time_quadratic", 10)
    mse = lambda a: 0.02 + 0.3 * a * (1 - a)  # noqa: E731
    st = OptimizeSettings(lp=0.05, trust=trust, pin_start=pin, reg_lambda=100.0)
    r = optimize_disc(base, mse, cur, st, damping=True, data_var=C2)
    assert isinstance(r, DiscResult) and r.alpha_bar.dtype == torch.float64 and r.damping
    ab = r.alpha_bar
    assert r.loss <= r.loss_before and r.loss < 0.999 * r.loss_before
    assert r.loss == pytest.approx(r.cpe_after + r.disc_after + (0 if pin else 100.0 * (ab[-1] - base[-1]) ** 2))
    assert float(damped_cpe(ab, mse, C2)) == pytest.approx(r.cpe_after, rel=1e-14)
    assert bool((ab[1:] < ab[:-1]).all())
    lo, hi = trust_bounds(base, st)
    if trust == "logsnr":
        lam = alpha_bar_to_lambda(ab).numpy()
        assert np.all(lam >= lo - 1e-9) and np.all(lam <= hi + 1e-9)
    else:
        ratio = (ab / torch.cat([ab.new_ones(1), ab[:-1]])).numpy()
        n = ratio.size - (1 if pin else 0)  # pinned: the last ratio is whatever holds the start
        assert np.all(ratio[:n] >= lo[:n] * (1 - 1e-9)) and np.all(ratio[:n] <= hi[:n] * (1 + 1e-9))
    if pin:
        assert float(ab[-1]) == float(base[-1])


def test_without_disc_and_damping_it_minimises_the_paper_cpe(setup) -> None:
    sch, _, cur = setup
    base = make_trajectory(sch, "logSNR", 10)
    mse = lambda a: 0.02 + 0.3 * a * (1 - a)  # noqa: E731
    st = OptimizeSettings(lp=0.05, pin_start=True)
    r = optimize_disc(base, mse, cur, st, mode="none")
    ref = optimize_trajectory(base, mse, st)
    assert abs(r.disc_after) == 0.0
    assert r.cpe_after <= ref.cpe_after * (1 + 1e-3)  # same objective, same box: as good as the VRG optimizer


def test_disc_result_dict_keeps_the_stored_keys(setup) -> None:
    """``vrg tune`` stores ``to_dict()``: the keys (and order) of the plain dict optimize_disc used to return; the
    values read as ``r[key]`` as before."""
    sch, _, cur = setup
    r = optimize_disc(make_trajectory(sch, "logSNR", 5), lambda a: 0.1 + a, cur, OptimizeSettings(lp=0.05))
    d = r.to_dict()
    assert list(d) == ["alpha_bar", "base_alpha_bar", "cpe_before", "cpe_after", "disc_before", "disc_after",
                       "loss_before", "loss", "seconds", "disc_mode", "damping"]
    assert d["alpha_bar"] == r.alpha_bar.tolist() and all(type(v) is float for v in d["base_alpha_bar"])
    assert r["loss"] == r.loss and r["disc_mode"] == "coherent" and r["damping"] is False


@pytest.mark.parametrize("trust", ["alpha", "logsnr"])
def test_optimize_disc_keeps_the_trained_range(setup, trust: str) -> None:
    """With an MSE that pulls the cleanest step to ᾱ -> 1 and the noisiest below the schedule, the disc candidate
    stays in settings.alpha_bar_range (the schedule's)."""
    sch, _, cur = setup
    base = make_trajectory(sch, "logSNR", 8)
    mse = lambda a: 1e-4 + 0.6 * torch.sigmoid((torch.log(a) - torch.log1p(-a) - 2) / 2.5)  # noqa: E731
    lo, hi = sch.alpha_bar_min, sch.alpha_bar_max
    st = OptimizeSettings(lp=0.3, reg_lambda=0.0, trust=trust, alpha_bar_range=(lo, hi))
    r = optimize_disc(base, mse, cur, st, mode="none")
    assert float(r.alpha_bar[0]) <= hi and float(r.alpha_bar[-1]) >= lo * (1 - 1e-12)
    assert r.loss <= r.loss_before
    if trust == "alpha":  # unbounded, the cleanest step leaves the range
        free = optimize_disc(base, mse, cur, dataclasses.replace(st, alpha_bar_range=None), mode="none")
        assert float(free.alpha_bar[0]) > hi
