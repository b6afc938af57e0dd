"""megareweight.stats: paired t-intervals and verdicts (used by the demo and the experiments)."""
from __future__ import annotations

import math

import pytest
from scipy import stats as scipy_stats

from megareweight.stats import mean_ci, mean_ci_bands, paired_diff, t_quantile


def test_paired_diff_matches_a_hand_computed_t_interval():
    a = [1.0, 2.0, 3.0, 4.0]
    b = [1.5, 2.4, 3.7, 4.4]  # differences 0.5, 0.4, 0.7, 0.4
    d = paired_diff(a, b)
    diffs = [0.5, 0.4, 0.7, 0.4]
    mean = sum(diffs) / 4
    sd = math.sqrt(sum((x - mean) ** 2 for x in diffs) / 3)
    half = 3.182446305284263 * sd / 2  # t_{0.975, 3}
    assert d.n == 4 and d.mean == pytest.approx(mean) and d.sd == pytest.approx(sd)
    assert (d.low, d.high) == (pytest.approx(mean - half), pytest.approx(mean + half))
    assert d.excludes_zero and d.verdict(a="uniform", b="linupper") == "uniform better"
    # the same interval as scipy's one-sample t-test on the differences
    ci = scipy_stats.ttest_1samp(diffs, 0.0).confidence_interval(0.95)
    assert (d.low, d.high) == (pytest.approx(ci.low), pytest.approx(ci.high))


def test_verdicts_and_edge_cases():
    assert paired_diff([1.0, 2.0, 3.0], [0.9, 1.8, 2.85]).verdict(a="u", b="l") == "l better"
    covers = paired_diff([1.0, 2.0, 3.0], [1.1, 1.9, 3.05])
    assert not covers.excludes_zero and covers.verdict() == "inconclusive"
    one = paired_diff([1.0], [0.5])
    assert one.n == 1 and math.isnan(one.low) and one.verdict() == "inconclusive"
    assert "no interval" in one.format()
    assert paired_diff([1.0, 1.0, 1.0], [0.5, 0.6, 0.55]).verdict(lower_is_better=False, a="u", b="l") == "u better"
    with pytest.raises(ValueError, match="equal length"):
        paired_diff([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="at least 2"):
        t_quantile(1)


def test_mean_ci_and_bands():
    mean, low, high = mean_ci([2.0, 4.0])
    assert mean == 3.0 and high - mean == pytest.approx(12.706204736174707) and mean - low == pytest.approx(12.706204736174707)
    m, lo, hi = mean_ci_bands([[1.0, 2.0], [3.0, 2.0]])
    assert list(m) == [2.0, 2.0] and lo[1] == hi[1] == 2.0 and lo[0] < 1.0 < 3.0 < hi[0]
