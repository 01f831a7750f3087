"""The top-level API: small, lazy (no Lightning or diffusers at import), every listed name resolves."""

from __future__ import annotations

import subprocess
import sys

import vrg_lightning


def test_import_loads_neither_lightning_nor_diffusers_and_names_resolve() -> None:
    code = ("import sys, vrg_lightning as v; heavy = [m for m in ('lightning', 'diffusers', 'torchmetrics', "
            "'matplotlib') if m in sys.modules]; print(heavy); v.NoiseSchedule; print(sorted(set(heavy) | "
            "{m for m in ('lightning', 'diffusers') if m in sys.modules}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "[]" and out[1] == "[]", out  # NoiseSchedule does not pull them in either
    for name in vrg_lightning.__all__:
        assert getattr(vrg_lightning, name) is not None, name
    assert 12 <= len(vrg_lightning.__all__) <= 20
    assert vrg_lightning.VRGProfiler.__module__ == "vrg_lightning.callbacks"


def test_unknown_name_is_an_attribute_error() -> None:
    try:
        vrg_lightning.no_such_name  # noqa: B018
    except AttributeError as exc:
        assert "no_such_name" in str(exc)
    else:
        raise AssertionError("expected AttributeError")


def test_moved_modules_keep_their_old_names() -> None:
    from vrg_lightning import discretization, evaluation, metrics, sampling, stats, tune
    from vrg_lightning.optimize import discretization as new_disc

    assert metrics.feature_stats is evaluation.feature_stats and metrics.FeatureStats is evaluation.FeatureStats
    assert tune.TuneSettings is evaluation.TuneSettings and tune.FIDEvaluator is evaluation.FIDEvaluator
    assert stats.paired_difference is evaluation.paired_difference
    assert discretization.optimize_disc is new_disc.optimize_disc
    assert sampling.paired_compare is evaluation.paired_compare
    assert sampling.save_grid.__module__ == "vrg_lightning.report"
    assert sampling.select_vrg_entry is vrg_lightning.select_entry
