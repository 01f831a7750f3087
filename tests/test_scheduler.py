"""``VRGScheduler``: the toolkit's solvers as a diffusers scheduler. Pipelines sample what ``solvers.sample`` samples,
integer trajectories reproduce diffusers' own schedulers, a profiled ``DDPMPipeline`` folder samples exactly its stored
continuous trajectory, configs round-trip, and misuse is a clear error."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from diffusers import (
    DDIMPipeline,
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    UNet2DModel,
)
from helpers import TINY_UNET, make_checkpoint

from vrg_lightning import VRGScheduler
from vrg_lightning.cli import main
from vrg_lightning.schedule import NoiseSchedule
from vrg_lightning.solvers import SOLVERS, num_evaluations, sample
from vrg_lightning.trajectories import make_trajectory

SCHED = NoiseSchedule()
SHAPE = (2, 1, 16, 16)
AB = torch.sigmoid(torch.logit(make_trajectory(SCHED, "logSNR", 8)) + 0.15)  # off the integer-timestep grid


@pytest.fixture(scope="module")
def unet() -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(**TINY_UNET).eval()


def toolkit_eps(unet: UNet2DModel, prediction_type: str = "epsilon"):
    """The toolkit's model evaluation (docs/ARCHITECTURE.md): the UNet at the continuous t(ᾱ), read as ε, v or x₀."""

    def eps_fn(x: torch.Tensor, ab: torch.Tensor) -> torch.Tensor:
        out = unet(x, SCHED.alpha_bar_to_t(ab)).sample
        a, s = ab.sqrt().to(x.dtype), (1 - ab).sqrt().to(x.dtype)
        return {"epsilon": out, "v_prediction": a * out + s * x, "sample": (x - a * out) / s}[prediction_type]

    return eps_fn


def run_pipeline(pipe_cls, unet: UNet2DModel, scheduler, steps: int, seed: int = 3) -> dict:
    """Run ``pipe_cls`` with ``scheduler``: its images (np), the final sample before post-processing (the last
    ``prev_sample``) and every UNet input ``(x, t)``."""
    finals, inputs = [], []
    step = scheduler.step

    def recording_step(*args, **kwargs):
        out = step(*args, **kwargs)
        finals.append(out.prev_sample)
        return out

    scheduler.step = recording_step
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = pipe_cls(unet=unet, scheduler=DDIMScheduler() if pipe_cls is DDIMPipeline else DDPMScheduler())
    pipe.scheduler = scheduler  # DDIMPipeline's constructor would convert any scheduler to DDIM
    pipe.set_progress_bar_config(disable=True)
    hook = unet.register_forward_pre_hook(lambda m, args: inputs.append((args[0].clone(), args[1])))
    try:
        images = pipe(batch_size=SHAPE[0], generator=torch.Generator().manual_seed(seed), num_inference_steps=steps,
                      output_type="np").images
    finally:
        hook.remove()
    return {"images": images, "final": finals[-1], "inputs": inputs}


def noise(seed: int = 3) -> torch.Tensor:
    """The starting noise of the pipelines above (``randn_tensor`` on the CPU with that generator)."""
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


def images_of(x: torch.Tensor):
    """DDPM/DDIM pipelines' post-processing of a final sample."""
    return (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-5) -> None:
    """Equal to float32 precision relative to the largest value (finals reach |x| ~ 500 from σ_max ≈ 157)."""
    assert float((a - b).abs().max()) <= rtol * float(b.abs().max()), float((a - b).abs().max() / b.abs().max())


