"""``vrg optimize``: JSON output, trajectory files, profile formats, defaults and errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vrg_lightning.cli import main
from vrg_lightning.optimize import OptimizeSettings, optimize_trajectory, schedule_range, trust_bounds
from vrg_lightning.profile import ErrorProfile, save_profile
from vrg_lightning.schedule import NoiseSchedule, alpha_bar_to_lambda
from vrg_lightning.trajectories import load_trajectory, make_trajectory, save_trajectory

SCHED = NoiseSchedule()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("cli")
    ab = SCHED.alphas_cumprod[::25]
    lam = alpha_bar_to_lambda(ab)
    table = ErrorProfile.from_table(ab, 0.3 * torch.sigmoid(lam - 2) + 0.02 * torch.sin(4 * lam) ** 2 + 1e-4)
    save_profile(d / "table.tsv", table)
    measured = ErrorProfile.for_schedule(SCHED, num_bins=20)
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        t = torch.randint(0, 1000, (16,), generator=g).double()
        measured.update(SCHED.t_to_lambda(t), torch.randn(16, 32, generator=g, dtype=torch.float64) * 0.2)
    save_profile(d / "measured.pt", measured)
    save_trajectory(d / "base.txt", make_trajectory(SCHED, "logSNR", 6))
    return {"dir": d, "table": d / "table.tsv", "measured": d / "measured.pt", "base": d / "base.txt"}


def run_json(capsys: pytest.CaptureFixture, *argv: str) -> dict:
    assert main(["optimize", *argv, "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1  # one JSON object, nothing else on stdout
    return json.loads(out[0])


def test_json_output_matches_the_library(files: dict, capsys: pytest.CaptureFixture) -> None:
    res = run_json(capsys, "--profile", str(files["table"]), "--base", "time_quadratic", "--steps", "8",
                   "--lp", "0.05", "--reg-lambda", "10")
    for key in ("cpe_before", "cpe_after", "loss", "alpha_bar", "seconds", "base_alpha_bar", "settings"):
        assert key in res
    ab = res["alpha_bar"]
    assert len(ab) == 8 and all(a > b for a, b in zip(ab, ab[1:], strict=False)) and 0 < ab[-1] < ab[0] < 1
    assert res["settings"]["mse_mode"] == "paper"  # default for an MSE table
    assert res["cpe_after"] < res["cpe_before"] and res["seconds"] >= 0
    base = make_trajectory(SCHED, "time_quadratic", 8)
    s = OptimizeSettings(lp=0.05, reg_lambda=10.0, mse_mode="paper", alpha_bar_range=schedule_range(SCHED))
    from vrg_lightning.profile import load_profile

    lib = optimize_trajectory(base, load_profile(files["table"]).mse_function("paper"), s)
    assert res["alpha_bar"] == lib.alpha_bar.tolist() and res["loss"] == lib.loss


def test_out_file_and_measured_profile(files: dict, capsys: pytest.CaptureFixture) -> None:
    out = files["dir"] / "vrg.txt"
    res = run_json(capsys, "--profile", str(files["measured"]), "--trajectory", str(files["base"]), "--solver", "ddim",
                   "--objective", "solver", "--lp", "0.1", "--pin-start", "--trust", "logsnr", "--out", str(out))
    assert res["settings"]["mse_mode"] == "fit"  # default for a measured profile
    assert res["settings"]["pin_start"] and res["settings"]["trust"] == "logsnr"
    written = load_trajectory(out)
    torch.testing.assert_close(written, torch.tensor(res["alpha_bar"], dtype=torch.float64), rtol=1e-9, atol=0)
    base = load_trajectory(files["base"])
    assert res["alpha_bar"][-1] == float(base[-1])  # pinned
    lo, hi = trust_bounds(base, OptimizeSettings.from_dict(res["settings"]))
    lam = alpha_bar_to_lambda(torch.tensor(res["alpha_bar"], dtype=torch.float64)).numpy()
    assert ((lam >= lo - 1e-9) & (lam <= hi + 1e-9)).all()
    assert "objective : solver" in out.read_text()


def test_table_output(files: dict, capsys: pytest.CaptureFixture) -> None:
    assert main(["optimize", "--profile", str(files["table"]), "--base", "karras", "--steps", "5",
                 "--mse-mode", "fit"]) == 0
    text = capsys.readouterr().out
    assert "cpe" in text and "mse-mode fit" in text and len(text.splitlines()) == 4 + 5


@pytest.mark.parametrize(
    "argv,word",
    [(["--base", "logSNR"], "--steps"), (["--base", "logSNR", "--steps", "5", "--lp", "1.5"], "lp"),
     (["--base", "logSNR", "--steps", "5", "--reg-lambda", "-1"], "reg_lambda"),
     (["--base", "logSNR", "--steps", "5", "--solver", "euler"], "solver"),
     (["--base", "logSNR", "--steps", "0"], "steps"),
     (["--base", "logSNR", "--steps", "5", "--time-limit", "0"], "--time-limit"),
     (["--trajectory", "missing.txt"], "does not exist")],
)
def test_errors_are_clear(files: dict, capsys: pytest.CaptureFixture, argv: list, word: str) -> None:
    assert main(["optimize", "--profile", str(files["table"]), *argv]) == 2
    err = capsys.readouterr().err
    assert "vrg optimize: error:" in err and word in err  # argparse errors follow their usage line


def test_never_overwrites_inputs(files: dict, capsys: pytest.CaptureFixture) -> None:
    before = files["base"].read_text()
    assert main(["optimize", "--profile", str(files["table"]), "--trajectory", str(files["base"]),
                 "--out", str(files["base"])]) == 2
    assert "never overwrites its inputs" in capsys.readouterr().err
    assert files["base"].read_text() == before


def test_steps_with_trajectory_rejected(files: dict, capsys: pytest.CaptureFixture) -> None:
    assert main(["optimize", "--profile", str(files["table"]), "--trajectory", str(files["base"]),
                 "--steps", "4"]) == 2
    assert "--steps" in capsys.readouterr().err


def test_console_script_end_to_end(files: dict) -> None:
    """The installed entry point, in a fresh process (argument parsing, exit code, stdout)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "vrg_lightning.cli", "optimize", "--profile", str(files["table"]),
                           "--base", "time_uniform", "--steps", "4", "--json"], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    assert len(res["alpha_bar"]) == 4 and res["cpe_after"] <= res["cpe_before"]


