"""95% accuracy intervals (pure functions)."""

import math

import pytest

from deftlab.scoring.intervals import (accuracy_interval, difference_interval, mean_interval, newcombe_difference,
                                      paired_ratio_difference, wilson)


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


@pytest.mark.parametrize("counts, expected", [
    # Newcombe (1998), Statistics in Medicine 17:873-890, Table II, method 10 (hybrid score)
    ((56, 70, 48, 80), (0.0524, 0.3339)),
    ((9, 10, 3, 10), (0.1705, 0.8090)),
    ((5, 56, 0, 29), (-0.0381, 0.1926)),
])
def test_newcombe_difference_matches_the_published_values(counts, expected):
    lo, hi = newcombe_difference(*counts)
    assert (round(lo, 4), round(hi, 4)) == expected


def test_difference_interval_pools_equal_sets_and_needs_the_same_sets():
    a = {"acc_gsm8k": 0.5, "n_gsm8k": 50, "acc_svamp": 0.1, "n_svamp": 50}
    b = {"acc_gsm8k": 0.2, "n_gsm8k": 50, "acc_svamp": 0.1, "n_svamp": 50}
    assert difference_interval(a, b, "acc_gsm8k") == pytest.approx(newcombe_difference(25, 50, 10, 50))
    assert difference_interval(a, b, "avg") == pytest.approx(newcombe_difference(30, 100, 15, 100))
    lo, hi = difference_interval(b, a, "acc_gsm8k")
    assert hi < 0  # 10/50 vs 25/50 differ at 95%
    assert difference_interval(a, {"acc_gsm8k": 0.2, "n_gsm8k": 50}, "avg") is None  # one set vs two
    assert difference_interval(a, {"acc_gsm8k": 0.2}, "acc_gsm8k") is None  # no size recorded
    c = {"acc_gsm8k": 0.5, "n_gsm8k": 100, "acc_svamp": 0.1, "n_svamp": 40}
    lo, hi = difference_interval(c, c, "avg")  # unequal sets: normal approximation, centred on 0
    assert lo == pytest.approx(-hi) and hi > 0


def test_paired_ratio_difference_is_exact_for_a_constant_per_token_shift():
    w = [3, 10, 7, 1]
    b = [2.0 * t for t in w]
    assert paired_ratio_difference(b, b, w) == (0.0, 0.0, 0.0)
    d, lo, hi = paired_ratio_difference([x + 0.25 * t for x, t in zip(b, w)], b, w)
    assert (d, lo, hi) == pytest.approx((0.25, 0.25, 0.25))
    assert paired_ratio_difference([1.0], [2.0], [1]) is None
    with pytest.raises(ValueError):
        paired_ratio_difference([1.0, 2.0], [1.0], [1, 1])


def test_paired_ratio_difference_matches_a_bootstrap_over_items():
    import random

    rng = random.Random(0)
    n = 200
    w = [rng.randint(5, 120) for _ in range(n)]
    hard = [rng.uniform(0.5, 3.0) for _ in range(n)]  # shared per-item difficulty: what pairing removes
    a = [t * (h + rng.gauss(0.1, 0.3)) for t, h in zip(w, hard)]
    b = [t * (h + rng.gauss(0.0, 0.3)) for t, h in zip(w, hard)]
    d, lo, hi = paired_ratio_difference(a, b, w)
    assert d == pytest.approx((sum(a) - sum(b)) / sum(w))
    boots = []
    for _ in range(4000):
        idx = [rng.randrange(n) for _ in range(n)]
        boots.append((sum(a[i] for i in idx) - sum(b[i] for i in idx)) / sum(w[i] for i in idx))
    mean = sum(boots) / len(boots)
    sd = math.sqrt(sum((x - mean) ** 2 for x in boots) / (len(boots) - 1))
    assert (hi - lo) / 2 == pytest.approx(1.959963984540054 * sd, rel=0.1)
    # taken as independent runs (each run's own item-to-item spread added) the interval would be far wider

    def spread(x):
        r = sum(x) / sum(w)
        return sum((v - r * t) ** 2 for v, t in zip(x, w)) * n / (n - 1) / sum(w) ** 2

    assert math.sqrt(spread(a) + spread(b)) > 2 * sd
