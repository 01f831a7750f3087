"""Sampling: determinism by sample index, trajectory lookup, the resumable Lightning job (1 process, 2 processes
under ddp and ddp_spawn), refusal to mix runs, compare mode and CLI errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import vrg_version

from vrg_lightning import sampling
from vrg_lightning.checkpoint import load_denoiser, select_entry
from vrg_lightning.cli import main
from vrg_lightning.evaluation import build_features, feature_stats, fid_of
from vrg_lightning.sampling import (
    file_sha256,
    generate,
    initial_noise,
    load_samples,
    resolve_trajectory,
    sample_labels,
)
from vrg_lightning.sampling import job as sampling_job
from vrg_lightning.trajectories import make_trajectory, save_trajectory

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files(sampling_files: dict[str, Path]) -> dict[str, Path]:
    return sampling_files


def _args(files: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["sample", "--ckpt", str(files["ckpt"]), "--solver", "ddim", "--steps", "4", "--out", str(out),
            "--reference", str(files["ref"]), "--cache-dir", str(files["cache"]), "--accelerator", "cpu",
            "--no-progress", *extra]


def _report(out: Path) -> dict:
    r = json.loads((out / "report.json").read_text())
    r.pop("run")  # timing and process layout of this invocation
    r["arguments"].pop("batch_size"), r["arguments"].pop("out"), r["arguments"].pop("devices")
    r["arguments"].pop("strategy")
    return r


def test_noise_and_labels_depend_only_on_seed_and_index() -> None:
    x, y = initial_noise(7, 0, 8, (1, 4, 4), num_classes=10)
    x2, y2 = initial_noise(7, 3, 6, (1, 4, 4), num_classes=10)
    assert torch.equal(x[3:6], x2) and torch.equal(y[3:6], y2)
    assert torch.equal(sample_labels(7, 3, 6, 10), y2) and sample_labels(7, 0, 3, None) is None
    x3, _ = initial_noise(8, 3, 6, (1, 4, 4))
    assert not torch.allclose(x2, x3)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # Lightning's 64-true precision does this around predict_step
    try:
        assert torch.equal(initial_noise(7, 3, 6, (1, 4, 4))[0], x2)
    finally:
        torch.set_default_dtype(default)
    assert len(set(y.tolist())) > 1


def test_generate_is_independent_of_batch_size(files: dict[str, Path]) -> None:
    den, vrg = load_denoiser(files["cond"])
    ab = make_trajectory(den.schedule, "time_uniform", 4)
    # float64 model: exact up to rounding; float32 kernels round differently per batch size (cancellation at σ≈157)
    a = generate(den.double(), ab, "dpmpp_2m", 7, seed=3, batch_size=7, guidance_scale=2.0)
    b = generate(den, ab, "dpmpp_2m", 7, seed=3, batch_size=2, guidance_scale=2.0)
    c = generate(den, ab, "dpmpp_2m", 4, seed=3, start=3, batch_size=3, guidance_scale=2.0)
    assert torch.allclose(a, b, atol=1e-6, rtol=0) and torch.allclose(a[3:], c, atol=1e-6, rtol=0)
    den.float()
    f1 = generate(den, ab, "dpmpp_2m", 7, seed=3, batch_size=7, guidance_scale=2.0)
    f2 = generate(den, ab, "dpmpp_2m", 7, seed=3, batch_size=7, guidance_scale=2.0)
    assert torch.equal(f1, f2) and torch.allclose(f1, a, atol=1e-3, rtol=0)
    other = generate(den, ab, "dpmpp_2m", 7, seed=4, batch_size=7, guidance_scale=2.0)
    assert (other - f1).abs().max() > 0.1


def test_select_vrg_entry_is_the_checkpoint_lookup_and_prefers_validated() -> None:
    def e(base: str, sel: bool | None = None, lp: float = 0.1) -> dict:
        return {"solver": "ddim", "steps": 10, "base": base, "lp": lp, "alpha_bar": [0.9, 0.1],
                "validated": None if sel is None else {"selected": sel}}

    assert sampling.select_vrg_entry is select_entry  # one lookup rule; the old name is an alias
    vrg = {"entries": [e("time_uniform"), e("logSNR", False), e("logSNR", True, lp=0.2), e("karras")]}
    assert select_entry(vrg, "ddim", 10, base="logSNR")["lp"] == 0.2
    assert select_entry(vrg, "ddim", 10, base="karras")["base"] == "karras"
    assert select_entry(vrg, "ddim", 10)["lp"] == 0.2  # the one validated winner
    with pytest.raises(ValueError, match=r"No stored VRG trajectory for solver=ddim, steps=20.*\(ddim, 10, karras\)"):
        select_entry(vrg, "ddim", 20)
    with pytest.raises(ValueError, match="2 stored VRG trajectories match"):
        select_entry({"entries": [e("a"), e("b")]}, "ddim", 10)
    with pytest.raises(ValueError, match="no stored VRG|has none"):
        select_entry(None, "ddim", 10)


def test_resolve_trajectory(files: dict[str, Path], tmp_path: Path) -> None:
    den, vrg = load_denoiser(files["ckpt"])
    base = make_trajectory(den.schedule, "logSNR", 4)
    t = resolve_trajectory(den.schedule, vrg, "ddim", 4, "vrg", base="logSNR")
    assert t.source == "vrg" and t.base == "logSNR" and torch.allclose(t.tensor, vrg_version(base))
    assert torch.equal(resolve_trajectory(den.schedule, vrg, "ddim", 4, "logSNR").tensor, base)
    save_trajectory(tmp_path / "t.txt", base)
    assert torch.allclose(resolve_trajectory(den.schedule, None, "ddim", None, str(tmp_path / "t.txt")).tensor, base)
    with pytest.raises(ValueError, match="holds 4 values but steps is 5"):
        resolve_trajectory(den.schedule, None, "ddim", 5, str(tmp_path / "t.txt"))
    with pytest.raises(ValueError, match="trajectory must be a base name .* got 'fancy'"):
        resolve_trajectory(den.schedule, vrg, "ddim", 4, "fancy")
    with pytest.raises(ValueError, match="trajectory 'logSNR' needs steps"):
        resolve_trajectory(den.schedule, vrg, "ddim", None, "logSNR")
    with pytest.raises(ValueError, match=r"Stored \(solver, steps, base\): \(ddim, 4, logSNR\)"):
        resolve_trajectory(den.schedule, vrg, "ddim", 7, "vrg")


def test_a_tuned_entry_that_kept_its_base_says_so_on_the_trajectory(files: dict[str, Path], tmp_path: Path,
                                                                      capsys) -> None:
    den, vrg = load_denoiser(files["ckpt"])
    base = make_trajectory(den.schedule, "karras", 4).tolist()
    kept = {"solver": "ddim", "steps": 4, "base": "karras", "objective": "base", "alpha_bar": base,
            "validated": {"selected": False, "reason": "not confirmed"}}
    t = resolve_trajectory(den.schedule, {**vrg, "entries": [kept]}, "ddim", 4, "vrg")
    assert list(t.alpha_bar) == base and "kept the base karras for ddim/4 (not confirmed)" in t.note
    assert resolve_trajectory(den.schedule, vrg, "ddim", 4, "vrg", base="logSNR").note is None
    assert capsys.readouterr().err == ""  # the library prints nothing; the CLI prints the note
    raw = torch.load(files["ckpt"], weights_only=True)
    raw["vrg"]["entries"].append(kept)
    torch.save(raw, tmp_path / "tuned.ckpt")
    assert main(["export", "--ckpt", str(tmp_path / "tuned.ckpt"), "--solver", "ddim", "--steps", "4", "--base",
                 "karras", "--format", "sigmas"]) == 0
    assert "vrg: validated tuning kept the base karras" in capsys.readouterr().err


def test_job_report_resume_and_refusal(files: dict[str, Path], tmp_path: Path, monkeypatch, capsys) -> None:
    out = tmp_path / "run"
    args = _args(files, out, "--trajectory", "vrg", "--base", "time_uniform", "--num-samples", "10",
                 "--shard-size", "4", "--batch-size", "3", "--precision", "64-true")
    assert main(args) == 0
    rep = _report(out)
    den, vrg = load_denoiser(files["ckpt"])  # EMA weights
    ab = torch.tensor(rep["trajectory"]["alpha_bar"], dtype=torch.float64)
    assert rep["trajectory"]["source"] == "vrg" and rep["trajectory"]["base"] == "time_uniform"
    expected = generate(den.double(), ab, "ddim", 10, seed=0, batch_size=10)
    assert torch.allclose(load_samples(out), expected, atol=1e-6, rtol=0)
    raw, _ = load_denoiser(files["ckpt"], use_ema=False)
    assert not torch.allclose(generate(raw.double(), ab, "ddim", 10, seed=0), expected, atol=1e-3)
    assert rep["checkpoint"]["sha256"] == file_sha256(files["ckpt"]) and rep["checkpoint"]["weights"] == "ema"
    ext = build_features("digits")
    ref = feature_stats(torch.load(files["ref"], weights_only=True), ext)
    assert rep["fid"]["metric"] == "FID[digits-classifier]"
    assert rep["fid"]["value"] == pytest.approx(fid_of(expected, ext, ref).value, rel=1e-5)
    assert rep["cpe"]["paper"] > 0 and (out / "grid.png").is_file()
    assert "FID[digits-classifier]=" in capsys.readouterr().out

    # a run killed midway (after one shard) and rerun gives the same report
    (out / "report.json").unlink()
    (out / "shards" / "samples_00000004-00000008.pt").unlink()
    (out / "shards" / "samples_00000008-00000010.pt").unlink()
    real_save, writes = sampling_job.atomic_torch_save, []

    def crash_after_one(path, obj):
        if writes:
            raise RuntimeError("simulated crash")
        writes.append(path)
        real_save(path, obj)

    monkeypatch.setattr(sampling_job, "atomic_torch_save", crash_after_one)
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(args)
    assert not (out / "report.json").exists() and len(list((out / "shards").glob("*.pt"))) == 2
    monkeypatch.setattr(sampling_job, "atomic_torch_save", real_save)
    assert main(args[:-4] + ["--batch-size", "5", "--precision", "64-true"]) == 0  # batch size may change
    assert _report(out) == rep

    # different arguments into the same folder are refused, nothing is touched
    before = {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir()}
    assert main(args[:-4] + ["--seed", "1", "--batch-size", "3", "--precision", "64-true"]) == 2
    assert "refusing to mix" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir()} == before


def test_two_processes_ddp_and_ddp_spawn_write_the_same_samples_and_fid(files: dict[str, Path], tmp_path: Path,
                                                                         monkeypatch, capsys) -> None:
    common = ["--trajectory", "logSNR", "--num-samples", "12", "--shard-size", "4", "--batch-size", "2",
              "--features", "pixels"]
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the spawned and launched processes inherit it
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same kernels as each DDP process
    try:
        assert main(_args(files, tmp_path / "one", *common)) == 0
        # ddp_spawn: the job's module and writer are pickled into two spawned processes
        assert main(_args(files, tmp_path / "spawn", *common, "--devices", "2", "--strategy", "ddp_spawn")) == 0
        assert "FID[pixels]=" in capsys.readouterr().out  # the report comes back to the launching process
    finally:
        torch.set_num_threads(threads)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, str(ROOT / "sample.py"), *_args(files, tmp_path / "two", *common)[1:], "--devices", "2",
           "--strategy", "ddp"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = _report(tmp_path / "one")
    assert one["fid"]["metric"] == "FID[pixels]" and one["fid"]["num_images"] == 12
    for run in ("two", "spawn"):
        other = _report(tmp_path / run)
        assert json.loads((tmp_path / run / "report.json").read_text())["run"]["world_size"] == 2
        assert torch.allclose(load_samples(tmp_path / "one"), load_samples(tmp_path / run), atol=1e-6, rtol=0)
        assert other["fid"]["num_images"] == 12 and other["fid"]["value"] == pytest.approx(one["fid"]["value"],
                                                                                           rel=1e-6)
        assert other["job"] == one["job"]


def test_compare_mode(files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    args = _args(files, out, "--compare", "--trajectory", "time_uniform", "--seeds", "0,1", "--num-samples", "8",
                 "--batch-size", "8")
    assert main(args) == 0
    rep = json.loads((out / "compare.json").read_text())
    (row,) = rep["rows"]
    den, vrg = load_denoiser(files["ckpt"])
    base = make_trajectory(den.schedule, "time_uniform", 4)
    ext = build_features("digits")
    ref = feature_stats(torch.load(files["ref"], weights_only=True), ext)
    for k, seed in enumerate((0, 1)):  # each seed: base and VRG from the same noise
        assert row["fid_base"][k] == pytest.approx(fid_of(generate(den, base, "ddim", 8, seed), ext, ref).value,
                                                   rel=1e-4)
        vrg_ab = torch.tensor(row["alpha_bar_vrg"], dtype=torch.float64)
        assert row["fid_vrg"][k] == pytest.approx(fid_of(generate(den, vrg_ab, "ddim", 8, seed), ext, ref).value,
                                                  rel=1e-4)
    diffs = [v - b for b, v in zip(row["fid_base"], row["fid_vrg"], strict=True)]
    assert row["difference"]["mean"] == pytest.approx(sum(diffs) / 2)
    assert row["difference"]["ci_low"] <= row["difference"]["mean"] <= row["difference"]["ci_high"]
    assert row["cpe_base"] > 0 and row["cpe_vrg"] > 0 and row["features"] == "digits-classifier"
    md = (out / "compare.md").read_text()
    assert "FID[digits-classifier] base" in md and "| ddim | 4 | time_uniform |" in md
    assert (out / "compare.png").stat().st_size > 1000
    (out / "compare.json").unlink()
    assert main(args) == 0  # resumes from the cached per-seed statistics
    assert json.loads((out / "compare.json").read_text())["rows"] == rep["rows"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--trajectory", "vrg", "--steps", "7"],
         r"--trajectory vrg --solver ddim --steps 7: No .*Stored \(solver, steps, base\): \(ddim, 4, logSNR\)"),
        (["--trajectory", "vrg"], "--trajectory vrg needs --steps N"),
        (["--trajectory", "nope"], "--trajectory nope --steps 4: trajectory must be a base name"),
        (["--solver", "ddim,dpmpp_2m"], "Several values in --solver need --compare"),
        (["--trajectory", "logSNR", "--features", "inception"], "weights-inception-2015-12-05"),
        (["--compare", "--devices", "2"], "--compare runs in one process"),
        (["--trajectory", "logSNR", "--num-samples", "0"], "--num-samples must be a positive integer"),
        (["--trajectory", "logSNR", "--num-samples", "2", "--shard-size", "1", "--devices", "3"],
         "fewer than the 3 processes"),
    ],
)
def test_cli_errors(files: dict[str, Path], tmp_path: Path, capsys, extra: list[str], message: str) -> None:
    args = _args(files, tmp_path / "err", *extra)
    if "--steps" in extra or extra == ["--trajectory", "vrg"]:
        i = args.index("--steps")
        del args[i : i + 2]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err


def test_list_flags_take_comma_lists_with_choices_from_the_package(files: dict[str, Path], tmp_path: Path,
                                                                    capsys) -> None:
    from vrg_lightning.solvers import SOLVERS

    assert main(_args(files, tmp_path / "x", "--solver", "ddim,fancy")) == 2  # an argparse error, as status 2
    err = capsys.readouterr().err
    assert "--solver: unknown 'fancy'; allowed: " + ", ".join(SOLVERS) in err
    assert main(_args(files, tmp_path / "x", "--compare", "--seeds", "0,a")) == 2
    assert "--seeds must be a comma list of int" in capsys.readouterr().err


def test_stored_entries_per_guidance_scale_resolve_by_the_sampled_scale() -> None:
    """Entries optimised on guided profiles record their scale: sampling at w takes w's entry; entries without the
    key (every checkpoint before guided profiles) resolve whatever the guidance scale."""
    from vrg_lightning.sampling import resolve_trajectory
    from vrg_lightning.schedule import NoiseSchedule

    sched = NoiseSchedule()
    base = make_trajectory(sched, "logSNR", 4)
    entry = {"solver": "ddim", "steps": 4, "base": "logSNR", "objective": "paper", "lp": 0.1}
    per_w = {w: dict(entry, guidance_scale=w, alpha_bar=torch.sigmoid(torch.logit(base) + 0.01 * w).tolist())
             for w in (1.0, 7.5)}
    vrg = {"schedule": sched.to_dict(), "entries": list(per_w.values())}
    for w, e in per_w.items():
        assert list(resolve_trajectory(sched, vrg, "ddim", 4, "vrg", guidance_scale=w).alpha_bar) == e["alpha_bar"]
    with pytest.raises(ValueError, match="No stored VRG trajectory"):
        resolve_trajectory(sched, vrg, "ddim", 4, "vrg", guidance_scale=3.0)
    old = {"schedule": sched.to_dict(), "entries": [dict(entry, alpha_bar=base.tolist())]}
    assert list(resolve_trajectory(sched, old, "ddim", 4, "vrg", guidance_scale=3.0).alpha_bar) == base.tolist()