def test_steps_stay_in_the_trained_range_unless_extrapolation_is_asked(files: dict, capsys) -> None:
    lo, hi = schedule_range(SCHED)
    argv = ("--profile", str(files["table"]), "--base", "logSNR", "--steps", "6", "--lp", "0.3", "--reg-lambda", "0")
    res = run_json(capsys, *argv)
    assert res["settings"]["alpha_bar_range"] == [lo, hi]
    assert all(lo <= a <= hi for a in res["alpha_bar"])
    free = run_json(capsys, *argv, "--extrapolate")
    assert free["settings"]["alpha_bar_range"] is None and free["loss"] <= res["loss"]


def test_time_limit_keeps_the_best_found_and_says_it_stopped_early(files: dict, capsys: pytest.CaptureFixture,
                                                                   tmp_path) -> None:
    """A limit that has passed before the first check stops the search there: the trajectory is still valid and no
    worse than the base, the JSON says ``complete: false`` and the written file's header says it stopped early; a
    generous limit changes nothing."""
    argv = ["--profile", str(files["table"]), "--base", "time_quadratic", "--steps", "8", "--objective", "solver",
            "--solver", "dpmpp_2m"]
    full = run_json(capsys, *argv)
    out = tmp_path / "cut.txt"
    cut = run_json(capsys, *argv, "--time-limit", "1e-9", "--out", str(out))
    assert full["complete"] is True and cut["complete"] is False
    assert full["loss"] <= cut["loss"] <= cut["loss_before"]
    assert all(a > b for a, b in zip(cut["alpha_bar"], cut["alpha_bar"][1:], strict=False))
    header = [line for line in out.read_text().splitlines() if line.startswith("#")]
    assert any("stopped_early" in line and "--time-limit" in line for line in header)
    assert run_json(capsys, *argv, "--time-limit", "3600")["loss"] == full["loss"]
    assert main(["optimize", *argv, "--time-limit", "1e-9"]) == 0
    assert "stopped early by --time-limit" in capsys.readouterr().out
