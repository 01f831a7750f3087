"""Fixtures shared by the test modules (the objects behind them live in ``helpers.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import REF, make_checkpoint, make_reference


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """The published VRG reference data; the test is skipped where it is not present."""
    if not (REF / "MSE_vs_alpha_bar_cifar10.txt").is_file():
        pytest.skip("reference data not present (set VRG_REFERENCE_DIR)")
    return REF


@pytest.fixture(scope="session")
def sampling_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny unconditional and a class-conditional checkpoint with a profile and entries, 64 real digits as an
    FID reference, and a cache folder (shared by the sampling, export and tuning tests)."""
    d = tmp_path_factory.mktemp("sampling")
    return {"ckpt": make_checkpoint(d / "model.ckpt"), "cond": make_checkpoint(d / "cond.ckpt", num_classes=3),
            "ref": make_reference(d / "reference.pt"), "cache": d / "cache"}
