"""Evaluation: FID features (:mod:`.features`), feature statistics and FID (:mod:`.fid`), the one paired evaluator
and compare mode (:mod:`.paired`), statistics over seeds (:mod:`.stats`) and validated tuning (:mod:`.tune`).

Importing it loads torch and scipy, not Lightning or diffusers (generation is imported when an evaluation samples).
"""

from .features import (
    DIGITS_ASSET,
    FEATURES,
    INCEPTION_WEIGHTS_URL,
    DigitsClassifier,
    DigitsFeatures,
    FeatureExtractor,
    InceptionFeatures,
    ModuleFeatures,
    PixelFeatures,
    build_features,
    default_features,
    hash_state_dict,
)
from .fid import (
    FeatureStats,
    FIDResult,
    check_stats,
    default_cache_dir,
    feature_stats,
    fid_from_stats,
    fid_of,
    frechet_distance,
    reduce_feature_stats,
    reference_key,
    reference_stats,
)
from .paired import CompareRow, FIDEvaluator, model_key, paired_compare, trajectory_key
from .stats import PairedDifference, median, paired_difference, spearman
from .tune import (
    PIN_CHOICES,
    RANK_CHOICES,
    TUNE_GRID,
    Candidate,
    TuneSettings,
    checkpoint_settings,
    make_candidates,
    measure_curvature,
    reference_for,
    tune_cell,
    tune_checkpoint,
    tune_vrg,
)

__all__ = [
    "DIGITS_ASSET", "FEATURES", "INCEPTION_WEIGHTS_URL", "DigitsClassifier", "DigitsFeatures", "FeatureExtractor",
    "InceptionFeatures", "ModuleFeatures", "PixelFeatures", "build_features", "default_features", "hash_state_dict",
    "FeatureStats", "FIDResult", "check_stats", "default_cache_dir", "feature_stats", "fid_from_stats", "fid_of",
    "frechet_distance", "reduce_feature_stats", "reference_key", "reference_stats",
    "CompareRow", "FIDEvaluator", "model_key", "paired_compare", "trajectory_key",
    "PairedDifference", "median", "paired_difference", "spearman",
    "PIN_CHOICES", "RANK_CHOICES", "TUNE_GRID", "Candidate", "TuneSettings", "checkpoint_settings",
    "make_candidates", "measure_curvature", "reference_for", "tune_cell", "tune_checkpoint", "tune_vrg",
]
