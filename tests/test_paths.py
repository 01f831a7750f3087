"""Noise paths: conversions, construction, bad input, and the Monte-Carlo check of the cpe on every path × solver."""

from __future__ import annotations

import math

import pytest
import torch

from vrg_lightning.models.base import EpsModel, to_epsilon, training_target
from vrg_lightning.paths import NOISE_PATHS, RectifiedFlow, VEPath, VPContinuous, noise_path
from vrg_lightning.schedule import NoisePath, NoiseSchedule
from vrg_lightning.solvers import SOLVERS, sample
from vrg_lightning.trajectories import make_trajectory
from vrg_lightning.variance import cpe

torch.set_num_threads(1)

PATHS = {
    "vp_discrete": (NoiseSchedule(), "v_prediction"),
    "vp_continuous": (VPContinuous(kind="cosine"), "epsilon"),
    "ve": (VEPath(sigma_min=0.002, sigma_max=80.0, conditioning="edm"), "sample"),
    "rectified_flow": (RectifiedFlow(shift=3.0), "flow"),
}


@pytest.mark.parametrize("name", NOISE_PATHS)
def test_time_and_level_conversions_are_inverse_and_stored_exactly(name: str) -> None:
    path = PATHS[name][0]
    ab = path.alphas_cumprod
    assert bool((ab[1:] < ab[:-1]).all()) and path.alpha_bar_max == float(ab[0]) and path.alpha_bar_min == float(ab[-1])
    torch.testing.assert_close(path.alpha_bar_to_t(ab), path.timesteps, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(path.t_to_alpha_bar(path.timesteps), ab, rtol=1e-9, atol=0)
    i = torch.tensor([0.0, 17.25, 998.5], dtype=torch.float64)
    torch.testing.assert_close(path.alpha_bar_to_index(path.index_to_alpha_bar(i)), i)
    assert NoisePath.from_dict(path.to_dict()) == path and type(NoisePath.from_dict(path.to_dict())) is type(path)


def test_path_coordinates() -> None:
    """x = α x₀ + σ ε of each path equals c · x_vp, with the path's own α, σ."""
    x0, eps = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    rf = RectifiedFlow()
    sig = torch.tensor(0.3, dtype=torch.float64)
    ab = rf.t_to_alpha_bar(sig * rf.num_train_timesteps)
    x_vp = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    torch.testing.assert_close(rf.input_scale(ab) * x_vp, (1 - sig) * x0 + sig * eps)
    ve = VEPath()
    ab = ve.t_to_alpha_bar(torch.tensor(3.0, dtype=torch.float64))  # conditioning "sigma": t = σ
    x_vp = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    torch.testing.assert_close(ve.input_scale(ab) * x_vp, x0 + 3.0 * eps)
    assert NoiseSchedule().input_scale(ab) is None


def test_flow_levels_and_config_follow_diffusers() -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    cfg = FlowMatchEulerDiscreteScheduler(shift=3.0).config
    rf = NoisePath.from_dict(cfg)
    assert rf == RectifiedFlow(num_train_timesteps=1000, shift=3.0)
    u = torch.tensor([0.25, 0.5], dtype=torch.float64)
    shifted = 3 * u / (1 + 2 * u)  # diffusers' shift of the unshifted σ
    idx = (u - 1e-3) / (1 - 2e-3) * 999
    ab = rf.index_to_alpha_bar(idx)
    torch.testing.assert_close(rf.alpha_bar_to_t(ab) / 1000, shifted, rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match="use_dynamic_shifting"):
        NoisePath.from_dict(dict(FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True).config))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample", "flow"])
def test_every_prediction_type_converts_back_to_epsilon(prediction_type: str) -> None:
    x0, eps = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    ab = torch.tensor([0.9, 0.4, 0.01], dtype=torch.float64)
    a, s = ab.sqrt()[:, None], (1 - ab).sqrt()[:, None]
    x = a * x0 + s * eps
    out = training_target(prediction_type, x0, eps, a, s)
    torch.testing.assert_close(to_epsilon(out, x, ab, prediction_type), eps)
    if prediction_type == "flow":  # diffusers' FlowMatch step reads v as dx/dσ = ε - x₀
        torch.testing.assert_close(out, eps - x0)


