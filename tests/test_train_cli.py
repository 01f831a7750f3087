"""End to end: `python train.py fit --config configs/digits.yaml` (tiny UNet, few steps), then `vrg inspect` and
`vrg profile` on its checkpoint (and on a local diffusers folder)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from vrg_lightning.checkpoint import load_denoiser, read_vrg
from vrg_lightning.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = {"sample_size": 16, "in_channels": 1, "out_channels": 1, "block_out_channels": [8, 8, 8],
        "down_block_types": ["DownBlock2D", "DownBlock2D", "AttnDownBlock2D"],
        "up_block_types": ["AttnUpBlock2D", "UpBlock2D", "UpBlock2D"], "layers_per_block": 1, "norm_num_groups": 4,
        "attention_head_dim": 8}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run the documented training command (shortened; the fit-end tuning on 16 images) in a fresh folder; return
    last.ckpt."""
    work = tmp_path_factory.mktemp("train")
    cfg = yaml.safe_load((ROOT / "configs" / "digits.yaml").read_text())
    prof = next(c["init_args"] for c in cfg["trainer"]["callbacks"] if c["class_path"].endswith("VRGProfiler"))
    assert prof["tune_at_fit_end"] is True
    prof["tune_settings"].update(num_samples=16, batch_size=16, lps=[0.03])
    config = work / "digits.yaml"
    config.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, str(ROOT / "train.py"), "fit", "--config", str(config),
           "--trainer.max_steps", "3", "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
           "--model.unet", json.dumps(TINY), "--model.warmup_steps", "1"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    res = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    ckpt = work / "runs" / "digits" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file(), sorted(str(p) for p in work.rglob("*"))
    return ckpt


@pytest.mark.slow
def test_training_writes_a_weights_only_checkpoint_with_fit_end_trajectories(trained: Path) -> None:
    ckpt = torch.load(trained, weights_only=True)
    assert ckpt["global_step"] == 3
    vrg = read_vrg(ckpt)
    assert vrg["profile"]["source"] == "probe" and float(vrg["profile"]["count"].sum()) == 4096
    assert vrg["schedule"]["beta_schedule"] == "linear" and vrg["schedule"]["prediction_type"] == "epsilon"
    got = {(e["solver"], e["steps"], e["base"]) for e in vrg["entries"]}
    cfg = next(c["init_args"] for c in yaml.safe_load((ROOT / "configs" / "digits.yaml").read_text())["trainer"]
               ["callbacks"] if c["class_path"].endswith("VRGProfiler"))
    assert got == {(s, n, b) for s in cfg["solvers"] for n in cfg["steps"] for b in cfg["bases"]}
    for e in vrg["entries"]:  # validated at fit end: a VRG candidate that won, or the base itself
        assert len(e["alpha_bar"]) == e["steps"] and e["validated"]["num_samples"] == 16
        assert e["kind"] in ("vrg", "base") and (e["kind"] == "base") is (not e["validated"]["selected"])
    assert 0 < vrg["tune"]["fraction_of_training"] and vrg["tune"]["settings"]["pin_start"] == "free"
    den, info = load_denoiser(trained)
    assert info is not None and list(den.unet.config.block_out_channels) == [8, 8, 8]
    assert (trained.parent.parent / "tb").is_dir()  # TensorBoard logger of the config


@pytest.mark.slow
def test_inspect_text_json_and_bad_files(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["inspect", str(trained)]) == 0
    text = capsys.readouterr().out
    assert "schedule  linear T=1000" in text and "profile   probe: " in text
    rows = [line for line in text.splitlines() if line.startswith("ddim ")]
    assert len(rows) == 6  # 2 step counts x 3 bases
    assert all(("selected (" in r) != ("base kept (" in r) for r in rows)  # each row says what tuning decided
    assert main(["inspect", str(trained), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["profile"]["samples"] == 4096 and len(info["entries"]) == len(read_vrg(trained)["entries"])
    assert info["model"]["ema"] is True
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(trained.read_bytes()[:4096])
    assert main(["inspect", str(cut)]) == 2
    assert "corrupt, truncated" in capsys.readouterr().err
    bare = tmp_path / "bare.ckpt"
    torch.save({"state_dict": {}}, bare)
    assert main(["inspect", str(bare)]) == 1
    assert "vrg profile" in capsys.readouterr().out


@pytest.mark.slow
def test_profile_writes_a_new_file_and_never_touches_the_input(trained: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    before = hashlib.sha256(trained.read_bytes()).hexdigest()
    out = tmp_path / "profiled.ckpt"
    argv = ["profile", "--ckpt", str(trained), "--data", "digits", "--out", str(out), "--samples", "300",
            "--bins", "20", "--steps", "5", "--bases", "logSNR", "--device", "cpu"]
    assert main(argv) == 0
    assert hashlib.sha256(trained.read_bytes()).hexdigest() == before
    vrg = read_vrg(out)
    assert float(vrg["profile"]["count"].sum()) == 300 and [e["base"] for e in vrg["entries"]] == ["logSNR"]
    assert vrg["profiler"]["input"] == str(trained)
    den, _ = load_denoiser(out)  # the copy keeps the weights
    assert main(argv) == 2 and "exists" in capsys.readouterr().err
    assert main(argv + ["--force"]) == 0
    assert main(["profile", "--ckpt", str(trained), "--data", "digits", "--out", str(trained), "--force"]) == 2
    assert "never overwrites its inputs" in capsys.readouterr().err
    assert main(["profile", "--ckpt", str(trained), "--data", "patches", "--out", str(tmp_path / "p.ckpt")]) == 2
    assert "shape" in capsys.readouterr().err


@pytest.mark.slow
def test_profile_from_a_local_diffusers_folder(tmp_path: Path) -> None:
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(**TINY)
    unet.save_pretrained(tmp_path / "model" / "unet")
    (tmp_path / "model" / "scheduler").mkdir()
    (tmp_path / "model" / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "DDPMScheduler", "beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 1000,
         "prediction_type": "v_prediction"}))
    out = tmp_path / "vrg.ckpt"
    assert main(["profile", "--diffusers-dir", str(tmp_path / "model"), "--data", "digits", "--out", str(out),
                 "--samples", "200", "--bins", "10", "--steps", "4", "--bases", "time_uniform", "--device", "cpu"]) == 0
    vrg = read_vrg(out)
    assert vrg["schedule"]["beta_schedule"] == "squaredcos_cap_v2"
    assert vrg["schedule"]["prediction_type"] == "v_prediction"
    den, _ = load_denoiser(out, use_ema=False)
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([10.0, 500.0])
    with torch.no_grad():
        torch.testing.assert_close(den.model_output(x, t), unet(x, t).sample)
