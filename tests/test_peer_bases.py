"""Peer bases stored like the others (issue 13, item 1): ``gits`` and ``dmn`` in the trajectory grid, in the entries
``compute_entries`` builds (with ``base_provenance``), in the callback's checkpoints (GITS computed again only when
the weights changed), in ``vrg profile``, and read back by ``vrg sample`` / ``vrg export`` / ``vrg optimize``;
bad input (item 4) fails early with errors that say what to do."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import TINY_UNET, make_checkpoint, vrg_version

import vrg_lightning.peers.bases as peer_bases
from vrg_lightning import VRGProfiler
from vrg_lightning.checkpoint import read_vrg
from vrg_lightning.cli import main
from vrg_lightning.denoiser import Denoiser
from vrg_lightning.optimize.entries import compute_entries
from vrg_lightning.optimize.settings import TrajectoryGrid
from vrg_lightning.peers import GITSSettings, dmn, gits_costs, gits_from_costs, peer_base
from vrg_lightning.profile import ErrorProfile
from vrg_lightning.schedule import NoiseSchedule
from vrg_lightning.trajectories import make_trajectory

SCHED = NoiseSchedule()
FAST = GITSSettings(num_noises=8, batch_size=8)


@pytest.fixture()
def fast_gits(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """GITS with 8 teacher paths instead of the authors' 256 (the defaults the integration uses), counting the
    teacher passes and checking each runs in eval mode."""
    calls: list[int] = []
    real = peer_bases.gits_costs

    def counted(model, settings=None):
        assert not getattr(model, "training", False)  # the teacher pass runs in eval mode
        calls.append(1)
        return real(model, settings)

    monkeypatch.setattr(peer_bases, "GITSSettings", lambda: FAST)
    monkeypatch.setattr(peer_bases, "gits_costs", counted)
    return calls


@pytest.fixture(scope="module")
def model() -> Denoiser:
    torch.manual_seed(0)
    return Denoiser(TINY_UNET).eval()


def _profile() -> ErrorProfile:
    ab = SCHED.alphas_cumprod[::50]
    return ErrorProfile.from_table(ab, 0.02 + 0.3 * (1 - ab) * ab + 0.05 * ab)


def test_grid_takes_peer_bases_and_refuses_cells_they_cannot_serve() -> None:
    g = TrajectoryGrid(solvers=("ddim", "dpmpp_2m"), steps=(4,), bases=("logSNR", "gits", "dmn"))
    assert TrajectoryGrid.from_dict(json.loads(json.dumps(g.to_dict()))) == g
    with pytest.raises(ValueError, match="base 'dmn' cannot serve solver 'pndm': DMN's error bound covers"):
        TrajectoryGrid(solvers=("ddim", "pndm"), bases=("dmn",))
    with pytest.raises(ValueError, match=r"base 'gits' cannot serve steps=62: .*grid_size=61.*steps <= 61"):
        TrajectoryGrid(steps=(10, 62), bases=("gits",))
    TrajectoryGrid(solvers=("pndm",), steps=(61,), bases=("gits",))  # GITS serves any solver up to its grid
    with pytest.raises(ValueError, match="cannot serve solver 'deis'"):
        VRGProfiler(solvers=["deis"], bases=["dmn"])  # caught when the callback is built, not at the first save


def test_gits_grid_without_a_model_is_a_clear_error() -> None:
    grid = TrajectoryGrid(steps=(4,), bases=("logSNR", "gits"))
    with pytest.raises(ValueError, match=r"grid base 'gits' needs the model .*pass model= .*--ckpt, --model"):
        compute_entries(_profile(), SCHED, grid)
    assert compute_entries(_profile(), SCHED, grid.replace(steps=())) == []  # nothing to compute: no model needed


def test_entries_store_peer_bases_with_provenance(model: Denoiser, fast_gits: list[int], tmp_path: Path) -> None:
    grid = TrajectoryGrid(solvers=("ddim", "dpmpp_2m"), steps=(4, 6), bases=("logSNR", "gits", "dmn"))
    entries = compute_entries(_profile(), SCHED, grid, model=model, peer_cache={})
    assert len(entries) == 12 and len(fast_gits) == 1  # one teacher pass for both solvers and step counts
    costs = gits_costs(model, FAST)
    for e in entries:
        if e["base"] == "logSNR":
            assert "base_provenance" not in e
            continue
        want = (gits_from_costs(costs, e["solver"], e["steps"]) if e["base"] == "gits"
                else dmn(SCHED, e["solver"], e["steps"]))
        assert e["base_alpha_bar"] == pytest.approx(want.alpha_bar.tolist(), rel=1e-12)
        prov = e["base_provenance"]
        assert prov["method"] == e["base"] and prov["seconds"] > 0 and prov["settings"]
        assert prov["model_evaluations"] == (FAST.num_noises * (FAST.grid_size + 1) if e["base"] == "gits" else 0)
        assert e["alpha_bar"] != e["base_alpha_bar"]  # VRG moved the peer's steps
    torch.save({"entries": entries}, tmp_path / "e.pt")
    assert torch.load(tmp_path / "e.pt", weights_only=True)["entries"] == entries


def test_gits_is_computed_again_only_when_the_weights_change(fast_gits: list[int]) -> None:
    torch.manual_seed(1)
    den, cache = Denoiser(TINY_UNET).train(), {}
    a = peer_base("gits", SCHED, "ddim", 4, model=den, cache=cache)
    peer_base("gits", SCHED, "dpmpp_2m", 5, model=den, cache=cache)
    assert len(fast_gits) == 1 and den.training  # reused; the training flag is restored
    with torch.no_grad():
        next(den.parameters()).mul_(1.5)
    stale = peer_base("gits", SCHED, "ddim", 4, model=den, cache=cache, refresh=False)
    assert len(fast_gits) == 1 and stale.provenance["weights_sha256"] == a.provenance["weights_sha256"]
    b = peer_base("gits", SCHED, "ddim", 4, model=den, cache=cache)
    assert len(fast_gits) == 2 and len(cache) == 1  # fresh for the new weights; the stale matrix dropped
    assert b.provenance["model_evaluations"] == a.provenance["model_evaluations"]
    assert b.provenance["weights_sha256"] != a.provenance["weights_sha256"]


def test_budgeted_saves_reuse_the_gits_matrix_and_the_fit_end_refreshes_it(model: Denoiser,
                                                                           fast_gits: list[int]) -> None:
    from vrg_lightning.optimize.entries import EntryCache

    torch.manual_seed(2)
    den = Denoiser(TINY_UNET).eval()
    cache, grid = EntryCache(budget=0.5), TrajectoryGrid(steps=(4,), bases=("gits",))
    cache.model_fn = lambda: den
    profiles = [ErrorProfile.from_table(SCHED.alphas_cumprod[::50], m * (0.02 + SCHED.alphas_cumprod[::50]))
                for m in (1.0, 1.1, 1.2)]
    cache.last_end -= 1e6  # a long time since the last save: the budget allows every optimisation
    first, _ = cache.entries(profiles[0], SCHED, grid)
    with torch.no_grad():
        den.unet.conv_out.bias.add_(0.01)
    cache.last_end -= 1e6
    cache.last_call -= 1e6
    again, fresh = cache.entries(profiles[1], SCHED, grid)
    assert fresh and len(fast_gits) == 1  # a budgeted save: no second teacher pass for the new weights
    assert again[0]["base_provenance"]["weights_sha256"] == first[0]["base_provenance"]["weights_sha256"]
    last, _ = cache.entries(profiles[2], SCHED, grid, force=True)  # the fit end: GITS of the final weights
    assert len(fast_gits) == 2 and last[0]["base_provenance"]["weights_sha256"] != \
        first[0]["base_provenance"]["weights_sha256"]


def test_callback_checkpoints_hold_peer_bases(model: Denoiser, fast_gits: list[int]) -> None:
    cb = VRGProfiler(probe_at_fit_end=False, num_bins=10, half_life_samples=None, steps=[4], save_budget=None,
                     bases=["time_uniform", "gits", "dmn"], solvers=["ddim"])
    trainer = SimpleNamespace(world_size=1, global_rank=0, global_step=0, logger=None, is_global_zero=True)
    module = SimpleNamespace(vrg_schedule=SCHED, vrg_denoiser=lambda: model, vrg_prediction_type="epsilon")
    cb.setup(trainer, module, "fit")

    def save(seed: int) -> dict:
        g = torch.Generator().manual_seed(seed)
        t = torch.randint(0, 1000, (64,), generator=g)
        out = {"loss": torch.tensor(0.1), "vrg_alpha_bar": SCHED.alphas_cumprod[t],
               "vrg_error": 0.3 * torch.randn(64, 1, 2, 2, generator=g)}
        cb.on_train_batch_end(trainer, module, out, None, seed)
        ckpt: dict = {}
        cb.on_save_checkpoint(trainer, module, ckpt)
        return ckpt["vrg"]

    first = save(0)
    by_base = {e["base"]: e for e in first["entries"]}
    assert set(by_base) == {"time_uniform", "gits", "dmn"} and len(fast_gits) == 1
    assert by_base["gits"]["base_provenance"]["model_evaluations"] == FAST.num_noises * (FAST.grid_size + 1)
    assert by_base["dmn"]["base_provenance"]["model_evaluations"] == 0
    assert "base_provenance" not in by_base["time_uniform"]
    second = save(1)  # a new profile, the same weights: entries optimised again, no second teacher pass
    assert len(fast_gits) == 1 and second["entries"] != first["entries"]
    with torch.no_grad():
        model.unet.conv_out.bias.add_(0.01)
    save(2)
    assert len(fast_gits) == 2  # new weights: GITS again
    with torch.no_grad():
        model.unet.conv_out.bias.sub_(0.01)


def _stored_dmn_checkpoint(path: Path) -> tuple[Path, list[float]]:
    """A checkpoint whose ddim/4 ``dmn`` entry stores values that differ from what DMN computes, so a reader that
    recomputes instead of reading is caught."""
    x = make_trajectory(SCHED, "time_quadratic", 4)
    entry = {"solver": "ddim", "steps": 4, "base": "dmn", "objective": "paper", "lp": 0.01,
             "alpha_bar": vrg_version(x).tolist(), "base_alpha_bar": x.tolist(),
             "base_provenance": {"method": "dmn", "settings": {}, "seconds": 0.1, "model_evaluations": 0},
             "validated": None}
    return make_checkpoint(path, extra_entries=[entry]), x.tolist()


def test_sample_export_and_optimize_read_stored_peer_values(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ckpt, stored = _stored_dmn_checkpoint(tmp_path / "m.ckpt")
    assert stored != pytest.approx(dmn(SCHED, "ddim", 4).alpha_bar.tolist())
    base = ["export", "--ckpt", str(ckpt), "--solver", "ddim", "--format", "sigmas", "--json"]
    assert main([*base, "--steps", "4", "--trajectory", "dmn"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["alpha_bar"] == pytest.approx(stored, rel=1e-12) and d["source"] == "base:dmn"
    assert main([*base, "--steps", "4", "--base", "dmn"]) == 0  # the VRG entry on the dmn base
    assert json.loads(capsys.readouterr().out)["alpha_bar"] == pytest.approx(
        vrg_version(torch.tensor(stored, dtype=torch.float64)).tolist(), rel=1e-12)
    assert main([*base, "--steps", "5", "--trajectory", "dmn"]) == 0  # none stored for 5 steps: computed
    assert json.loads(capsys.readouterr().out)["alpha_bar"] == pytest.approx(
        dmn(SCHED, "ddim", 5).alpha_bar.tolist(), rel=1e-12)
    assert main([*base, "--steps", "4", "--trajectory", "gits"]) == 2
    assert "needs the model or GITS values stored" in capsys.readouterr().err
    base[4] = "pndm"
    assert main([*base, "--steps", "4", "--trajectory", "dmn"]) == 2
    assert "DMN's error bound covers" in capsys.readouterr().err

    out = tmp_path / "s"
    assert main(["sample", "--ckpt", str(ckpt), "--solver", "ddim", "--steps", "4", "--trajectory", "dmn",
                 "--num-samples", "4", "--shard-size", "4", "--out", str(out), "--accelerator", "cpu",
                 "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["trajectory"]["alpha_bar"] == pytest.approx(stored, rel=1e-12)
    assert report["trajectory"]["provenance"]["stored"] is True

    opt = ["optimize", "--profile", str(ckpt), "--solver", "ddim", "--steps", "4", "--json"]
    assert main([*opt, "--base", "dmn"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["base_alpha_bar"] == pytest.approx(stored)
    assert main([*opt, "--base", "gits"]) == 2
    assert "--base gits needs the model" in capsys.readouterr().err


def test_vrg_profile_stores_peer_bases(tmp_path: Path, fast_gits: list[int], capsys: pytest.CaptureFixture) -> None:
    src = make_checkpoint(tmp_path / "m.ckpt")
    out = tmp_path / "p.ckpt"
    assert main(["profile", "--ckpt", str(src), "--data", "digits", "--samples", "64", "--bins", "10",
                 "--batch-size", "64", "--device", "cpu", "--solvers", "ddim", "--steps", "4",
                 "--bases", "logSNR,gits,dmn", "--out", str(out), "--json"]) == 0
    capsys.readouterr()
    vrg = read_vrg(torch.load(out, weights_only=True))
    prov = {e["base"]: e.get("base_provenance") for e in vrg["entries"]}
    assert set(prov) == {"logSNR", "gits", "dmn"} and prov["logSNR"] is None and len(fast_gits) == 1
    assert prov["gits"]["model_evaluations"] == FAST.num_noises * (FAST.grid_size + 1)
    assert prov["gits"]["settings"]["num_noises"] == FAST.num_noises and prov["dmn"]["model_evaluations"] == 0
    assert main(["export", "--ckpt", str(out), "--solver", "ddim", "--steps", "4", "--trajectory", "gits",
                 "--format", "sigmas", "--json"]) == 0  # the stored GITS base: no model needed
    gits_entry = next(e for e in vrg["entries"] if e["base"] == "gits")
    assert json.loads(capsys.readouterr().out)["alpha_bar"] == pytest.approx(gits_entry["base_alpha_bar"])


def test_a_tuning_cell_on_a_peer_base_starts_from_the_peer() -> None:
    from vrg_lightning.evaluation import TuneSettings, make_candidates

    st = TuneSettings.from_dict({"solvers": ["ddim"], "steps": [4], "bases": ["dmn"], "lps": [0.1],
                                 "objectives": ["paper"], "fix": False, "peers": ["dmn"]})
    cands = make_candidates(SCHED, _profile(), "ddim", 4, "dmn", st)
    want = dmn(SCHED, "ddim", 4).alpha_bar.tolist()
    assert cands[0].label == "base:dmn" and list(cands[0].alpha_bar) == pytest.approx(want, rel=1e-12)
    assert all(c.info["base_provenance"]["method"] == "dmn" for c in cands)  # the base and VRG on it
    assert [c.label for c in cands] == ["base:dmn", "vrg:paper:lp=0.1:free"]  # no second copy as peer:dmn


def test_sample_compare_puts_the_stored_peer_base_against_vrg_on_it(sampling_files: dict[str, Path],
                                                                     tmp_path: Path) -> None:
    ckpt, stored = _stored_dmn_checkpoint(tmp_path / "m.ckpt")
    out = tmp_path / "cmp"
    assert main(["sample", "--ckpt", str(ckpt), "--compare", "--solver", "ddim", "--steps", "4", "--trajectory", "dmn",
                 "--seeds", "0,1", "--num-samples", "8", "--batch-size", "8", "--out", str(out), "--reference",
                 str(sampling_files["ref"]), "--cache-dir", str(tmp_path / "cache"), "--accelerator", "cpu",
                 "--no-progress"]) == 0
    (row,) = json.loads((out / "compare.json").read_text())["rows"]
    assert row["alpha_bar_base"] == pytest.approx(stored, rel=1e-12)  # the stored values, not a fresh DMN run
    assert row["alpha_bar_vrg"] == pytest.approx(vrg_version(torch.tensor(stored, dtype=torch.float64)).tolist())
