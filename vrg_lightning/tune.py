"""Moved to :mod:`vrg_lightning.evaluation.tune` (and the paired evaluator to :mod:`vrg_lightning.evaluation.paired`);
this shim keeps old imports working."""

from .evaluation.features import default_features
from .evaluation.paired import FIDEvaluator
from .evaluation.stats import median
from .evaluation.tune import (
    PIN_CHOICES,
    Candidate,
    TuneSettings,
    make_candidates,
    measure_curvature,
    reference_for,
    tune_cell,
    tune_checkpoint,
    tune_vrg,
)

__all__ = ["PIN_CHOICES", "TuneSettings", "Candidate", "FIDEvaluator", "make_candidates", "tune_cell", "tune_vrg",
           "measure_curvature", "tune_checkpoint", "reference_for", "default_features", "median"]
