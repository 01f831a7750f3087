"""Small statistics helpers for paired comparisons over seeds (used by compare mode and tuning)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from scipy import stats as _st

__all__ = ["PairedDifference", "paired_difference", "spearman", "median"]


@dataclass(frozen=True)
class PairedDifference:
    """Mean of ``candidate - base`` over paired seeds, with a two-sided Student-t confidence interval.

    ``relative`` is the mean difference divided by the mean of ``base``. With one seed the interval is
    infinite (no evidence of a difference).
    """

    mean: float
    ci_low: float
    ci_high: float
    relative: float
    n: int
    confidence: float

    @property
    def significant_improvement(self) -> bool:
        """True when the whole interval lies below zero (the candidate's metric is lower)."""
        return self.ci_high < 0

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def paired_difference(
    base: Sequence[float], candidate: Sequence[float], confidence: float = 0.95
) -> PairedDifference:
    """Paired difference ``candidate - base`` (same seeds, same initial noise).

    Example:
        >>> d = paired_difference([10.0, 11.0, 12.0], [9.0, 10.2, 11.1])
        >>> round(d.mean, 3), d.significant_improvement
        (-0.9, True)
    """
    if len(base) != len(candidate) or len(base) == 0:
        raise ValueError(
            f"paired_difference needs equally long, non-empty lists; got {len(base)} and {len(candidate)}."
        )
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1); got {confidence!r}.")
    diffs = [float(c) - float(b) for b, c in zip(base, candidate, strict=True)]
    n = len(diffs)
    mean = sum(diffs) / n
    if n > 1:
        sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
        half = float(_st.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    else:
        half = math.inf
    base_mean = sum(float(b) for b in base) / n
    rel = mean / base_mean if base_mean != 0 else math.nan
    return PairedDifference(mean, mean - half, mean + half, rel, n, confidence)


def spearman(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """Spearman rank correlation and its p-value (NaN when fewer than 3 pairs)."""
    if len(x) != len(y):
        raise ValueError(f"spearman needs equally long lists; got {len(x)} and {len(y)}.")
    if len(x) < 3:
        return math.nan, math.nan
    r = _st.spearmanr(x, y)
    return float(r.statistic), float(r.pvalue)


def median(values: Sequence[float]) -> float:
    """Median (NaN for none).

    Example:
        >>> median([3.0, 1.0, 2.0, 10.0]), median([])
        (2.5, nan)
    """
    v = sorted(values)
    if not v:
        return math.nan
    m = len(v) // 2
    return v[m] if len(v) % 2 else 0.5 * (v[m - 1] + v[m])
