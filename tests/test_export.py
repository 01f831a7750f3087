"""``vrg export``: sigmas for diffusers' Euler scheduler, integer timesteps for DPM-Solver, and the cpe cost of
rounding."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vrg_lightning.checkpoint import read_vrg
from vrg_lightning.cli import main
from vrg_lightning.export import export_trajectory
from vrg_lightning.profile import ErrorProfile
from vrg_lightning.schedule import NoiseSchedule, alpha_bar_to_sigma
from vrg_lightning.solvers import sample
from vrg_lightning.trajectories import make_trajectory
from vrg_lightning.variance import cpe

SCHED = NoiseSchedule()
DIFFUSERS_CFG = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear"}


@pytest.fixture(scope="module")
def ckpt(sampling_files: dict[str, Path]) -> Path:
    return sampling_files["ckpt"]


def _mse():
    ab = SCHED.alphas_cumprod[::50]
    return ErrorProfile.from_table(ab, 0.02 + 0.3 * (1 - ab) * ab + 0.05 * ab).mse_function("fit")


def test_sigmas_drive_diffusers_euler_like_our_ddim() -> None:
    from diffusers import EulerDiscreteScheduler

    ab = torch.sigmoid(torch.logit(make_trajectory(SCHED, "time_quadratic", 8)) + 0.1)  # an off-grid trajectory
    res = export_trajectory(ab, SCHED, "sigmas")
    assert res.values[-1] == 0.0 and len(res.values) == 9
    sched = EulerDiscreteScheduler(**DIFFUSERS_CFG)
    sched.set_timesteps(sigmas=res.values)
    assert sched.num_inference_steps == 8 and len(sched.timesteps) == 8
    expected = torch.tensor(res.values, dtype=torch.float32)
    assert torch.equal(sched.sigmas, expected)  # float sigmas kept (as float32), end point included once
    assert torch.allclose(sched.timesteps.double(), SCHED.alpha_bar_to_t(ab).flip(0), atol=0.05)

    # Euler over these sigmas == DDIM over the trajectory, for a model that only sees its (VP) input
    eps = lambda x_vp: 0.5 * torch.tanh(x_vp)  # noqa: E731
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, generator=g, dtype=torch.float64)
    ours = sample("ddim", lambda xv, a: eps(xv), x, ab)
    lat = x * (1 + float(alpha_bar_to_sigma(ab[-1])) ** 2) ** 0.5  # Euler's scaled variable x / √ᾱ
    sched = EulerDiscreteScheduler(**DIFFUSERS_CFG)
    sched.set_timesteps(sigmas=res.values)
    for t in sched.timesteps:
        lat = sched.step(eps(sched.scale_model_input(lat, t)), t, lat).prev_sample
    assert torch.allclose(lat, ours, atol=1e-4, rtol=1e-4)


def test_timesteps_match_dpmsolver_and_report_rounding_cost() -> None:
    from diffusers import DPMSolverMultistepScheduler

    ab = torch.sigmoid(torch.logit(make_trajectory(SCHED, "logSNR", 10)) + 0.07)
    mse = _mse()
    res = export_trajectory(ab, SCHED, "timesteps", mse=mse)
    ts = res.values
    assert all(isinstance(t, int) for t in ts) and all(a > b for a, b in zip(ts, ts[1:], strict=False))
    exact_t = SCHED.alpha_bar_to_t(ab).flip(0)
    assert (torch.tensor(ts) - exact_t).abs().max() <= 0.5
    sched = DPMSolverMultistepScheduler(**DIFFUSERS_CFG)
    sched.set_timesteps(timesteps=ts)
    assert sched.timesteps.tolist() == ts
    rounded = SCHED.alphas_cumprod[torch.tensor(ts)]
    # diffusers keeps alphas_cumprod in float32 (relative error ~2e-5 at the clean end)
    assert torch.allclose(sched.sigmas[:-1].double(), alpha_bar_to_sigma(rounded), rtol=1e-4)
    assert sched.sigmas[-1] == 0  # the scheduler appends the end point (final_sigmas_type="zero")
    assert res.alpha_bar_exported == rounded.flip(0).tolist()
    assert res.cpe_exact == pytest.approx(float(cpe(ab, mse, "paper")))
    assert res.cpe_exported == pytest.approx(float(cpe(rounded.flip(0), mse, "paper")))
    assert res.cpe_exported != res.cpe_exact and abs(res.cpe_change) < 0.05
    solver = export_trajectory(ab, SCHED, "timesteps", mse=mse, objective="solver", solver="dpmpp_2m")
    assert solver.cpe_exact == pytest.approx(float(cpe(ab, mse, "solver", "dpmpp_2m")))


def test_rounding_collision_is_an_error() -> None:
    ab = torch.sort(torch.tensor([float(SCHED.t_to_alpha_bar(torch.tensor(t))) for t in (100.0, 300.2, 300.4)],
                                 dtype=torch.float64), descending=True).values
    with pytest.raises(ValueError, match="round to the same integer timestep 300"):
        export_trajectory(ab, SCHED, "timesteps")
    with pytest.raises(ValueError, match="fmt must be one of sigmas, timesteps, scheduler; got 'karras'"):
        export_trajectory(ab, SCHED, "karras")


def test_cli(ckpt: Path, capsys: pytest.CaptureFixture) -> None:
    vrg = read_vrg(ckpt)
    assert main(["export", "--ckpt", str(ckpt), "--solver", "ddim", "--steps", "4", "--base", "logSNR",
                 "--format", "sigmas"]) == 0
    out = capsys.readouterr()
    stored = torch.tensor(next(e for e in vrg["entries"] if e["base"] == "logSNR")["alpha_bar"], dtype=torch.float64)
    sig = [float(s) for s in alpha_bar_to_sigma(stored).flip(0)] + [0.0]
    assert out.out.strip() == "sigmas=[" + ", ".join(map(repr, sig)) + "]"
    assert "cpe[paper] exact" in out.err
    assert main(["export", "--ckpt", str(ckpt), "--solver", "dpmpp_2m", "--steps", "4", "--format", "timesteps",
                 "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["format"] == "timesteps" and d["source"] == "vrg" and d["base"] == "time_uniform"
    assert d["cpe_exported"] > 0 and d["cpe_change"] == pytest.approx(d["cpe_exported"] / d["cpe_exact"] - 1)
    assert main(["export", "--ckpt", str(ckpt), "--solver", "ddim", "--steps", "9", "--format", "sigmas"]) == 2
    err = capsys.readouterr().err
    assert "--trajectory vrg --solver ddim --steps 9: No stored VRG trajectory" in err
    assert "Stored (solver, steps, base): (ddim, 4, logSNR)" in err


def test_cli_on_a_tuned_entry_reports_the_paper_cpe(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Tuned entries record objective 'base' or 'disc' (how they were made); export must still report a cpe."""
    raw = torch.load(ckpt, weights_only=True)
    for e in raw["vrg"]["entries"]:
        e["objective"] = "disc"
    tuned = tmp_path / "tuned.ckpt"
    torch.save(raw, tuned)
    assert main(["export", "--ckpt", str(tuned), "--solver", "ddim", "--steps", "4", "--base", "logSNR",
                 "--format", "sigmas"]) == 0
    assert "cpe[paper] exact" in capsys.readouterr().err


