"""Moved to :mod:`vrg_lightning.evaluation.tune` (the paired evaluator to :mod:`vrg_lightning.evaluation.paired`);
kept for old imports."""

from .evaluation.features import default_features  # noqa: F401
from .evaluation.paired import FIDEvaluator  # noqa: F401
from .evaluation.stats import median  # noqa: F401
from .evaluation.tune import *  # noqa: F401,F403