# --- pipelines sample what the toolkit samples ---------------------------------------------------------------
@pytest.mark.parametrize("pipe_cls", [DDPMPipeline, DDIMPipeline], ids=["DDPMPipeline", "DDIMPipeline"])
@pytest.mark.parametrize("solver", SOLVERS)
def test_pipeline_equals_toolkit_sampler(unet: UNet2DModel, pipe_cls, solver: str) -> None:
    seen: list[dict] = []
    with torch.no_grad():
        ref = sample(solver, toolkit_eps(unet), noise(), AB, callback=seen.append)
    got = run_pipeline(pipe_cls, unet, VRGScheduler(alpha_bar=AB, solver=solver), len(AB))
    # every model evaluation at the solver's noise level (pndm midpoints, plms' repeat), at the same input
    assert len(got["inputs"]) == len(seen) == num_evaluations(solver, len(AB))
    levels = torch.stack([d["alpha_bar"] for d in seen])
    assert torch.equal(torch.stack([t for _, t in got["inputs"]]), SCHED.alpha_bar_to_t(levels))
    for (x, _), d in zip(got["inputs"], seen, strict=True):
        close(x, d["x"])
    close(got["final"], ref)
    assert abs(got["images"] - images_of(got["final"])).max() == 0
    assert abs(got["images"] - images_of(ref)).max() < 1e-4


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_prediction_types(unet: UNet2DModel, prediction_type: str) -> None:
    with torch.no_grad():
        ref = sample("dpmpp_2m", toolkit_eps(unet, prediction_type), noise(), AB)
        eps_ref = sample("dpmpp_2m", toolkit_eps(unet), noise(), AB)
    got = run_pipeline(DDPMPipeline, unet, VRGScheduler(alpha_bar=AB, solver="dpmpp_2m",
                                                        prediction_type=prediction_type), len(AB))
    close(got["final"], ref, rtol=1e-4)
    assert float((ref - eps_ref).abs().max()) > 1e-2 * float(ref.abs().max())  # the reading matters


def analytic_eps(x: torch.Tensor, ab: torch.Tensor) -> torch.Tensor:
    ab = ab.to(x.dtype)
    return x * (1 - ab).sqrt() / (0.25 * ab + 1 - ab) + 0.2 * torch.tanh(x) + 0.1 * torch.sin(5 * ab)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("solver", SOLVERS)
def test_steps_are_the_solver_code_bit_for_bit(solver: str, dtype: torch.dtype) -> None:
    """Fed the model outputs ``sample()`` saw, each ``prev_sample`` is ``sample()``'s next model input and the last one
    its result, exactly; ``timesteps`` are t(ᾱ) of its evaluations and ``pred_original_sample`` is x̂₀."""
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(1), dtype=dtype)
    seen: list[dict] = []
    ref = sample(solver, analytic_eps, x, AB, callback=seen.append)
    sched = VRGScheduler(alpha_bar=AB, solver=solver)
    sched.set_timesteps(len(AB))
    assert torch.equal(sched.timesteps, SCHED.alpha_bar_to_t(torch.stack([d["alpha_bar"] for d in seen])))
    cur = x
    for k, t in enumerate(sched.timesteps):
        out = sched.step(seen[k]["eps"], t, cur)
        ab = seen[k]["alpha_bar"]
        torch.testing.assert_close(out.pred_original_sample, (cur - (1 - ab).sqrt() * seen[k]["eps"]) / ab.sqrt(),
                                   rtol=1e-5, atol=1e-5)
        cur = out.prev_sample
        assert torch.equal(cur, ref if k == len(seen) - 1 else seen[k + 1]["x"]), k
    assert cur.dtype == dtype


# --- integer trajectories: diffusers' own schedulers ---------------------------------------------------------
@pytest.mark.parametrize(("solver", "make", "final"), [
    ("ddim", lambda: DDIMScheduler(clip_sample=False, set_alpha_to_one=True), 1.0),
    ("ddim", lambda: DDIMScheduler(clip_sample=False, set_alpha_to_one=False, steps_offset=1), "t0"),
    ("dpmpp_2m", lambda: DPMSolverMultistepScheduler(), 1.0),  # DPM-Solver++, order 2, final_sigmas_type zero
], ids=["DDIMScheduler", "DDIMScheduler-set_alpha_to_one=False", "DPMSolverMultistepScheduler"])
@pytest.mark.parametrize("steps", [10, 25])
def test_integer_trajectory_equals_diffusers(unet: UNet2DModel, solver: str, make, final, steps: int) -> None:
    theirs = make()
    theirs.set_timesteps(steps)
    ab = SCHED.alphas_cumprod[theirs.timesteps.flip(0)]  # the same noise levels, cleanest first
    ours = VRGScheduler(alpha_bar=ab, solver=solver,
                        final_alpha_bar=float(SCHED.alphas_cumprod[0]) if final == "t0" else 1.0)
    torch.testing.assert_close(ours.timesteps, theirs.timesteps.double(), rtol=0, atol=1e-9)
    pipe_cls = DDIMPipeline if solver == "ddim" else DDPMPipeline
    a, b = run_pipeline(pipe_cls, unet, make(), steps), run_pipeline(pipe_cls, unet, ours, steps)
    close(b["final"], a["final"])  # diffusers computes in float32 (its alphas_cumprod too): ~1e-6 relative
    assert abs(a["images"] - b["images"]).max() < 1e-4


