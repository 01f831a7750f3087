"""End to end on the flow-matching default: `python train.py fit --config configs/digits_flow.yaml` (tiny UNet, few
steps), `vrg inspect --json`, and the stored trajectory through VRGScheduler in a pipeline loop."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import TINY_UNET

from vrg_lightning.checkpoint import load_denoiser
from vrg_lightning.cli import main
from vrg_lightning.paths import RectifiedFlow
from vrg_lightning.scheduler import VRGScheduler
from vrg_lightning.solvers import sample

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def flow_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("flow")
    cfg = yaml.safe_load((ROOT / "configs" / "digits_flow.yaml").read_text())
    assert cfg["model"]["noise_path"] == "rectified_flow" and cfg["model"]["prediction_type"] == "flow"
    prof = next(c["init_args"] for c in cfg["trainer"]["callbacks"] if c["class_path"].endswith("VRGProfiler"))
    prof.update(tune_at_fit_end=False, probe_samples=512)  # the fit-end validation is tested on the VP default
    config = work / "flow.yaml"
    config.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, str(ROOT / "train.py"), "fit", "--config", str(config), "--trainer.max_steps", "3",
           "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false", "--model.unet",
           json.dumps(TINY_UNET), "--model.warmup_steps", "1"]
    res = subprocess.run(cmd, cwd=work, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    return work / "runs" / "digits_flow" / "checkpoints" / "last.ckpt"


@pytest.mark.slow
def test_flow_training_stores_profile_and_trajectories(flow_ckpt: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["inspect", str(flow_ckpt), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["schedule"]["path"] == "rectified_flow" and info["schedule"]["prediction_type"] == "flow"
    assert info["profile"]["source"] == "probe" and info["profile"]["nonempty_bins"] == info["profile"]["bins"]
    cfg = yaml.safe_load((ROOT / "configs" / "digits_flow.yaml").read_text())
    prof = next(c["init_args"] for c in cfg["trainer"]["callbacks"] if c["class_path"].endswith("VRGProfiler"))
    assert len(info["entries"]) == len(prof["solvers"]) * len(prof["steps"]) * len(prof["bases"])


@pytest.mark.slow
def test_stored_flow_trajectory_in_a_pipeline_loop(flow_ckpt: Path) -> None:
    den, _ = load_denoiser(flow_ckpt)
    den = den.double()
    assert den.schedule == RectifiedFlow() and den.prediction_type == "flow"
    sched = VRGScheduler.from_checkpoint(flow_ckpt, solver="dpmpp_2m", steps=10, base="logSNR")
    assert sched.schedule == den.schedule and sched.config.prediction_type == "flow"
    x_vp = torch.randn(2, 1, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        want = sample("dpmpp_2m", den.eps_fn(), x_vp, sched.alpha_bar)
        x = x_vp * sched.init_noise_sigma
        for t in sched.timesteps:
            x = sched.step(den.unet(x, t).sample, t, x).prev_sample
    torch.testing.assert_close(x, want, rtol=1e-8, atol=1e-8)
