"""Moved to :mod:`vrg_lightning.evaluation` (features, statistics, FID); this shim keeps old imports working."""

from .evaluation.features import (
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
from .evaluation.fid import (
    FeatureStats,
    FIDResult,
    default_cache_dir,
    feature_stats,
    fid_from_stats,
    fid_of,
    frechet_distance,
    reduce_feature_stats,
    reference_key,
    reference_stats,
)

__all__ = ["DIGITS_ASSET", "FEATURES", "INCEPTION_WEIGHTS_URL", "DigitsClassifier", "DigitsFeatures",
           "FeatureExtractor", "InceptionFeatures", "ModuleFeatures", "PixelFeatures", "build_features",
           "default_features", "hash_state_dict", "FeatureStats", "FIDResult", "default_cache_dir", "feature_stats",
           "fid_from_stats", "fid_of", "frechet_distance", "reduce_feature_stats", "reference_key", "reference_stats"]
