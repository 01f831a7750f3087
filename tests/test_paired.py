"""The one paired evaluator (FIDEvaluator, paired_compare): the same FIDs as sampling and scoring directly, a cache
keyed by model, features, solver, trajectory, seed, images and guidance, and cached evaluations that sample nothing."""

from __future__ import annotations

import copy
import json
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from helpers import vrg_version

import vrg_lightning.sampling
from vrg_lightning.checkpoint import load_denoiser
from vrg_lightning.evaluation import (
    CompareRow,
    FIDEvaluator,
    build_features,
    feature_stats,
    fid_of,
    paired_compare,
    trajectory_key,
)
from vrg_lightning.sampling import generate
from vrg_lightning.trajectories import make_trajectory

N = 8  # images per FID: enough for a finite 64-d FID with the tiny model, fast on a CPU


@pytest.fixture(scope="module")
def setup(sampling_files: dict[str, Path]) -> dict:
    den, _ = load_denoiser(sampling_files["ckpt"])
    den.eval()
    ext = build_features("digits")
    ref = feature_stats(torch.load(sampling_files["ref"], weights_only=True), ext)
    base = make_trajectory(den.schedule, "time_uniform", 4)
    return {"den": den, "ext": ext, "ref": ref, "base": base, "vrg": vrg_version(base)}


def _no_sampling(*args, **kwargs):
    raise AssertionError("a cached evaluation must not sample")


def test_compare_row_fields_are_unchanged() -> None:
    assert [f.name for f in fields(CompareRow)] == [
        "solver", "steps", "base", "features", "seeds", "fid_base", "fid_vrg", "difference", "cpe_base", "cpe_vrg",
        "objective", "alpha_bar_base", "alpha_bar_vrg", "entry", "num_samples"]


def test_paired_compare_gives_the_fids_of_sampling_and_scoring_directly(setup: dict, tmp_path: Path) -> None:
    s = setup
    row = paired_compare(s["den"], "ddim", s["base"], s["vrg"], extractor=s["ext"], reference=s["ref"], seeds=(0, 1),
                         num_samples=N, base="time_uniform", cache_dir=tmp_path)
    for i, seed in enumerate((0, 1)):
        for fids, ab in ((row.fid_base, s["base"]), (row.fid_vrg, s["vrg"])):
            direct = fid_of(generate(s["den"], ab, "ddim", N, seed), s["ext"], s["ref"]).value
            assert fids[i] == pytest.approx(direct, rel=1e-9)
    assert row.fid_base[0] != row.fid_vrg[0] and row.fid_base[0] != row.fid_base[1]  # trajectories and seeds differ
    d = row.difference
    assert d["mean"] == pytest.approx(sum(v - b for b, v in zip(row.fid_base, row.fid_vrg, strict=True)) / 2)
    assert row.steps == 4 and row.num_samples == N and row.features == "digits-classifier"
    json.dumps(row.to_dict())
    assert len(list(tmp_path.glob("*.pt"))) == 4  # one statistics file per (trajectory, seed)


def test_cache_key_follows_model_trajectory_and_settings(setup: dict, tmp_path: Path) -> None:
    s = setup
    ev = FIDEvaluator(s["den"], s["ext"], s["ref"], N, cache_dir=tmp_path)
    k = ev.key("ddim", s["base"], 0)
    assert ev.key("ddim", tuple(s["base"].tolist()), 0) == k  # a tensor and its values are the same trajectory
    other = {ev.key("ddim", s["vrg"], 0), ev.key("dpmpp_2m", s["base"], 0), ev.key("ddim", s["base"], 1),
             FIDEvaluator(s["den"], s["ext"], s["ref"], N + 1).key("ddim", s["base"], 0),
             FIDEvaluator(s["den"], s["ext"], s["ref"], N, guidance_scale=2.0).key("ddim", s["base"], 0)}
    changed = copy.deepcopy(s["den"])
    with torch.no_grad():
        next(changed.parameters()).add_(1e-3)  # one weight moves: another model
    other.add(FIDEvaluator(changed, s["ext"], s["ref"], N).key("ddim", s["base"], 0))
    pixels = build_features("pixels", image_shape=(1, 16, 16))
    ref_px = feature_stats(generate(s["den"], s["base"], "ddim", 4, 9), pixels)
    other.add(FIDEvaluator(s["den"], pixels, ref_px, N).key("ddim", s["base"], 0))
    assert k not in other and len(other) == 7
    assert trajectory_key(s["base"]) in k


def test_cached_evaluation_returns_the_same_fid_without_sampling(setup: dict, tmp_path: Path, monkeypatch) -> None:
    s = setup
    first = FIDEvaluator(s["den"], s["ext"], s["ref"], N, cache_dir=tmp_path)
    fid = first.fid("ddim", s["vrg"], 3)
    assert first.sampled_images == N and first.nfe == N * 4
    monkeypatch.setattr(vrg_lightning.sampling, "generate", _no_sampling)
    again = FIDEvaluator(s["den"], s["ext"], s["ref"], N, cache_dir=tmp_path)  # a new run, same cache folder
    assert again.fid("ddim", s["vrg"], 3) == fid and again.sampled_images == 0
    row = paired_compare(s["den"], "ddim", s["vrg"], s["vrg"], extractor=s["ext"], reference=s["ref"], seeds=(3,),
                         num_samples=N, cache_dir=tmp_path)
    assert row.fid_base == row.fid_vrg == (fid,)
    # the same cache folder with other weights or another trajectory must sample again (the old compare cache did not)
    changed = copy.deepcopy(s["den"])
    with torch.no_grad():
        next(changed.parameters()).add_(1e-3)
    for ev, ab in ((FIDEvaluator(changed, s["ext"], s["ref"], N, cache_dir=tmp_path), s["vrg"]),
                   (FIDEvaluator(s["den"], s["ext"], s["ref"], N, cache_dir=tmp_path), s["base"])):
        with pytest.raises(AssertionError, match="must not sample"):
            ev.fid("ddim", ab, 3)


def test_evaluator_checks_its_inputs(setup: dict, tmp_path: Path) -> None:
    s = setup
    with pytest.raises(ValueError, match="num_samples must be an integer >= 2; got 1"):
        FIDEvaluator(s["den"], s["ext"], s["ref"], 1)
    with pytest.raises(ValueError, match="cannot be compared"):
        FIDEvaluator(s["den"], build_features("pixels", image_shape=(1, 16, 16)), s["ref"], N)
    with pytest.raises(ValueError, match="seeds must hold at least one seed"):
        paired_compare(s["den"], "ddim", s["base"], s["vrg"], extractor=s["ext"], reference=s["ref"], seeds=())
