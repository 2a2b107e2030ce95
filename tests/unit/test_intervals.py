"""95% accuracy intervals (pure functions)."""

import math

import pytest

from deftlab.scoring.intervals import accuracy_interval, mean_interval, wilson


def test_wilson_matches_the_textbook_values():
    lo, hi = wilson(25, 50)  # 50% of 50 problems: about ±13 points
    assert (round(lo, 4), round(hi, 4)) == (0.3664, 0.6336)
    assert wilson(0, 50)[0] == 0.0 and 0 < wilson(0, 50)[1] < 0.08
    assert wilson(50, 50)[1] == 1.0
    assert wilson(0, 0) == (0.0, 1.0)


def test_mean_interval_pools_equal_sets_and_approximates_unequal_ones():
    assert mean_interval([0.04, 0.0, 0.04, 0.02, 0.02], [50] * 5) == pytest.approx(wilson(6, 250))
    lo, hi = mean_interval([0.5, 0.5], [100, 400])
    se = math.sqrt((0.25 / 100 + 0.25 / 400) / 4)
    assert (lo, hi) == pytest.approx((0.5 - 1.959963984540054 * se, 0.5 + 1.959963984540054 * se))


def test_accuracy_interval_reads_a_runs_metrics():
    m = {"acc_gsm8k": 0.5, "n_gsm8k": 50, "acc_svamp": 0.1, "n_svamp": 50, "acc_gsm8k_non_overlap": 0.4}
    assert accuracy_interval(m, "acc_gsm8k") == wilson(25, 50)
    assert accuracy_interval(m, "avg") == pytest.approx(wilson(30, 100))
    assert accuracy_interval(m, "acc_addsub") is None and accuracy_interval(m, "ppl_wikitext2") is None
