"""The one settings source: TrajectoryGrid validation and round trip, and the CLI flags derived from it."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from vrg_lightning import OptimizeSettings, TrajectoryGrid, VRGProfiler
from vrg_lightning.commands._args import add_grid_arguments, grid_from_args, parse_list
from vrg_lightning.optimize import grid_fields

OLD_OPTIMIZE_KEYS = ["solvers", "steps", "bases", "lps", "objectives", "reg_lambda", "trust", "mse_mode", "pin_start"]


def test_grid_validates_once_round_trips_and_keeps_the_stored_keys() -> None:
    g = TrajectoryGrid(solvers=["ddim", "dpmpp_2m"], steps=[10], bases=["logSNR"], lps=[0.01, 0.1], reg_lambda=10)
    assert list(g.to_dict()) == OLD_OPTIMIZE_KEYS  # vrg.profiler.optimize keeps its format
    assert TrajectoryGrid.from_dict(g.to_dict()) == g
    assert TrajectoryGrid.from_dict({"lps": None, "unknown": 1}) == TrajectoryGrid()
    assert [c[0] for c in g.combinations()] == ["ddim", "ddim", "dpmpp_2m", "dpmpp_2m"]
    st = g.settings("dpmpp_2m", 0.1, "solver")
    assert st == OptimizeSettings(lp=0.1, reg_lambda=10.0, objective="solver", solver="dpmpp_2m")
    for kw, match in (({"solvers": ["euler"]}, "solvers.*'euler' unknown"), ({"bases": []}, "bases"),
                      ({"steps": [0]}, "steps"), ({"lps": [1.5]}, "lp"), ({"trust": "box"}, "trust"),
                      ({"reg_lambda": -1}, "reg_lambda"), ({"objectives": ["disc"]}, "objectives")):
        with pytest.raises(ValueError, match=match):
            TrajectoryGrid(**kw)
    with pytest.raises(dataclasses.FrozenInstanceError):
        g.lps = (0.3,)  # type: ignore[misc]


def test_every_grid_field_is_a_flag_with_the_dataclass_default_and_both_list_forms() -> None:
    p = argparse.ArgumentParser()
    add_grid_arguments(p)
    flags = {a.dest: a for a in p._actions}
    for f in grid_fields():  # a field added to the dataclass appears in the CLI without further code
        assert f.name in flags and flags[f.name].default == getattr(TrajectoryGrid(), f.name)
        if f.metadata.get("choices"):
            assert tuple(f.metadata["choices"]) == tuple(flags[f.name].choices or flags[f.name].allowed)
    assert grid_from_args(p.parse_args([])) == TrajectoryGrid()
    comma = grid_from_args(p.parse_args(["--lps", "0.1,0.3", "--steps", "10,20", "--pin-start"]))
    space = grid_from_args(p.parse_args(["--lps", "0.1", "0.3", "--steps", "10", "20", "--pin-start"]))
    assert comma == space == TrajectoryGrid(lps=(0.1, 0.3), steps=(10, 20), pin_start=True)
    assert grid_from_args(p.parse_args(["--steps"])).steps == ()  # profile only
    with pytest.raises(SystemExit):
        p.parse_args(["--solvers", "ddim,euler"])
    assert parse_list("a, b,,c", str, "--x") == ("a", "b", "c")
    with pytest.raises(ValueError, match="--steps must be a comma list of int"):
        parse_list("10,x", int, "--steps")


def test_callback_stores_its_grid_and_defaults_come_from_the_dataclass() -> None:
    assert VRGProfiler().grid == TrajectoryGrid()
    cb = VRGProfiler(solvers=["dpmpp_2m"], lps=[0.1], reg_lambda=1e4)
    assert cb.grid == TrajectoryGrid(solvers=("dpmpp_2m",), lps=(0.1,), reg_lambda=1e4)


def test_optimize_settings_alpha_bar_range_round_trips_and_is_no_grid_field() -> None:
    """The schedule's trained range belongs to one optimisation (the grid is schedule-free): stored as a list,
    read back as a tuple, validated with the value in the message."""
    import json

    s = OptimizeSettings(alpha_bar_range=[4e-5, 0.9999])
    assert s.alpha_bar_range == (4e-5, 0.9999) and s.to_dict()["alpha_bar_range"] == [4e-5, 0.9999]
    assert OptimizeSettings.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    assert OptimizeSettings().alpha_bar_range is None and "alpha_bar_range" not in TrajectoryGrid().to_dict()
    with pytest.raises(ValueError, match=r"alpha_bar_range .* got \(0.9, 0.1\)"):
        OptimizeSettings(alpha_bar_range=(0.9, 0.1))