def test_scheduler_format_keeps_the_exact_values() -> None:
    ab = torch.sigmoid(torch.logit(make_trajectory(SCHED, "logSNR", 6)) + 0.07)
    res = export_trajectory(ab, SCHED, "scheduler", mse=_mse(), objective="solver", solver="dpmpp_2m")
    assert res.values == ab.tolist() == res.alpha_bar_exported and res.cpe_change == 0.0
    assert res.literal() == "alpha_bar=[" + ", ".join(map(repr, ab.tolist())) + "]"


def test_cli_scheduler_folder(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """``--format scheduler --out DIR`` writes a folder that ``VRGScheduler.from_pretrained`` loads with the stored
    trajectory (bit for bit), the checkpoint's schedule and the solver; it never replaces one without --force."""
    from vrg_lightning import VRGScheduler

    out = tmp_path / "sched"
    args = ["export", "--ckpt", str(ckpt), "--solver", "dpmpp_2m", "--steps", "4", "--format", "scheduler"]
    assert main([*args, "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == f"VRGScheduler.from_pretrained({str(out)!r})"
    assert "wrote" in captured.err and "as VRGScheduler (exact)" in captured.err and "(+0.0000%)" in captured.err
    loaded = VRGScheduler.from_pretrained(out)
    stored = next(e for e in read_vrg(ckpt)["entries"] if e["solver"] == "dpmpp_2m")["alpha_bar"]
    assert loaded.config.alpha_bar == stored and loaded.config.solver == "dpmpp_2m"
    assert loaded.schedule == NoiseSchedule.from_dict(read_vrg(ckpt)["schedule"])
    assert loaded.config.source["base"] == "time_uniform" and loaded.config.source["trajectory"] == "vrg"
    assert torch.equal(loaded.timesteps, VRGScheduler.from_checkpoint(ckpt, solver="dpmpp_2m", steps=4).timesteps)
    before = (out / "scheduler_config.json").read_text()
    assert main([*args, "--out", str(out), "--trajectory", "karras"]) == 2
    err = capsys.readouterr().err
    assert f"--out {out}: " in err and "pass --force to replace it" in err
    assert (out / "scheduler_config.json").read_text() == before
    assert main([*args, "--out", str(out), "--trajectory", "karras", "--force", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["out"] == str(out) and d["format"] == "scheduler" and d["source"] == "base:karras"
    assert VRGScheduler.from_pretrained(out).config.alpha_bar == make_trajectory(SCHED, "karras", 4).tolist()
    assert main(args) == 2
    assert "--format scheduler: needs --out DIR" in capsys.readouterr().err
    assert main([*args[:-1], "sigmas", "--out", str(out)]) == 2
    assert "--out is for --format scheduler" in capsys.readouterr().err