# --- a profiled DDPMPipeline folder samples its stored trajectory --------------------------------------------
def ddim_loop(unet: UNet2DModel, x: torch.Tensor, ab: torch.Tensor) -> torch.Tensor:
    """Textbook DDIM (η = 0): x' = √ᾱ' x̂₀ + √(1-ᾱ') ε̂, x̂₀ = (x - √(1-ᾱ) ε̂)/√ᾱ, ending at x̂₀ (ᾱ = 1)."""
    levels = [float(a) for a in ab.flip(0)] + [1.0]
    for a, a_next in zip(levels, levels[1:], strict=False):
        eps = unet(x, SCHED.alpha_bar_to_t(torch.tensor(a, dtype=torch.float64))).sample
        x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
        x = math.sqrt(a_next) * x0 + math.sqrt(1 - a_next) * eps
    return x


def dpmpp_2m_loop(unet: UNet2DModel, x: torch.Tensor, ab: torch.Tensor) -> torch.Tensor:
    """DPM-Solver++(2M) as Lu et al. 2022b Alg. 2 in α = √ᾱ, σ = √(1-ᾱ), λ = log(α/σ): first step first order, the
    step into σ = 0 first order (x = x̂₀), else x' = (σ'/σ) x - α'(e^{-h} - 1)((1 + 1/2r) x̂₀ - x̂₀_prev/2r)."""
    levels = [float(a) for a in ab.flip(0)]
    lam = [0.5 * math.log(a / (1 - a)) for a in levels]
    x0_prev = None
    for i, a in enumerate(levels):
        eps = unet(x, SCHED.alpha_bar_to_t(torch.tensor(a, dtype=torch.float64))).sample
        x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
        if i == len(levels) - 1:
            return x0
        a_next = levels[i + 1]
        h = lam[i + 1] - lam[i]
        if x0_prev is None:
            d = x0
        else:
            r = (lam[i] - lam[i - 1]) / h
            d = (1 + 1 / (2 * r)) * x0 - x0_prev / (2 * r)
        x = math.sqrt((1 - a_next) / (1 - a)) * x - math.sqrt(a_next) * math.expm1(-h) * d
        x0_prev = x0
    raise AssertionError("unreachable")


