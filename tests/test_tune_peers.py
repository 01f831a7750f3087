"""Peers in validated tuning (issue 13, item 2): TuneSettings.peers (validated, stored only when given), GITS and DMN
and VRG on top of each as candidates (same optimizer settings as on the classic base, distinct labels, DMN left out
with its reason where its bound does not cover the solver), the stored entry of a winning peer or VRG-on-peer
(kind, peer, provenance; sampled by ``--trajectory vrg``), and ``vrg tune --peers dmn`` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import TINY_UNET, make_checkpoint

import vrg_lightning.evaluation.tune as tune_module
from vrg_lightning.cli import build_parser, main
from vrg_lightning.denoiser import Denoiser
from vrg_lightning.evaluation import TuneSettings, make_candidates, tune_vrg
from vrg_lightning.optimize import optimize_trajectory
from vrg_lightning.optimize.entries import grid_settings
from vrg_lightning.peers import peer_base
from vrg_lightning.profile import ErrorProfile
from vrg_lightning.sampling import resolve_trajectory
from vrg_lightning.schedule import NoiseSchedule

SETTINGS = TuneSettings.from_dict({"solvers": ["ddim"], "steps": [4], "bases": ["time_uniform"], "lps": [0.1],
                                   "objectives": ["paper"], "fix": False, "peers": ["gits", "dmn"]})


@pytest.fixture(scope="module")
def model() -> Denoiser:
    torch.manual_seed(0)
    return Denoiser(TINY_UNET).eval()


@pytest.fixture(scope="module")
def peer_cache() -> dict:
    return {}  # one GITS teacher pass for the whole module


def _profile(schedule: NoiseSchedule) -> ErrorProfile:
    ab = schedule.alphas_cumprod[::50]
    return ErrorProfile.from_table(ab, 0.02 + 0.3 * (1 - ab) * ab + 0.05 * ab)


def test_settings_keep_peers_and_old_dicts_still_load() -> None:
    assert SETTINGS.peers == ("gits", "dmn")
    d = json.loads(json.dumps(SETTINGS.to_dict()))
    assert d["peers"] == ["gits", "dmn"] and TuneSettings.from_dict(d) == SETTINGS
    assert TuneSettings.from_dict({"peers": "dmn"}).peers == ("dmn",)
    old = TuneSettings().to_dict()
    assert "peers" not in old  # no peers: the stored format of before
    assert TuneSettings.from_dict(old).peers == () == TuneSettings.from_dict({"peers": None}).peers
    for bad in (["unipc"], ["dmn", "dmn"], 3):
        with pytest.raises(ValueError, match=r"peers must be distinct names of gits, dmn, ays; got \[.+\]\."):
            TuneSettings.from_dict({"peers": bad})


def test_candidates_hold_each_peer_and_vrg_on_it(model: Denoiser, peer_cache: dict) -> None:
    sch = model.schedule
    prof = _profile(sch)
    c = make_candidates(sch, prof, "ddim", 4, "time_uniform", SETTINGS, model=model, peer_cache=peer_cache)
    by = {x.label: x for x in c}
    assert len(by) == len(c) and len({x.alpha_bar for x in c}) == len(c)  # distinct labels and trajectories
    assert set(by) == {"base:time_uniform", "vrg:paper:lp=0.1:free", "peer:gits", "peer:dmn",
                       "vrg:paper:lp=0.1:free@gits", "vrg:paper:lp=0.1:free@dmn"}
    st = grid_settings(SETTINGS.grid, sch, "ddim", 0.1, "paper")
    for name in ("gits", "dmn"):
        peer = peer_base(name, sch, "ddim", 4, model=model, cache=peer_cache)
        p, v = by[f"peer:{name}"], by[f"vrg:paper:lp=0.1:free@{name}"]
        assert p.kind == "peer" and torch.equal(p.tensor, peer.alpha_bar)
        assert p.info["base_provenance"]["method"] == name == v.info["peer"]
        assert v.kind == "vrg" and v.info["base_provenance"] == p.info["base_provenance"]
        # VRG on the peer: the classic candidates' optimizer settings, started from the peer's trajectory
        assert torch.allclose(v.tensor, optimize_trajectory(peer.alpha_bar, prof.mse_function(st.mse_mode), st)
                              .alpha_bar)
        for k in ("lp", "reg_lambda", "trust", "pin_start", "mse_mode", "objective"):
            assert v.info[k] == by["vrg:paper:lp=0.1:free"].info[k]
    assert "skipped" not in c[0].info
    # another cell reuses the GITS teacher pass: one cost matrix in the shared cache
    make_candidates(sch, prof, "dpmpp_2m", 5, "logSNR", SETTINGS, model=model, peer_cache=peer_cache)
    assert sum(1 for k in peer_cache if k[0] == "gits") == 1


def test_uncovered_solver_and_missing_model_leave_peers_out_with_the_reason() -> None:
    sch = NoiseSchedule()
    c = make_candidates(sch, _profile(sch), "plms", 4, "time_uniform", SETTINGS)
    assert not [x.label for x in c if "dmn" in x.label or "gits" in x.label]
    skipped = c[0].info["skipped"]
    assert set(skipped) == {"peer:gits", "peer:dmn"}
    assert "covers the data-prediction multistep solvers" in skipped["peer:dmn"] and "'plms'" in skipped["peer:dmn"]
    assert "needs the model" in skipped["peer:gits"]
    assert {x.kind for x in c} == {"base", "vrg"}  # the classic candidates stay


class PeerWinsEvaluator:
    """Paired FIDs where one trajectory (``winner``) is clearly better than everything else."""

    num_samples, sampled_images, nfe = 16, 0, 0

    def __init__(self, *args, winner: tuple[float, ...] = (), **kwargs) -> None:
        self.winner = winner

        class E:
            name = "fake"

        self.extractor = E()

    def fids(self, solver, alpha_bar, seeds):
        low = tuple(float(v) for v in alpha_bar) == self.winner
        return [(1.0 if low else 5.0) + 0.01 * s for s in seeds]


@pytest.mark.parametrize("winner", ["peer:dmn", "vrg:paper:lp=0.1:free@dmn"])
def test_a_winning_peer_is_stored_with_its_kind_and_provenance(tmp_path: Path, monkeypatch, winner: str) -> None:
    raw = torch.load(make_checkpoint(tmp_path / "m.ckpt"), weights_only=True)
    den, vrg = Denoiser(TINY_UNET).eval(), raw["vrg"]
    st = SETTINGS.replace(peers=["dmn"], screen_seeds=[0, 1], confirm_seeds=[3, 4, 5])
    cands = {c.label: c for c in make_candidates(den.schedule, ErrorProfile.from_dict(vrg["profile"]), "ddim", 4,
                                                  "time_uniform", st)}
    win = cands[winner]
    monkeypatch.setattr(tune_module, "FIDEvaluator",
                        lambda *a, **k: PeerWinsEvaluator(winner=win.alpha_bar))
    new = tune_vrg(den, vrg, st, extractor=None, reference=None)
    (e,) = [e for e in new["entries"] if (e["solver"], e["steps"], e["base"]) == ("ddim", 4, "time_uniform")]
    json.dumps(e)  # plain types
    assert e["validated"]["selected"] and e["validated"]["candidate"] == winner
    assert e["kind"] == win.kind == ("peer" if winner.startswith("peer") else "vrg")
    assert e["objective"] == ("peer" if e["kind"] == "peer" else "paper")
    assert e["peer"] == "dmn" and e["base_provenance"]["method"] == "dmn"
    assert e["base_provenance"]["model_evaluations"] == 0
    assert e["alpha_bar"] == list(win.alpha_bar) and e["base_alpha_bar"] == list(cands["base:time_uniform"].alpha_bar)
    assert new["tune"]["settings"]["peers"] == ["dmn"]
    traj = resolve_trajectory(NoiseSchedule(), new, "ddim", 4, "vrg", base="time_uniform")
    assert list(traj.alpha_bar) == list(win.alpha_bar)  # `vrg sample --trajectory vrg` samples the winner


def test_vrg_tune_with_peers_stores_them_in_the_screening(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "model.ckpt")
    out = tmp_path / "tuned.ckpt"
    rc = main(["tune", "--ckpt", str(ckpt), "--out", str(out), "--solvers", "ddim,plms", "--steps", "4", "--bases",
               "time_uniform", "--lps", "0.1", "--objectives", "paper", "--no-fix", "--peers", "dmn",
               "--num-samples", "16", "--seeds", "0,1", "--confirm-seeds", "3,4", "--cache-dir",
               str(tmp_path / "cache"), "--threads", "1"])
    assert rc == 0
    vrg = torch.load(out, weights_only=True)["vrg"]
    assert vrg["tune"]["settings"]["peers"] == ["dmn"]
    cells = {e["solver"]: e for e in vrg["entries"] if e["steps"] == 4 and e["base"] == "time_uniform"
             and e["validated"] is not None}
    ddim, plms = cells["ddim"]["validated"], cells["plms"]["validated"]
    assert {(s["label"], s["kind"]) for s in ddim["screen"]} == {
        ("vrg:paper:lp=0.1:free", "vrg"), ("peer:dmn", "peer"), ("vrg:paper:lp=0.1:free@dmn", "vrg")}
    assert len(ddim["fid_base_screen"]) == 2 and all(len(s["fid"]) == 2 for s in ddim["screen"])
    assert "skipped" not in ddim
    assert [s["label"] for s in plms["screen"]] == ["vrg:paper:lp=0.1:free"]  # DMN does not cover plms
    assert "covers the data-prediction multistep solvers" in plms["skipped"]["peer:dmn"]
    for e in cells.values():
        assert (e["kind"] in ("peer", "vrg")) is e["validated"]["selected"]
        assert ("base_provenance" in e) is (e["kind"] == "peer" or "@" in (e["validated"]["candidate"] or "")
                                          and e["validated"]["selected"])


def test_peers_flag_takes_a_comma_list_of_peer_names(capsys) -> None:
    p = build_parser()
    assert p.parse_args(["tune", "--ckpt", "a", "--out", "b", "--peers", "gits,dmn"]).peers == ("gits", "dmn")
    assert p.parse_args(["tune", "--ckpt", "a", "--out", "b"]).peers is None  # default: no peers
    with pytest.raises(SystemExit):
        p.parse_args(["tune", "--ckpt", "a", "--out", "b", "--peers", "dmn,unipc"])
    assert "'unipc'" in capsys.readouterr().err


def test_quality_side_by_side_lists_every_peer_row_with_its_cost(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    import vrg_lightning.peers.bases as peer_bases
    from vrg_lightning.peers import GITSSettings

    fast = GITSSettings(num_noises=8, batch_size=8)
    monkeypatch.setattr(peer_bases, "GITSSettings", lambda: fast)  # 8 teacher paths instead of 256
    spec = importlib.util.spec_from_file_location("quality", Path(__file__).parents[1] / "benchmarks" / "quality.py")
    quality = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quality)
    ckpt = make_checkpoint(tmp_path / "m.ckpt")
    out = tmp_path / "q"
    assert quality.main(["--ckpt", str(ckpt), "--grid", "smoke", "--bases", "time_uniform,logSNR", "--lps", "0.1",
                         "--pin-start", "free", "--num-samples", "16", "--seeds", "0,1", "--confirm-seeds", "3,4",
                         "--fresh-seeds", "5,6", "--out", str(out), "--threads", "1", "--side-by-side",
                         "--converged-steps", "0", "--no-fix"]) == 0
    side = json.loads((out / "side" / "ddim-4.json").read_text())
    cells = {b: json.loads((out / "cells" / f"ddim-4-{b}.json").read_text()) for b in ("time_uniform", "logSNR")}
    screen = {b: sum(c["validated"]["fid_base_screen"]) for b, c in cells.items()}
    assert side["best_base"] == min(screen, key=screen.get)
    rows = side["rows"]
    assert set(rows) == set(quality.SIDE_ROWS) and all(rows[k] is not None for k in rows)
    assert rows["best base"]["diff"]["mean"] == 0 and rows["best base"]["model_evaluations"] == 0
    assert rows["GITS"]["label"] == "peer:gits" and rows["GITS"]["model_evaluations"] == 8 * 62
    assert rows["VRG on GITS"]["model_evaluations"] == 8 * 62  # VRG on a peer pays for the peer
    assert rows["DMN"]["model_evaluations"] == 0 < rows["DMN"]["seconds"]
    assert rows["VRG on DMN"]["label"].endswith("@dmn") and "@" not in rows["VRG on best base"]["label"]
    assert rows["tuned"]["label"] == cells[side["best_base"]]["chosen"]
    means = {k: r["mean"] for k, r in rows.items() if k != "tuned"}
    assert side["winner"] == min(means, key=means.get)
    assert "Tuned choice significantly worse than the best peer" in (out / "side.md").read_text()
