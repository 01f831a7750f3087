"""Stored trajectory entries: compute_entries is direct optimisation, entry for entry; the paper objective is
optimised once for all solvers; one cache-key rule; the entry's keys and their order."""

from __future__ import annotations

import pytest
import torch

from vrg_lightning.optimize import (
    RESULT_KEYS,
    OptimizeSettings,
    TrajectoryGrid,
    cache_key,
    compute_entries,
    make_entry,
    optimize_cached,
    optimize_trajectory,
    result_fields,
    settings_fields,
)
from vrg_lightning.optimize import entries as entries_module
from vrg_lightning.profile import ErrorProfile
from vrg_lightning.schedule import NoiseSchedule
from vrg_lightning.trajectories import make_trajectory

SCHED = NoiseSchedule()
# the keys of a stored entry (checkpoint["vrg"]["entries"]), in order, as the callback wrote them before the redesign
ENTRY_KEYS = ["solver", "steps", "base", "objective", "lp", "reg_lambda", "trust", "pin_start", "mse_mode",
              "alpha_bar", "base_alpha_bar", "cpe_before", "cpe_after", "loss_before", "loss", "seconds", "iterations",
              "evaluations", "profile_source", "validated"]


@pytest.fixture(scope="module")
def profile() -> ErrorProfile:
    ab = SCHED.alphas_cumprod[::40]
    return ErrorProfile.from_table(ab, 0.02 + 0.3 * (1 - ab) * ab + 0.01 * torch.sin(20 * ab) ** 2, source="table:t")


GRID = TrajectoryGrid(solvers=("ddim", "dpmpp_2m"), steps=(4,), bases=("time_uniform", "logSNR"), lps=(0.05,),
                      objectives=("paper", "solver"), mse_mode="paper")


def test_entries_equal_direct_optimisation(profile: ErrorProfile) -> None:
    entries = compute_entries(profile, SCHED, GRID)
    assert [(e["solver"], e["steps"], e["base"], e["objective"], e["lp"]) for e in entries] == list(
        GRID.combinations())
    mse = profile.mse_function(GRID.mse_mode)
    for e in entries:
        assert list(e) == ENTRY_KEYS
        base = make_trajectory(SCHED, e["base"], e["steps"])
        r = optimize_trajectory(base, mse, GRID.settings(e["solver"], e["lp"], e["objective"]))
        assert e["alpha_bar"] == r.alpha_bar.tolist() and e["base_alpha_bar"] == base.tolist()
        assert (e["cpe_before"], e["cpe_after"], e["loss"]) == (r.cpe_before, r.cpe_after, r.loss)
        assert e["profile_source"] == "table:t" and e["validated"] is None
        assert (e["reg_lambda"], e["trust"], e["pin_start"], e["mse_mode"]) == (100.0, "alpha", False, "paper")
    solver_aware = {e["solver"]: e["cpe_before"] for e in entries if e["objective"] == "solver"
                    and e["base"] == "time_uniform"}
    assert solver_aware["ddim"] != solver_aware["dpmpp_2m"]  # the solver objective is per solver


def test_paper_objective_is_optimised_once(profile: ErrorProfile, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[OptimizeSettings] = []

    def counting(ab, mse, s):
        calls.append(s)
        return optimize_trajectory(ab, mse, s)

    monkeypatch.setattr(entries_module, "optimize_trajectory", counting)
    entries = compute_entries(profile, SCHED, GRID)
    # 2 bases x (paper once + solver for each of 2 solvers) = 6 optimisations for 8 entries
    assert len(entries) == 8 and len(calls) == 6
    assert sum(s.objective == "paper" for s in calls) == 2
    paper = [e for e in entries if e["objective"] == "paper" and e["base"] == "logSNR"]
    assert [e["solver"] for e in paper] == ["ddim", "dpmpp_2m"] and paper[0]["alpha_bar"] == paper[1]["alpha_bar"]
    assert paper[0]["seconds"] == paper[1]["seconds"]  # the same result, recorded twice


def test_cache_key_rule() -> None:
    ab = make_trajectory(SCHED, "logSNR", 5)
    paper = [OptimizeSettings(solver=s) for s in ("ddim", "dpmpp_2m")]
    solver = [OptimizeSettings(objective="solver", solver=s) for s in ("ddim", "dpmpp_2m")]
    assert cache_key(ab, paper[0]) == cache_key(ab.tolist(), paper[1])  # paper: solver-independent
    assert cache_key(ab, solver[0]) != cache_key(ab, solver[1])
    assert cache_key(ab, paper[0]) != cache_key(ab * 0.999, paper[0])  # keyed by the trajectory's values
    assert cache_key(ab, paper[0]) != cache_key(ab, OptimizeSettings(lp=0.02))
    assert cache_key(ab, paper[0]) != cache_key(ab, paper[0], "disc")
    mse = lambda a: 0.1 + a  # noqa: E731
    cache: dict = {}
    r = optimize_cached(ab, mse, paper[0], cache)
    assert optimize_cached(ab.clone(), mse, paper[1], cache) is r and len(cache) == 1
    assert optimize_cached(ab, mse, solver[1], cache) is not r and len(cache) == 2


def test_entry_pieces() -> None:
    s = OptimizeSettings(lp=0.1, reg_lambda=1e4, trust="logsnr", pin_start=True, mse_mode="paper")
    assert settings_fields(s) == {"objective": "paper", "lp": 0.1, "reg_lambda": 1e4, "trust": "logsnr",
                                  "pin_start": True, "mse_mode": "paper"}
    assert settings_fields(s, objective="solver")["objective"] == "solver"
    with pytest.raises(ValueError, match="unknown field.*solver; allowed: objective"):
        settings_fields(s, solver="ddim")
    r = optimize_trajectory(make_trajectory(SCHED, "logSNR", 3), lambda a: 0.1 + a, s)
    assert list(result_fields(r)) == list(RESULT_KEYS) and result_fields(r)["alpha_bar"] == r.alpha_bar.tolist()
    assert result_fields({"loss": 1.0}, ("loss", "disc_after")) == {"loss": 1.0, "disc_after": None}
    e = make_entry("ddim", 3, "logSNR", {"objective": "base", "kind": "base"}, {"alpha_bar": [0.5]},
                   profile_source="p", validated={"selected": False})
    assert list(e) == ["solver", "steps", "base", "objective", "kind", "alpha_bar", "profile_source", "validated"]
    assert e["validated"] == {"selected": False}


def test_bad_grid(profile: ErrorProfile) -> None:
    with pytest.raises(ValueError, match="grid must be a TrajectoryGrid; got dict"):
        compute_entries(profile, SCHED, {"steps": [4]})  # type: ignore[arg-type]
