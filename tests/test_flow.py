"""Rectified-flow models end to end: training targets, the ε-error the profiler gets, VRGScheduler in a diffusers
pipeline loop, export, and bad input."""

from __future__ import annotations

import pytest
import torch
from helpers import TINY_UNET

from vrg_lightning.denoiser import Denoiser
from vrg_lightning.export import export_trajectory
from vrg_lightning.module import DiffusionModule
from vrg_lightning.paths import RectifiedFlow, VEPath
from vrg_lightning.scheduler import VRGScheduler
from vrg_lightning.solvers import sample
from vrg_lightning.trajectories import make_trajectory

torch.set_num_threads(1)


def _flow_module(**kw) -> DiffusionModule:
    torch.manual_seed(0)
    return DiffusionModule(unet=dict(TINY_UNET), noise_path="rectified_flow", prediction_type="flow", **kw)


def test_flow_training_step_trains_the_velocity_and_reports_the_epsilon_error() -> None:
    m = _flow_module(shift=3.0)
    x0 = torch.rand(4, 1, 16, 16) * 2 - 1
    t = torch.tensor([0, 250, 700, 999])
    eps = torch.randn_like(x0)
    m.draw_noise = lambda x, batch: (t, eps)
    out = m.training_step(x0, 0)
    sig = m.schedule.timesteps[t] / 1000  # the level's σ: x = (1-σ) x₀ + σ ε is what the UNet sees
    s4 = sig.float().view(-1, 1, 1, 1)
    x = (1 - s4) * x0 + s4 * eps
    v_hat = m.model.unet(x, sig.float() * 1000).sample
    torch.testing.assert_close(out["loss"], torch.nn.functional.mse_loss(v_hat, eps - x0), rtol=1e-4, atol=1e-5)
    # the profiler's error is the ε-error: ε̂ - ε = (1-σ)(v̂ - v)
    torch.testing.assert_close(out["vrg_error"], (1 - s4) * (v_hat - (eps - x0)), rtol=1e-4, atol=1e-5)
    ab = out["vrg_alpha_bar"]
    torch.testing.assert_close(ab, (1 - sig) ** 2 / ((1 - sig) ** 2 + sig**2))