def test_profiled_ddpm_folder_samples_the_stored_trajectory(unet: UNet2DModel, tmp_path: Path) -> None:
    """``save_pretrained`` → ``vrg profile --diffusers-dir`` → ``VRGScheduler.from_checkpoint``: the UNet is evaluated
    at exactly the stored continuous ᾱ values, and independent DDIM / DPM-Solver++(2M) loops give the same images."""
    folder, prof = tmp_path / "ddpm", tmp_path / "profiled.pt"
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(folder)
    assert main(["profile", "--diffusers-dir", str(folder), "--data", "digits", "--out", str(prof), "--samples",
                 "256", "--bins", "20", "--solvers", "ddim,dpmpp_2m", "--steps", "6", "--bases", "logSNR", "--lps",
                 "0.05", "--json"]) == 0
    stored = {e["solver"]: e["alpha_bar"] for e in torch.load(prof, weights_only=True)["vrg"]["entries"]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe_unet = DDPMPipeline.from_pretrained(folder).unet.eval()
    for solver, loop in (("ddim", ddim_loop), ("dpmpp_2m", dpmpp_2m_loop)):
        sched = VRGScheduler.from_checkpoint(prof, solver=solver, steps=6)
        ab = torch.tensor(stored[solver], dtype=torch.float64)
        assert sched.config.alpha_bar == stored[solver] and sched.config.source["base"] == "logSNR"
        t = SCHED.alpha_bar_to_t(ab).flip(0)
        assert (t - t.round()).abs().max() > 0.01  # a continuous trajectory, not integer timesteps
        got = run_pipeline(DDPMPipeline, pipe_unet, sched, 6)
        assert torch.equal(torch.stack([t for _, t in got["inputs"]]), t)  # exactly the stored noise levels
        with torch.no_grad():
            ref = loop(pipe_unet, noise(), ab)
        close(got["final"], ref)
        assert abs(got["images"] - images_of(ref)).max() < 1e-4


# --- construction, config round trip, contract ------------------------------------------------------------
def test_from_checkpoint_takes_the_validated_winner(tmp_path: Path) -> None:
    base = make_trajectory(SCHED, "time_uniform", 4)
    winner = {"solver": "ddim", "steps": 4, "base": "time_uniform", "objective": "solver", "lp": 0.3,
              "alpha_bar": torch.sigmoid(torch.logit(base) - 0.1).tolist(), "validated": {"selected": True}}
    ckpt = make_checkpoint(tmp_path / "m.ckpt", extra_entries=[winner])
    sched = VRGScheduler.from_checkpoint(ckpt, solver="ddim", steps=4, base="time_uniform")
    assert sched.config.alpha_bar == winner["alpha_bar"]
    assert sched.config.source == {"checkpoint": str(ckpt), "steps": 4, "base": "time_uniform", "objective": "solver",
                                   "lp": 0.3, "validated": True}
    assert VRGScheduler.from_checkpoint(ckpt, solver="ddim", steps=4).config.alpha_bar == winner["alpha_bar"]
    plain = make_checkpoint(tmp_path / "plain.ckpt")  # (ddim, 4) for two bases, neither validated
    with pytest.raises(ValueError, match=r"2 stored VRG trajectories match solver=ddim, steps=4"):
        VRGScheduler.from_checkpoint(plain, solver="ddim", steps=4)
    with pytest.raises(ValueError, match=r"No stored VRG trajectory for solver=pndm, steps=4"):
        VRGScheduler.from_checkpoint(plain, solver="pndm", steps=4)


def test_from_checkpoint_picks_the_entry_of_a_guidance_scale(tmp_path: Path) -> None:
    base = make_trajectory(SCHED, "logSNR", 4)
    per_w = {w: {"solver": "ddim", "steps": 4, "base": "logSNR", "objective": "paper", "lp": 0.1,
                 "guidance_scale": w, "alpha_bar": torch.sigmoid(torch.logit(base) + 0.01 * w).tolist()}
             for w in (3.0, 7.5)}
    ckpt = make_checkpoint(tmp_path / "g.ckpt", extra_entries=list(per_w.values()))
    for w, entry in per_w.items():
        sched = VRGScheduler.from_checkpoint(ckpt, solver="ddim", steps=4, base="logSNR", guidance_scale=w)
        assert sched.config.alpha_bar == entry["alpha_bar"]
    with pytest.raises(ValueError, match="No stored VRG trajectory"):
        VRGScheduler.from_checkpoint(ckpt, solver="ddim", steps=4, base="logSNR", guidance_scale=5.0)


def test_save_and_load_round_trip_the_trajectory(tmp_path: Path, unet: UNet2DModel) -> None:
    ab = torch.sigmoid(torch.logit(make_trajectory(SCHED, "karras", 7)) + 1e-3 * torch.rand(7, dtype=torch.float64))
    sched = VRGScheduler(alpha_bar=ab, solver="deis", solver_options={"order": 2}, beta_schedule="scaled_linear",
                         beta_end=0.012, prediction_type="v_prediction", source={"note": "x"})
    sched.save_pretrained(tmp_path / "s")
    back = VRGScheduler.from_pretrained(tmp_path / "s")
    assert torch.equal(back.alpha_bar, ab) and torch.equal(back.timesteps, sched.timesteps)
    public = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    assert public(back.config) == public(sched.config)
    assert json.loads((tmp_path / "s" / "scheduler_config.json").read_text())["alpha_bar"] == ab.tolist()
    # as a pipeline component: pipe.save_pretrained records it, DDPMPipeline.from_pretrained loads it back
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler())
        pipe.scheduler = sched
        pipe.save_pretrained(tmp_path / "p")
        again = DDPMPipeline.from_pretrained(tmp_path / "p").scheduler
    assert isinstance(again, VRGScheduler) and torch.equal(again.alpha_bar, ab)
    # another scheduler's config gives the noise schedule (its other keys are dropped quietly)
    other = VRGScheduler.from_config(DDPMScheduler(beta_schedule="squaredcos_cap_v2").config, alpha_bar=ab)
    assert other.config.beta_schedule == "squaredcos_cap_v2" and other.schedule == NoiseSchedule("squaredcos_cap_v2")


