"""Moved to :mod:`vrg_lightning.evaluation` (features, statistics, FID); kept for old imports."""

from .evaluation.features import *  # noqa: F401,F403
from .evaluation.fid import *  # noqa: F401,F403