@pytest.mark.parametrize("solver", ["ddim", "dpmpp_2m", "dpmsolver2", "pndm"])
def test_vrg_scheduler_in_a_pipeline_loop_equals_the_toolkit_sampler(solver: str) -> None:
    """The loop of a diffusers flow pipeline (model called with the scheduler's timesteps on the path's own x)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    torch.manual_seed(0)
    path = RectifiedFlow(shift=3.0)
    den = Denoiser(dict(TINY_UNET), path, "flow").double().eval()
    ab = make_trajectory(path, "time_uniform", 6)
    sched = VRGScheduler.from_config(FlowMatchEulerDiscreteScheduler(shift=3.0).config, alpha_bar=ab.tolist(),
                                     solver=solver)
    assert sched.schedule == path and sched.config.prediction_type == "flow"
    x_vp = torch.randn(3, 1, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        want = sample(solver, den.eps_fn(), x_vp, ab)
        sched.set_timesteps(6)
        x = x_vp * sched.init_noise_sigma  # the path's own coordinates: c · x_vp
        for t in sched.timesteps:
            v = den.unet(x, t).sample
            x = sched.step(v, t, x).prev_sample
    torch.testing.assert_close(x, want, rtol=1e-8, atol=1e-8)  # float64: only the c · x / c rounding differs
    assert abs(sched.init_noise_sigma - float(path.input_scale(ab[-1:]))) < 1e-12 and sched.init_noise_sigma < 1


def test_export_gives_flow_sigmas_and_float_timesteps() -> None:
    path = RectifiedFlow()
    ab = make_trajectory(path, "time_uniform", 5)
    sig = export_trajectory(ab, path, "sigmas")
    want = (path.alpha_bar_to_t(ab) / 1000).flip(0)
    torch.testing.assert_close(torch.tensor(sig.values, dtype=torch.float64), want, rtol=1e-6, atol=0)
    # float32 σ: near σ = 1 the rounding of 1 - σ dominates (2.6e-5 relative at the noisiest level)
    torch.testing.assert_close(torch.tensor(sig.alpha_bar_exported, dtype=torch.float64), ab, rtol=1e-4, atol=0)
    ts = export_trajectory(ab, path, "timesteps")
    assert ts.values == path.alpha_bar_to_t(ab).flip(0).tolist() and ts.alpha_bar_exported == ab.tolist()


@pytest.mark.parametrize(("kw", "match"), [
    ({"noise_path": "rectified_flow", "prediction_type": "flow", "beta_schedule": "linear"}, "no beta schedule"),
    ({"noise_path": "rectified_flow", "prediction_type": "flow", "shift": 0.0}, "shift must be a positive"),
    ({"noise_path": "rectified_flow", "prediction_type": "v_prediction"}, "not defined on the rectified_flow"),
    ({"shift": 3.0}, "rectified-flow setting"),
    ({"noise_path": "ve", "prediction_type": "v_prediction"}, "not defined on the ve"),
    ({"noise_path": "flow_matching"}, "Unknown noise path"),
])
def test_module_bad_path_settings(kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DiffusionModule(unet=dict(TINY_UNET), **kw)


def test_flow_checkpoint_roundtrip_keeps_the_path() -> None:
    m = _flow_module(shift=2.0)
    again = Denoiser.from_config(m.model.config())
    assert again.schedule == RectifiedFlow(shift=2.0) and again.prediction_type == "flow"
    assert VEPath().to_dict()["path"] == "ve"


@pytest.mark.parametrize(("path", "pred"), [(VEPath(sigma_max=80.0, conditioning="edm"), "sample"),
                                            (VEPath(), "epsilon")])
def test_vrg_scheduler_loop_on_ve_equals_the_toolkit_sampler(path, pred: str) -> None:
    """VE: the pipeline's samples are x₀ + σ ε (init_noise_sigma ≈ σ_max), the model is called with c_noise or σ."""
    torch.manual_seed(0)
    den = Denoiser(dict(TINY_UNET), path, pred).double().eval()
    ab = make_trajectory(path, "karras", 5)
    sched = VRGScheduler(alpha_bar=ab.tolist(), solver="dpmpp_2m", noise_path=path.to_dict(), prediction_type=pred)
    assert abs(sched.init_noise_sigma - (1 / float(ab[-1])) ** 0.5) < 1e-9  # √(1 + σ_max²)
    few = VEPath(num_train_timesteps=500)
    assert len(VRGScheduler(alpha_bar=make_trajectory(few, "karras", 3).tolist(), noise_path=few.to_dict())) == 500
    x_vp = torch.randn(2, 1, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        want = sample("dpmpp_2m", den.eps_fn(), x_vp, ab)
        sched.set_timesteps(5)
        x = x_vp * sched.init_noise_sigma
        for t in sched.timesteps:
            x = sched.step(den.unet(x, t).sample, t, x).prev_sample
    torch.testing.assert_close(x, want, rtol=1e-8, atol=1e-8)


def test_schedule_files_name_any_noise_path(tmp_path) -> None:
    """`--schedule FILE` for a model from outside: a FlowMatch scheduler config is rectified flow, a stored path
    dict (e.g. EDM) that path; a file that is neither is refused."""
    import json

    from diffusers import FlowMatchEulerDiscreteScheduler

    from vrg_lightning.models.external import schedule_from

    FlowMatchEulerDiscreteScheduler(shift=3.0).save_config(tmp_path / "flow")
    assert schedule_from(tmp_path / "flow" / "scheduler_config.json") == (RectifiedFlow(shift=3.0), None)
    edm = tmp_path / "edm.json"
    edm.write_text(json.dumps({"path": "ve", "sigma_min": 0.002, "sigma_max": 80.0, "conditioning": "edm",
                               "prediction_type": "sample"}))
    assert schedule_from(edm) == (VEPath(conditioning="edm"), "sample")
    (tmp_path / "x.json").write_text(json.dumps({"lr": 1}))
    with pytest.raises(ValueError, match="not a diffusers scheduler config"):
        schedule_from(tmp_path / "x.json")
