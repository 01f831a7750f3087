import math

import numpy as np
import pytest
from scipy import stats

from vrg_lightning.evaluation import median, paired_difference, spearman


def test_paired_interval_matches_scipy_ttest() -> None:
    rng = np.random.default_rng(0)
    base = rng.normal(20, 2, size=6)
    cand = base - 0.5 + rng.normal(0, 0.1, size=6)
    d = paired_difference(base.tolist(), cand.tolist())
    ci = stats.ttest_rel(cand, base).confidence_interval(0.95)
    assert d.mean == pytest.approx(float(np.mean(cand - base)))
    assert (d.ci_low, d.ci_high) == pytest.approx((ci.low, ci.high))
    assert d.significant_improvement


def test_no_improvement_when_interval_straddles_zero() -> None:
    d = paired_difference([10, 10, 10], [9, 11, 10.5])
    assert d.ci_low < 0 < d.ci_high and not d.significant_improvement


def test_single_seed_gives_infinite_interval() -> None:
    d = paired_difference([10.0], [5.0])
    assert math.isinf(d.ci_high) and not d.significant_improvement


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="equally long"):
        paired_difference([1, 2], [1])
    with pytest.raises(ValueError, match="confidence"):
        paired_difference([1, 2], [1, 2], confidence=1.5)


def test_spearman_monotone() -> None:
    r, _ = spearman([1, 2, 3, 4], [10, 20, 25, 100])
    assert r == pytest.approx(1.0)
    assert math.isnan(spearman([1, 2], [2, 1])[0])


def test_median_and_the_old_import_path() -> None:
    from vrg_lightning import stats

    assert median([5.0, 1.0, 3.0]) == 3.0 and median([4.0, 1.0, 3.0, 2.0]) == 2.5 and math.isnan(median([]))
    assert stats.paired_difference is paired_difference
