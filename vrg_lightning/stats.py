"""Moved to :mod:`vrg_lightning.evaluation.stats`; this shim keeps old imports working."""

from .evaluation.stats import PairedDifference, median, paired_difference, spearman

__all__ = ["PairedDifference", "median", "paired_difference", "spearman"]