def test_diffusers_contract() -> None:
    sched = VRGScheduler(alpha_bar=AB, solver="pndm")
    assert sched.init_noise_sigma == 1.0 and len(sched) == 1000 and sched.order == 1
    x = torch.randn(SHAPE)
    assert sched.scale_model_input(x, sched.timesteps[0]) is x
    sched.set_timesteps(None, device="cpu")
    assert sched.num_inference_steps == 8 and len(sched.timesteps) == 17 and sched.timesteps.dtype == torch.float64
    assert torch.equal(sched.evaluation_alpha_bar[[0, -1]], AB.flip(0)[[0, -1]])
    prev, x0 = sched.step(torch.zeros_like(x), sched.timesteps[0], x, return_dict=False)
    torch.testing.assert_close(x0, x / AB[-1].sqrt().float())  # ε̂ = 0: x̂₀ = x / √ᾱ
    # set_timesteps restarts: the same outputs again
    sched.set_timesteps(8)
    assert torch.equal(sched.step(torch.zeros_like(x), float(sched.timesteps[0]), x).prev_sample, prev)


def test_misuse_is_a_clear_error() -> None:
    sched = VRGScheduler(alpha_bar=AB, solver="dpmpp_2m")
    x = torch.randn(SHAPE)
    with pytest.raises(ValueError, match=r"num_inference_steps must be 8, the number of values of the VRG trajectory "
                                         r"\(dpmpp_2m: 8 model evaluations\); got 50"):
        sched.set_timesteps(50)
    with pytest.raises(ValueError, match=r"step 0 expects timestep .* \(timesteps\[0\]\); got 999"):
        sched.step(x, 999, x)
    with pytest.raises(ValueError, match="eta must be 0"):
        sched.step(x, sched.timesteps[0], x, eta=0.5)
    with pytest.raises(ValueError, match=r"model_output must be a tensor shaped like sample \(2, 1, 16, 16\); got "
                                         r"\(1, 1, 16, 16\)"):
        sched.step(x[:1], sched.timesteps[0], x)
    out = sched.step(x, sched.timesteps[0], x).prev_sample
    with pytest.raises(ValueError, match="step 1: sample must be the prev_sample returned by step 0"):
        sched.step(x, sched.timesteps[1], out.clone())
    for t in sched.timesteps[1:]:
        out = sched.step(x, t, out).prev_sample
    with pytest.raises(ValueError, match=r"All 8 model evaluations of this trajectory are done; call set_timesteps"):
        sched.step(x, sched.timesteps[-1], out)
    for kwargs, match in [
        ({}, r"needs alpha_bar=\[...\]"),
        ({"alpha_bar": AB.flip(0)}, "strictly decreasing"),
        ({"alpha_bar": AB, "solver": "euler"}, "Unknown solver 'euler'"),
        ({"alpha_bar": AB, "solver": "ddim", "solver_options": {"order": 2}}, r"unknown option\(s\) order"),
        ({"alpha_bar": AB, "solver": "pndm", "solver_options": {"midpoint": lambda a, b: a}}, "cannot be stored"),
        ({"alpha_bar": AB[:3], "solver": "pndm"}, "at least 4 values"),
        ({"alpha_bar": AB, "prediction_type": "velocity"}, "prediction_type must be one of epsilon, v_prediction"),
        ({"alpha_bar": AB, "prediction_type": "flow"}, "'flow' is not defined on the vp_discrete noise path"),
        ({"alpha_bar": AB, "shift": 0.0}, "shift must be a positive number"),
        ({"alpha_bar": [0.99, 0.5, 1e-5], "noise_path": {"path": "ve", "sigma_max": 80.0}},
         "outside the model's noise"),
        ({"alpha_bar": AB, "trained_betas": [0.1] * 1000}, "trained_betas are not supported"),
    ]:
        with pytest.raises(ValueError, match=match):
            VRGScheduler(**kwargs)
