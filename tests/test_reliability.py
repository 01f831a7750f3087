"""Reliability (issue 15): no input or existing output is overwritten, no resume trusts a broken file, a refused run
leaves nothing that blocks its fix, bad inputs are refused with one line naming the file or value, files get the
umask's mode."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import TINY_UNET, make_checkpoint

from vrg_lightning.checkpoint import CheckpointMismatchError, load_checkpoint_file, load_denoiser
from vrg_lightning.cli import main
from vrg_lightning.io import atomic_write_text, check_output_file, load_torch_file
from vrg_lightning.profile import ErrorProfile, load_profile
from vrg_lightning.sampling import load_samples
from vrg_lightning.sampling.job import read_shard, shard_path
from vrg_lightning.schedule import NoiseSchedule
from vrg_lightning.trajectories import load_trajectory

ROOT = Path(__file__).resolve().parents[1]
TABLE = "# ts alpha_bar MSE\n1\t0.99\t0.05\n2\t0.9\t0.1\n3\t0.5\t0.3\n4\t0.1\t0.6\n5\t0.01\t0.9\n"


@pytest.fixture(scope="module")
def files(sampling_files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("reliability")
    (d / "table.tsv").write_text(TABLE)
    raw = torch.load(sampling_files["ckpt"], weights_only=True)
    raw["vrg"]["version"] = 99
    torch.save(raw, d / "v99.ckpt")
    return {**sampling_files, "dir": d, "table": d / "table.tsv", "v99": d / "v99.ckpt"}


def _sample(files: dict[str, Path], out: Path, *extra: str, reference: bool = True) -> list[str]:
    ref = ["--reference", str(files["ref"]), "--cache-dir", str(files["cache"])] if reference else []
    return ["sample", "--ckpt", str(files["ckpt"]), "--solver", "ddim", "--steps", "4", "--trajectory",
            "time_uniform", "--num-samples", "8", "--shard-size", "4", "--out", str(out), "--accelerator", "cpu",
            "--no-progress", *ref, *extra]


def _report(out: Path) -> dict:
    r = json.loads((out / "report.json").read_text())
    r.pop("run")  # timing of this invocation
    return r


def _one_error_line(err: str, *words: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.startswith("vrg ")]
    assert "Traceback" not in err and len(lines) == 1, err
    assert all(w in lines[0] for w in words), err


# --- files: modes, overwriting ------------------------------------------------------------------------------------
@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_files_get_the_umask_mode_and_exclusive_writes_never_replace(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "a.txt", "one")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o666 & ~umask  # not 0600 (tempfile.mkstemp)
    with pytest.raises(FileExistsError, match="a.txt"):
        atomic_write_text(tmp_path / "a.txt", "two", overwrite=False)
    assert (tmp_path / "a.txt").read_text() == "one" and sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]
    atomic_write_text(tmp_path / "b.txt", "new", overwrite=False)
    assert (tmp_path / "b.txt").read_text() == "new"


def test_an_output_is_never_an_input_a_folder_or_an_existing_file_without_force(tmp_path: Path) -> None:
    src = tmp_path / "in.ckpt"
    src.write_text("input")
    os.link(src, tmp_path / "hard.ckpt")
    (tmp_path / "sym.ckpt").symlink_to(src)
    for alias in ("hard.ckpt", "sym.ckpt", "sub/../in.ckpt"):
        with pytest.raises(ValueError, match="a link to the same file|the same path"):
            check_output_file(tmp_path / alias, {"ckpt": src}, force=True)
    with pytest.raises(ValueError, match="is a folder"):
        check_output_file(tmp_path, {"ckpt": src}, force=True)
    with pytest.raises(FileExistsError, match="pass force=True"):
        check_output_file(tmp_path / "hard.ckpt", {})
    check_output_file(tmp_path / "hard.ckpt", {}, force=True)  # an existing non-input file, with force


def test_optimize_out_refusals_are_one_line_and_leave_files_untouched(files: dict[str, Path], tmp_path: Path,
                                                                      capsys) -> None:
    existing = tmp_path / "existing.ckpt"
    existing.write_bytes(b"a model checkpoint")
    base = ["optimize", "--profile", str(files["table"]), "--base", "logSNR", "--steps", "4"]
    assert main([*base, "--out", str(existing)]) == 2
    _one_error_line(capsys.readouterr().err, "existing.ckpt", "--force")
    assert existing.read_bytes() == b"a model checkpoint"
    os.link(files["table"], tmp_path / "link.tsv")
    assert main([*base, "--out", str(tmp_path / "link.tsv"), "--force"]) == 2
    _one_error_line(capsys.readouterr().err, "--profile input", "link")
    assert main([*base, "--out", str(tmp_path)]) == 2
    _one_error_line(capsys.readouterr().err, "is a folder")
    assert main([*base, "--out", str(existing), "--force"]) == 0
    assert load_trajectory(existing).numel() == 4


# --- sampling: resume verifies shards, manifests only for valid runs ----------------------------------------------
def test_a_broken_shard_is_sampled_again_and_the_run_ends_as_an_untouched_one(files: dict[str, Path],
                                                                             tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert main(_sample(files, out)) == 0
    report, samples, grid = _report(out), load_samples(out), (out / "grid.png").read_bytes()
    assert report["fid"]["value"] > 0
    second = shard_path(out, 4, 8)
    second.write_bytes(second.read_bytes()[:1000])  # truncated
    with pytest.raises(ValueError, match=r"samples_00000004-00000008\.pt.*truncated.*rerun the same command"):
        load_samples(out)
    (out / "report.json").unlink()
    assert main(_sample(files, out)) == 0
    assert _report(out) == report and torch.equal(load_samples(out), samples)
    assert (out / "grid.png").read_bytes() == grid and len(report["samples"]["sha256"]) == 2
    first = read_shard(out, 0, 4)  # altered content that still loads: the checksum catches it
    first["samples"] = first["samples"] + 0.5
    torch.save(first, shard_path(out, 0, 4))
    with pytest.raises(ValueError, match="does not match its checksum"):
        read_shard(out, 0, 4)
    assert main(_sample(files, out)) == 0
    assert _report(out) == report and torch.equal(load_samples(out), samples)
    # without --reference: the FID of the same shards is kept, and the report says so
    assert main(_sample(files, out, reference=False)) == 0
    kept = _report(out)
    assert kept["fid"] == report["fid"] and kept["fid_reference"] == report["fid_reference"]
    assert "earlier run" in kept["fid_kept"] and "kept from the earlier run" in capsys.readouterr().out


@pytest.mark.parametrize("bad", [["--precision", "foo"], ["--strategy", "nope"], ["--devices", "3"]])
def test_a_refused_run_leaves_no_manifest_to_block_its_fix(files: dict[str, Path], tmp_path: Path, capsys,
                                                           bad: list[str]) -> None:
    out = tmp_path / "run"
    args = _sample(files, out, reference=False)
    if bad[0] == "--devices":  # 3 processes for the one shard of 4 samples
        args[args.index("--num-samples") + 1] = "4"
    assert main([*args, *bad]) == 2
    _one_error_line(capsys.readouterr().err, bad[1])
    assert not (out / "manifest.json").exists()
    assert main(args) == 0


def test_a_refused_compare_leaves_no_manifest(files: dict[str, Path], tmp_path: Path, capsys) -> None:
    out = tmp_path / "cmp"
    args = ["sample", "--ckpt", str(files["ckpt"]), "--compare", "--solver", "ddim", "--steps", "7", "--trajectory",
            "time_uniform", "--num-samples", "4", "--seeds", "0,1", "--reference", str(files["ref"]), "--cache-dir",
            str(files["cache"]), "--accelerator", "cpu", "--no-progress", "--out", str(out)]
    assert main(args) == 2
    _one_error_line(capsys.readouterr().err, "--steps 7", "No stored VRG trajectory")
    assert not (out / "manifest.json").exists()


# --- OS errors: one line, exit 2 for a bad path, 1 for the environment ---------------------------------------------
def test_os_errors_are_one_line(files: dict[str, Path], tmp_path: Path, capsys, monkeypatch) -> None:
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert main(_sample(files, a_file, reference=False)) == 2
    _one_error_line(capsys.readouterr().err, "'" + str(a_file) + "'", "is a file")
    ro = tmp_path / "read-only"
    ro.mkdir()
    ro.chmod(0o555)
    if os.geteuid() == 0:  # root writes anyway: let the folder refuse as a read-only one does
        real_mkdir = Path.mkdir

        def refuse(self: Path, *args, **kwargs) -> None:
            if ro in self.parents:
                raise PermissionError(13, "Permission denied", str(self))
            real_mkdir(self, *args, **kwargs)

        monkeypatch.setattr(Path, "mkdir", refuse)
    assert main(_sample(files, ro / "out", reference=False)) == 1
    _one_error_line(capsys.readouterr().err, "no permission", "read-only/out", "permissions")
    monkeypatch.undo()
    ro.chmod(0o755)


def test_a_reader_that_closes_the_pipe_ends_inspect_quietly(files: dict[str, Path]) -> None:
    r, w = os.pipe()
    os.close(r)
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "vrg_lightning.cli", "inspect", str(files["ckpt"])], stdout=w,
                          stderr=subprocess.PIPE, text=True, env=env, timeout=120)
    os.close(w)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr


# --- inputs that are refused ---------------------------------------------------------------------------------------
def test_a_profile_of_one_noise_level_or_conflicting_rows_is_refused(files: dict[str, Path], tmp_path: Path,
                                                                     capsys) -> None:
    one, dup = tmp_path / "one.tsv", tmp_path / "dup.tsv"
    one.write_text("1\t0.5\t0.1\n")
    dup.write_text("1\t0.9\t0.1\n2\t0.5\t0.2\n3\t0.5\t0.9\n4\t0.1\t0.95\n")
    for path, words in ((one, ("one.tsv", "2 or more noise levels")), (dup, ("dup.tsv", "conflicting MSE", "0.2",
                                                                              "0.9"))):
        assert main(["optimize", "--profile", str(path), "--base", "logSNR", "--steps", "4"]) == 2
        _one_error_line(capsys.readouterr().err, *words)
    close = ErrorProfile.from_table(torch.tensor([0.9, 0.5, 0.5, 0.1]), torch.tensor([0.1, 0.2, 0.202, 0.9]))
    assert close.num_bins == 3  # rows printed with the same alpha_bar that agree: one bin, their mean
    measured = ErrorProfile.for_schedule(NoiseSchedule(), num_bins=10)
    measured.update(torch.zeros(4), torch.randn(4, 8))
    with pytest.raises(ValueError, match="one noise level"):
        measured.mse_function("fit")


def test_a_newer_checkpoint_version_is_refused_by_every_reader(files: dict[str, Path], tmp_path: Path,
                                                               capsys) -> None:
    v99 = files["v99"]
    for argv in (["optimize", "--profile", str(v99), "--base", "logSNR", "--steps", "4"], ["inspect", str(v99)],
                 _sample({**files, "ckpt": v99}, tmp_path / "s", reference=False)):
        assert main(argv) == 2
        _one_error_line(capsys.readouterr().err, "version 99 is newer", "upgrade")
    for read in (load_profile, load_checkpoint_file, load_denoiser):
        with pytest.raises(ValueError, match="version 99 is newer"):
            read(v99)


# --- messages ------------------------------------------------------------------------------------------------------
def test_unreadable_files_are_named_and_torch_advice_is_never_passed_on(files: dict[str, Path],
                                                                        tmp_path: Path, capsys) -> None:
    binary, text, pick = tmp_path / "traj.bin", tmp_path / "notes.txt", tmp_path / "obj.pkl"
    binary.write_bytes(bytes(range(256)) * 4)
    text.write_text("hello\n")
    torch.save({"state_dict": {}, "x": argparse.Namespace(a=1)}, pick)  # unpickling would build the object
    assert main(["optimize", "--profile", str(files["table"]), "--trajectory", str(binary)]) == 2
    _one_error_line(capsys.readouterr().err, "traj.bin", "binary", "alpha_bar")
    for path, why in ((text, "is a text file"), (pick, "Python objects other than tensors")):
        assert main(["inspect", str(path)]) == 2
        err = capsys.readouterr().err
        _one_error_line(err, path.name, why)
        assert "weights_only" not in err
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="'.*empty.pt' is empty"):
        load_torch_file(tmp_path / "empty.pt")


def test_tune_refuses_a_hard_link_of_its_input_even_with_force(files: dict[str, Path], tmp_path: Path,
                                                              capsys) -> None:
    link = tmp_path / "link.ckpt"
    os.link(files["ckpt"], link)
    before = files["ckpt"].read_bytes()
    assert main(["tune", "--ckpt", str(files["ckpt"]), "--out", str(link), "--force"]) == 2
    _one_error_line(capsys.readouterr().err, "--ckpt input", "a link to the same file")
    assert files["ckpt"].read_bytes() == before


def test_tune_counts_the_cells_it_tuned(files: dict[str, Path], tmp_path: Path, capsys) -> None:
    earlier = [{"solver": "ddim", "steps": n, "base": "logSNR", "objective": "paper", "lp": 0.1,
                "alpha_bar": [0.99, 0.5, 0.1, 0.01][:4], "validated": {"selected": False, "screen": [], "reason": "x"}}
               for n in (5, 6, 7)]  # cells an earlier tuning run validated
    ckpt = make_checkpoint(tmp_path / "tuned-before.ckpt", entries=(("ddim", 4, "time_uniform"),),
                           extra_entries=earlier)
    assert main(["tune", "--ckpt", str(ckpt), "--out", str(tmp_path / "out.ckpt"), "--solvers", "ddim", "--steps",
                 "4", "--bases", "time_uniform", "--lps", "0.1", "--objectives", "paper", "--pin-start", "free",
                 "--no-fix", "--num-samples", "8", "--seeds", "0,1", "--confirm-seeds", "2,3", "--cache-dir",
                 str(files["cache"]), "--threads", "1"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("1 cell tuned in")


def test_resuming_training_with_another_schedule_is_a_mismatch_error_with_the_fix() -> None:
    from vrg_lightning.module import DiffusionModule

    ckpt: dict = {}
    DiffusionModule(unet=TINY_UNET).on_save_checkpoint(ckpt)
    with pytest.raises(CheckpointMismatchError, match="Cannot resume.*Resume with the checkpoint's schedule"):
        DiffusionModule(unet=TINY_UNET, beta_end=0.03).on_load_checkpoint(ckpt)
