"""Validated selection (vrg tune): settings (composing TrajectoryGrid, the flat stored format), candidates (through
the optimizer's one entry builder), the two-stage decision, the new checkpoint (input untouched, plain types),
sampling the validated entry, the VRGProfiler option and a smoke run of benchmarks/quality.py."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from helpers import make_checkpoint

from vrg_lightning.cli import main
from vrg_lightning.evaluation import TUNE_GRID, Candidate, TuneSettings, make_candidates, tune_cell
from vrg_lightning.optimize import TrajectoryGrid
from vrg_lightning.optimize.discretization import Curvature
from vrg_lightning.profile import ErrorProfile
from vrg_lightning.sampling import resolve_trajectory
from vrg_lightning.schedule import NoiseSchedule
from vrg_lightning.trajectories import make_trajectory

ROOT = Path(__file__).resolve().parents[1]


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


# the flat settings dict as vrg tune stored it before TuneSettings composed TrajectoryGrid (vrg["tune"]["settings"])
STORED = {"solvers": ["ddim"], "steps": [4], "bases": ["time_uniform"], "lps": [0.1], "objectives": ["paper", "solver"],
          "pin_start": "both", "reg_lambda": 100.0, "trust": "alpha", "mse_mode": "fit", "fix": True,
          "num_samples": 16, "screen_seeds": [0, 1], "confirm_seeds": [3, 4], "features": "digits",
          "confidence": 0.95, "rank_by": "upper", "batch_size": 256, "curvature_samples": 32, "curvature_steps": 100}


def _flat(**changes) -> TuneSettings:
    return TuneSettings.from_dict(changes)


def test_settings_validate_and_round_trip() -> None:
    s = _flat(lps=(0.01, 0.1), screen_seeds=(0, 1), confirm_seeds=(5, 6))
    assert TuneSettings.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    with pytest.raises(ValueError, match="must be disjoint"):
        _flat(screen_seeds=(0, 1), confirm_seeds=(1, 2))
    with pytest.raises(ValueError, match="pin_start must be one of free, pinned, both; got 'x'"):
        _flat(pin_start="x")
    with pytest.raises(ValueError, match="solvers must be a non-empty list"):  # TrajectoryGrid's check
        _flat(solvers=("euler",))
    with pytest.raises(ValueError, match="confirm_seeds needs >= 2"):
        _flat(confirm_seeds=(7,))
    with pytest.raises(ValueError, match="lp must be a number strictly between 0 and 1"):  # OptimizeSettings'
        _flat(lps=(1.5,))
    with pytest.raises(ValueError, match="grid.steps must hold at least one"):
        _flat(steps=())
    with pytest.raises(ValueError, match="features must be one of auto, digits"):
        _flat(features="clip")


def test_settings_compose_the_grid_and_keep_the_stored_flat_format() -> None:
    s = TuneSettings.from_dict(STORED)
    assert s.to_dict() == STORED  # the stored format (keys and values) is unchanged
    assert s.grid == TrajectoryGrid(solvers=("ddim",), steps=(4,), bases=("time_uniform",), lps=(0.1,),
                                    objectives=("paper", "solver"))
    assert (s.steps, s.lps, s.reg_lambda, s.pins()) == ((4,), (0.1,), 100.0, (False, True))
    # tune's own defaults for lps/objectives (validation chooses among several); the rest is the grid's
    d = TuneSettings()
    assert d.grid == TUNE_GRID and (d.lps, d.objectives) == ((0.01, 0.03, 0.1, 0.3), ("paper", "solver"))
    assert (d.reg_lambda, d.trust, d.mse_mode, d.bases) == (TrajectoryGrid().reg_lambda, TrajectoryGrid().trust,
                                                           TrajectoryGrid().mse_mode, TrajectoryGrid().bases)
    assert s.replace(num_samples=32, lps=[0.03]).to_dict() == {**STORED, "num_samples": 32, "lps": [0.03]}
    with pytest.raises(ValueError, match="grid.pin_start must be False"):
        TuneSettings(grid=TUNE_GRID.replace(pin_start=True))


def test_settings_read_the_yaml_tune_settings() -> None:
    import yaml

    cfg = yaml.safe_load((ROOT / "configs" / "digits.yaml").read_text())
    cb = next(c for c in cfg["trainer"]["callbacks"] if c["class_path"].endswith("VRGProfiler"))
    flat = cb["init_args"]["tune_settings"]
    s = TuneSettings.from_dict(flat)
    assert all(s.to_dict()[k] == v for k, v in flat.items())


def _profile() -> tuple[NoiseSchedule, ErrorProfile]:
    sch = NoiseSchedule()
    ab = sch.alphas_cumprod[::50]
    return sch, ErrorProfile.from_table(ab, 0.02 + 0.3 * (1 - ab) * ab + 0.05 * ab)


def test_candidates_base_first_distinct_and_pinned() -> None:
    sch, prof = _profile()
    cur = Curvature((-10.0, 0.0, 10.0), (1e-5, 1e-4, 1e-3), data_var=0.25)
    st = _flat(lps=(0.03, 0.1), objectives=("paper", "solver"), pin_start="both")
    c = make_candidates(sch, prof, "ddim", 10, "time_quadratic", st, cur)
    base = make_trajectory(sch, "time_quadratic", 10)
    assert c[0].kind == "base" and torch.equal(c[0].tensor, base)
    assert len({x.alpha_bar for x in c}) == len(c)  # no duplicates (ddim: solver objective == paper)
    assert {x.kind for x in c} == {"base", "vrg", "disc"}
    assert {x.info["pin_start"] for x in c[1:]} == {True, False}
    for x in c[1:]:
        if x.info["pin_start"]:
            assert x.alpha_bar[-1] == float(base[-1])
    st = _flat(lps=(0.1,), objectives=("paper", "solver"), pin_start="pinned")
    other = make_candidates(sch, prof, "dpmpp_2m", 5, "time_quadratic", st, cur)
    assert "disc" not in {x.kind for x in other}  # the Euler error model is DDIM's only
    assert any(x.info.get("objective") == "solver" for x in other)


class FakeEvaluator:
    """FIDs from a table: fid(label, seed) = table[label][seed]."""

    def __init__(self, table: dict[str, dict[int, float]], labels: dict[tuple, str]) -> None:
        self.table, self.labels, self.num_samples, self.calls = table, labels, 100, []

        class E:
            name = "fake"

        self.extractor = E()

    def fids(self, solver, alpha_bar, seeds):
        lab = self.labels[tuple(alpha_bar)]
        self.calls.append((lab, tuple(seeds)))
        return [self.table[lab][s] for s in seeds]


def _cands() -> list[Candidate]:
    return [Candidate("base", "base", (0.9, 0.5, 0.1), {}), Candidate("a", "vrg", (0.9, 0.5, 0.2), {"lp": 0.1}),
            Candidate("b", "vrg", (0.9, 0.4, 0.1), {"lp": 0.01})]


@pytest.mark.parametrize("case", ["selected", "not_confirmed", "none_better"])
def test_tune_cell_two_stage_decision(case: str) -> None:
    st = _flat(screen_seeds=(0, 1), confirm_seeds=(5, 6, 7))
    cands = _cands()
    labels = {c.alpha_bar: c.label for c in cands}
    base = {0: 10.0, 1: 11.0, 5: 10.0, 6: 12.0, 7: 11.0}
    if case == "selected":  # b best on screening and consistently better on the fresh seeds
        t = {"base": base, "a": {0: 9.9, 1: 10.9}, "b": {0: 9.0, 1: 10.1, 5: 9.0, 6: 11.1, 7: 9.95}}
    elif case == "not_confirmed":  # b wins the screening, but on fresh seeds its differences straddle 0
        t = {"base": base, "a": {0: 9.9, 1: 10.9}, "b": {0: 9.0, 1: 10.1, 5: 8.0, 6: 13.0, 7: 11.0}}
    else:
        t = {"base": base, "a": {0: 10.5, 1: 11.2}, "b": {0: 10.1, 1: 11.5}}
    ev = FakeEvaluator(t, labels)
    chosen, rec = tune_cell(ev, "ddim", cands, st)
    json.dumps(rec)  # plain types
    if case == "selected":
        assert chosen.label == "b" and rec["selected"] is True and rec["ci_high"] < 0
        assert rec["seeds"] == [5, 6, 7] and rec["candidate"] == "b"
    else:
        assert chosen.label == "base" and rec["selected"] is False and "base kept" in rec["reason"]
    if case == "none_better":  # nothing advanced: no confirmation sampling at all
        assert all(seeds == (0, 1) for _, seeds in ev.calls)
    else:  # only the screening winner is confirmed
        assert {lab for lab, seeds in ev.calls if seeds == (5, 6, 7)} == {"base", "b"}


@pytest.mark.parametrize("rank_by", ["upper", "mean"])
def test_tune_cell_ranks_by_upper_bound_or_mean(rank_by: str) -> None:
    # a: large but erratic gain (-3.0 +- 3.0 over seeds); b: smaller, consistent gain (-1.0 +- 0.1)
    st = _flat(screen_seeds=(0, 1, 2), confirm_seeds=(5, 6, 7), rank_by=rank_by)
    cands = _cands()
    labels = {c.alpha_bar: c.label for c in cands}
    base = {0: 10.0, 1: 11.0, 2: 12.0, 5: 10.0, 6: 12.0, 7: 11.0}
    t = {"base": base, "a": {0: 10.0, 1: 5.0, 2: 9.0, 5: 9.0, 6: 11.0, 7: 10.0},
         "b": {0: 9.0, 1: 9.9, 2: 11.1, 5: 9.0, 6: 11.0, 7: 10.0}}
    chosen, rec = tune_cell(FakeEvaluator(t, labels), "ddim", cands, st)
    assert rec["candidate"] == ("b" if rank_by == "upper" else "a") and rec["rank_by"] == rank_by
    with pytest.raises(ValueError, match="rank_by must be one of upper, mean"):
        TuneSettings(rank_by="median")


def test_tune_cell_needs_the_base_first() -> None:
    c = _cands()
    with pytest.raises(ValueError, match="candidates\\[0\\] must be the base"):
        tune_cell(FakeEvaluator({}, {}), "ddim", c[1:], TuneSettings())


@pytest.fixture(scope="module")
def tuned(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("tune")
    ckpt = make_checkpoint(d / "model.ckpt")
    before = _sha(ckpt)
    out = d / "tuned.ckpt"
    rc = main(["tune", "--ckpt", str(ckpt), "--out", str(out), "--solvers", "ddim", "--steps", "4", "--bases",
               "time_uniform", "--lps", "0.1", "--pin-start", "both", "--num-samples", "16", "--seeds", "0,1",
               "--confirm-seeds", "3,4", "--cache-dir", str(d / "cache"), "--threads", "1"])
    assert rc == 0
    assert _sha(ckpt) == before  # the input is never overwritten
    return {"ckpt": ckpt, "out": out}


def test_tuned_checkpoint_holds_plain_validated_entries(tuned: dict[str, Path]) -> None:
    raw = torch.load(tuned["out"], weights_only=True)
    vrg = raw["vrg"]
    cell = [e for e in vrg["entries"] if (e["solver"], e["steps"], e["base"]) == ("ddim", 4, "time_uniform")]
    assert len(cell) == 1  # one validated entry replaces the cell's stored entries
    others = [e for e in vrg["entries"] if e not in cell]
    assert {(e["solver"], e["base"]) for e in others} == {("ddim", "logSNR"), ("dpmpp_2m", "time_uniform")}
    v = cell[0]["validated"]
    for k in ("selected", "reason", "fid_base", "fid_candidate", "paired_diff", "ci_low", "ci_high", "num_samples",
              "seeds", "features"):
        assert k in v
    assert v["num_samples"] == 16 and v["features"] == "digits-classifier" and isinstance(v["selected"], bool)
    assert "curvature" in vrg and vrg["tune"]["settings"] == STORED  # the stored settings format is unchanged
    base = make_trajectory(NoiseSchedule(), "time_uniform", 4).tolist()
    assert (cell[0]["alpha_bar"] == base) is (not v["selected"])  # base kept <=> the entry samples the base
    traj = resolve_trajectory(NoiseSchedule(), vrg, "ddim", 4, "vrg", base="time_uniform")
    assert list(traj.alpha_bar) == cell[0]["alpha_bar"]
    assert ("kept the base time_uniform" in (traj.note or "")) is (not v["selected"])


def test_tune_refuses_to_overwrite_its_input(tuned: dict[str, Path], capsys) -> None:
    rc = main(["tune", "--ckpt", str(tuned["ckpt"]), "--out", str(tuned["ckpt"]), "--steps", "4"])
    assert rc == 2 and "never overwrites its input" in capsys.readouterr().err


def test_resolve_says_when_the_base_was_kept() -> None:
    sch = NoiseSchedule()
    base = make_trajectory(sch, "logSNR", 5).tolist()
    vrg = {"entries": [{"solver": "ddim", "steps": 5, "base": "logSNR", "alpha_bar": base,
                        "validated": {"selected": False, "reason": "not confirmed"}}]}
    t = resolve_trajectory(sch, vrg, "ddim", 5, "vrg")
    assert list(t.alpha_bar) == base and "sampling the base trajectory" in t.note


def test_profiler_option_validates_settings() -> None:
    from vrg_lightning.callbacks import VRGProfiler

    cb = VRGProfiler(tune_at_fit_end=True, tune_settings={"num_samples": 64, "lps": [0.03]}, steps=[10])
    assert cb.tune_settings.num_samples == 64 and cb.tune_settings.steps == (10,)
    with pytest.raises(ValueError, match="must be disjoint"):
        VRGProfiler(tune_at_fit_end=True, tune_settings={"screen_seeds": [0, 1], "confirm_seeds": [1, 2]})


def test_quality_smoke_run_is_resumable(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("quality", ROOT / "benchmarks" / "quality.py")
    quality = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quality)

    ckpt = make_checkpoint(tmp_path / "m.ckpt")
    args = ["--ckpt", str(ckpt), "--grid", "smoke", "--lps", "0.1", "--pin-start", "free", "--num-samples", "16",
            "--seeds", "0,1", "--confirm-seeds", "3,4", "--fresh-seeds", "5,6", "--out", str(tmp_path / "q"),
            "--threads", "1"]
    assert quality.main(args) == 0
    cell = tmp_path / "q" / "cells" / "ddim-4-time_uniform.json"
    res = json.loads(cell.read_text())
    assert res["rows"] and res["fresh"]["seeds"] == [5, 6]
    if res["chosen"].startswith("base"):
        assert res["fresh"]["diff"]["mean"] == 0.0
    mtime = cell.stat().st_mtime_ns
    assert quality.main(args) == 0  # rerun: the finished cell is skipped
    assert cell.stat().st_mtime_ns == mtime
    assert "Spearman" in (tmp_path / "q" / "summary.md").read_text()
    # a new selection (other confirmation seeds) reuses the stored optimised candidates, not a new optimisation
    cell.unlink()
    stored = json.loads((tmp_path / "q" / "candidates" / cell.name).read_text())["candidates"]
    calls = []
    orig = quality.make_candidates
    quality.make_candidates = lambda *a, **k: calls.append(a) or orig(*a, **k)
    try:
        assert quality.main([*args[:-6], "--confirm-seeds", "7,8", *args[-4:]]) == 0
    finally:
        quality.make_candidates = orig
    assert not calls and [r["label"] for r in json.loads(cell.read_text())["rows"]] == [c["label"] for c in stored[1:]]


def test_profiler_tunes_at_fit_end(tmp_path: Path) -> None:
    import lightning.pytorch as pl
    from helpers import TINY_UNET
    from torch.utils.data import DataLoader, TensorDataset

    from vrg_lightning.callbacks import VRGProfiler
    from vrg_lightning.checkpoint import read_vrg
    from vrg_lightning.module import DiffusionModule

    torch.manual_seed(0)
    cb = VRGProfiler(probe_samples=32, probe_batch_size=32, steps=[4], bases=["time_uniform"], lps=[0.1], num_bins=10,
                     tune_at_fit_end=True, tune_reference_samples=32,
                     tune_settings={"num_samples": 8, "lps": [0.1], "pin_start": "pinned", "fix": False,
                                    "screen_seeds": [0, 1], "confirm_seeds": [3, 4], "batch_size": 8})
    data = DataLoader(TensorDataset(torch.rand(32, 1, 16, 16) * 2 - 1), batch_size=8)
    ck = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0, every_n_train_steps=2)
    trainer = pl.Trainer(max_steps=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[ck, cb], accelerator="cpu")
    trainer.fit(DiffusionModule(unet=TINY_UNET), data)
    vrg = read_vrg(torch.load(tmp_path / "last.ckpt", weights_only=True))
    (entry,) = vrg["entries"]
    assert isinstance(entry["validated"]["selected"], bool) and entry["validated"]["num_samples"] == 8
    assert vrg["tune"]["settings"]["pin_start"] == "pinned" and vrg["tune"]["images_sampled"] > 0
    t = vrg["tune"]
    assert t["train_seconds"] > 0 and t["fraction_of_training"] == pytest.approx(t["seconds"] / t["train_seconds"])


def test_tune_checkpoint_refuses_an_existing_out_file(tmp_path, capsys) -> None:
    from vrg_lightning.evaluation import tune_checkpoint

    out = tmp_path / "tuned.ckpt"
    out.write_bytes(b"earlier result")
    with pytest.raises(FileExistsError, match=r"exists; pass force=True"):  # Python wording in the library
        tune_checkpoint(tmp_path / "model.ckpt", out, TuneSettings(), "digits")
    with pytest.raises(ValueError, match="never overwrites its input"):
        tune_checkpoint(out, out, TuneSettings(), "digits")
    rc = main(["tune", "--ckpt", str(tmp_path / "model.ckpt"), "--out", str(out)])
    assert rc == 2 and "--out" in (err := capsys.readouterr().err) and "pass --force" in err  # flags in the CLI
    assert out.read_bytes() == b"earlier result"
    rc = main(["tune", "--ckpt", str(tmp_path / "model.ckpt"), "--out", str(tmp_path / "new.ckpt"), "--features",
               "inception"])
    assert rc == 2 and "--inception-weights" in capsys.readouterr().err


def test_tune_flags_take_comma_lists_and_name_lists_as_choices(capsys) -> None:
    from vrg_lightning.cli import build_parser

    args = build_parser().parse_args(["tune", "--ckpt", "a", "--out", "b", "--solvers", "ddim,dpmpp_2m", "--steps",
                                      "4", "10", "--lps", "0.1,0.3", "--seeds", "0,1", "--trust", "logsnr"])
    assert args.solvers == ("ddim", "dpmpp_2m") and args.steps == (4, 10) and args.lps == (0.1, 0.3)
    assert args.seeds == (0, 1) and args.confirm_seeds == TuneSettings().confirm_seeds and args.trust == "logsnr"
    assert args.reg_lambda == TuneSettings().reg_lambda and args.pin_start == TuneSettings().pin_start
    with pytest.raises(SystemExit):
        build_parser().parse_args(["tune", "--ckpt", "a", "--out", "b", "--solvers", "ddim,euler"])
    assert "'euler'" in capsys.readouterr().err