@pytest.mark.parametrize(("make", "match"), [
    (lambda: noise_path("rectified_flow", beta_schedule="linear"), "no beta schedule"),
    (lambda: RectifiedFlow(shift=0.0), "shift must be a positive"),
    (lambda: RectifiedFlow(shift=-2.0), "shift must be a positive"),
    (lambda: VEPath(sigma_min=1.0, sigma_max=0.5), "sigma_min < sigma_max"),
    (lambda: VEPath(conditioning="time"), "conditioning"),
    (lambda: VPContinuous(kind="cosine", t_max=1.0), "cosine"),
    (lambda: noise_path("edm"), "Unknown noise path"),
    (lambda: NoisePath.from_dict({"path": "flow"}), "Unknown noise path"),
    (lambda: NoiseSchedule.from_dict(RectifiedFlow().to_dict()), "NoisePath.from_dict"),
    (lambda: _Gauss(VEPath(), "v_prediction"), "'v_prediction' is not defined on the ve"),
    (lambda: _Gauss(NoiseSchedule(), "flow"), "'flow' is not defined on the vp_discrete"),
])
def test_bad_input_is_a_clear_error(make, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()


def test_ve_refuses_a_trajectory_outside_its_sigma_range() -> None:
    from vrg_lightning.sampling import generate

    den = _Gauss(VEPath(sigma_max=10.0), "sample")
    inside = make_trajectory(den.schedule, "karras", 5)
    assert generate(den, inside, "ddim", 2, 0).shape == (2, 8)
    with pytest.raises(ValueError, match="outside the model's noise range"):
        generate(den, make_trajectory(NoiseSchedule(), "karras", 5), "ddim", 2, 0)  # σ up to 157


# --- the Monte-Carlo check ------------------------------------------------------------------------------------------
S0 = 1e5  # data N(0, S0²): an error injected at σ (= σ/α, up to 3000 on rectified flow's levels) reaches the final
# sample scaled by the exact flow's gain S0/√(S0² + σ²) > 0.9995, i.e. with the solver's weights only, the model that
# cpe assumes (the denoiser's Jacobian neglected)


def _out_mse(ab: torch.Tensor) -> torch.Tensor:
    """The variance of the error added to the model's own output at ᾱ (any smooth positive function)."""
    lam = torch.log(ab) - torch.log1p(-ab)
    return 1e-2 * (1 + 0.5 * torch.tanh(lam / 4))


def _eps_mse(prediction_type: str, ab: torch.Tensor) -> torch.Tensor:
    """The ε-error variance an output error of variance ``_out_mse`` becomes (the derivative of to_epsilon)."""
    a, s = ab.sqrt(), (1 - ab).sqrt()
    k = {"epsilon": torch.ones_like(ab), "v_prediction": a, "sample": a / s, "flow": a / (a + s)}[prediction_type]
    return k**2 * _out_mse(ab)


def _scale_of(path: NoisePath, ab: torch.Tensor) -> torch.Tensor:
    """x / x_vp = √(α² + σ²) from each path's own α, σ (independent of NoisePath.input_scale)."""
    s = ((1 - ab) / ab).sqrt()  # σ/α
    if path.path == "ve":  # α = 1, σ = s
        return (1 + s**2).sqrt()
    if path.path == "rectified_flow":  # α = 1 - σ_f, σ = σ_f with σ_f / (1 - σ_f) = s
        sig = s / (1 + s)
        return ((1 - sig) ** 2 + sig**2).sqrt()
    return torch.ones_like(ab)


class _Gauss(EpsModel):
    """The exact denoiser of N(0, S0² I) data on a path, in the path's coordinates and prediction type, plus an
    independent N(0, _out_mse) error in its output when ``noisy``."""

    def __init__(self, path: NoisePath, prediction_type: str, noisy: bool = False, dim: int = 8,
                 s0: float = S0) -> None:
        super().__init__(path, prediction_type)
        self.noisy, self.dim, self.s0 = noisy, dim, s0
        self.gen = torch.Generator().manual_seed(1)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (self.dim,)

    def model_output(self, x, t, class_labels=None):
        ab = self.schedule.t_to_alpha_bar(t.double())  # the model knows its level only through its time input
        ab = ab.reshape(-1, *([1] * (x.ndim - 1))) if ab.ndim else ab
        x_vp = x / _scale_of(self.schedule, ab)
        a, s = ab.sqrt(), (1 - ab).sqrt()
        eps = s * x_vp / (a**2 * self.s0**2 + s**2)
        out = training_target(self.prediction_type, (x_vp - s * eps) / a, eps, a, s)
        if self.noisy:
            out = out + _out_mse(ab).sqrt() * torch.randn(x.shape, generator=self.gen, dtype=x.dtype)
        return out


@pytest.mark.parametrize("name", NOISE_PATHS)
@pytest.mark.parametrize("solver", SOLVERS)
def test_monte_carlo_final_error_variance_equals_the_predicted_cpe(name: str, solver: str) -> None:
    """Per path × solver: the variance of (noisy run - exact run) from the same start equals cpe_solver of the ε-MSE
    the path's prediction type implies, within the Monte-Carlo error (n = 32,768 scalars: 4 standard errors ≈ 3%)."""
    path, pred = PATHS[name]
    ab = make_trajectory(path, "logSNR", 6 if solver in ("pndm", "plms") else 5)
    n, dim = 4096, 8
    x = torch.randn(n, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    clean = sample(solver, _Gauss(path, pred).double().eps_fn(), x, ab)
    noisy = sample(solver, _Gauss(path, pred, noisy=True).double().eps_fn(), x, ab)
    measured = float((noisy - clean).var())
    predicted = float(cpe(ab, lambda a: _eps_mse(pred, a), "solver", solver=solver))
    tol = 4 * math.sqrt(2 / (n * dim))
    assert abs(measured / predicted - 1) < tol, (measured, predicted)
    if solver == "ddim":  # the paper's formula is DDIM's
        assert float(cpe(ab, lambda a: _eps_mse(pred, a), "paper")) == pytest.approx(predicted, rel=1e-9)


def test_monte_carlo_check_can_fail() -> None:
    """The check has power: reading a flow model's velocity error as if it were an ε-error (no (1-σ) factor)
    predicts a variance the Monte-Carlo run rejects."""
    path, pred = PATHS["rectified_flow"]
    ab = make_trajectory(path, "logSNR", 5)
    x = torch.randn(4096, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    diff = sample("ddim", _Gauss(path, pred, noisy=True).double().eps_fn(), x, ab) - \
        sample("ddim", _Gauss(path, pred).double().eps_fn(), x, ab)
    wrong = float(cpe(ab, _out_mse, "paper"))
    assert abs(float(diff.var()) / wrong - 1) > 0.2


@pytest.mark.parametrize("name", NOISE_PATHS)
def test_probe_measures_the_posterior_variance_on_every_path(name: str) -> None:
    """The exact denoiser of N(0, I) data has E‖ε̂ - ε‖²/d = ᾱ at every level of every path (the posterior variance
    of ε given x_vp): the probe (VP-coordinate noising on the path's levels, the path's time, the prediction-type
    conversion) must measure that, bin by bin (the input scale itself: test_path_coordinates)."""
    from vrg_lightning.probe import probe_profile

    path, pred = PATHS[name]
    data = torch.randn(512, 8, generator=torch.Generator().manual_seed(3))
    prof = probe_profile(_Gauss(path, pred, s0=1.0).double(), data, path, num_samples=8192, num_bins=8,
                         batch_size=1024)
    # mean of ᾱ over each bin's levels: the probe draws levels uniformly within a bin
    levels = path.alphas_cumprod
    idx = prof.bin_index(torch.log(levels) - torch.log1p(-levels))
    want = torch.stack([levels[idx == k].mean() for k in range(prof.num_bins)])
    torch.testing.assert_close(prof.mse.double(), want, rtol=0.1, atol=2e-3)
