"""Moved to :mod:`vrg_lightning.evaluation.stats`; kept for old imports."""

from .evaluation.stats import *  # noqa: F401,F403
