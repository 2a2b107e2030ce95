"""95% intervals for accuracies: Wilson score for one test set, a normal approximation for a mean of sets.

At 50 problems per set an accuracy near 50% carries about ±13 points, so tables print the interval beside every
accuracy and mark where the paper's number lies outside it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

Z95 = 1.959963984540054


def wilson(correct: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion correct/n (as fractions); (0, 1) when n is 0."""
    if n <= 0:
        return 0.0, 1.0
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if correct <= 0 else max(0.0, centre - half)  # exact ends: no 1e-18 left by rounding
    hi = 1.0 if correct >= n else min(1.0, centre + half)
    return lo, hi


def mean_interval(props: Sequence[float], ns: Sequence[int], z: float = Z95) -> tuple[float, float]:
    """Interval of the unweighted mean of several sets' proportions (DeFT's Avg.).

    Equal set sizes: the Wilson interval of the pooled count (the mean is then the pooled proportion). Otherwise a
    normal approximation with variance Σ p_i(1-p_i)/n_i / k², clipped to [0, 1].
    """
    if len(props) != len(ns) or not props:
        raise ValueError("need one size per proportion")
    if len(set(ns)) == 1:
        return wilson(sum(p * ns[0] for p in props), ns[0] * len(props), z)
    k = len(props)
    mean = sum(props) / k
    se = math.sqrt(sum(p * (1 - p) / n for p, n in zip(props, ns)) / (k * k))
    return max(0.0, mean - z * se), min(1.0, mean + z * se)


def accuracy_interval(metrics: Mapping[str, object], metric: str) -> tuple[float, float] | None:
    """The interval of `acc_<set>` (from n_<set>) or of `avg` (over every acc_<set> with an n_<set>) in a run's
    flat metrics, as fractions; None when the sizes are not recorded."""
    if metric.startswith("acc_"):
        n, p = metrics.get("n_" + metric[4:]), metrics.get(metric)
        if isinstance(n, int) and isinstance(p, (int, float)):
            return wilson(p * n, n)
        return None
    if metric == "avg":
        sets = [k[4:] for k, v in metrics.items() if k.startswith("acc_") and not k.endswith("_non_overlap")
                and isinstance(v, (int, float)) and isinstance(metrics.get("n_" + k[4:]), int)]
        if not sets:
            return None
        return mean_interval([float(metrics["acc_" + s]) for s in sets], [int(metrics["n_" + s]) for s in sets])
    return None


def newcombe_difference(c1: float, n1: int, c2: float, n2: int, z: float = Z95) -> tuple[float, float]:
    """Newcombe's hybrid score interval (his method 10) of p1 − p2 for two independent proportions, from their
    Wilson intervals: it keeps the right coverage at 0 or n correct, where the Wald interval collapses."""
    p1, p2 = c1 / n1, c2 / n2
    l1, u1 = wilson(c1, n1, z)
    l2, u2 = wilson(c2, n2, z)
    d = p1 - p2
    return d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2), d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)


def _set_counts(metrics: Mapping[str, object], metric: str) -> list[tuple[float, int]] | None:
    """(proportion, n) of `acc_<set>`, or of every set behind `avg`; None when the sizes are not recorded."""
    if metric.startswith("acc_"):
        n, p = metrics.get("n_" + metric[4:]), metrics.get(metric)
        return [(float(p), n)] if isinstance(n, int) and isinstance(p, (int, float)) else None
    if metric == "avg":
        out = [(float(v), metrics["n_" + k[4:]]) for k, v in metrics.items()
               if k.startswith("acc_") and not k.endswith("_non_overlap") and isinstance(v, (int, float))
               and isinstance(metrics.get("n_" + k[4:]), int)]
        return sorted(out, key=lambda pn: pn[1]) or None
    return None


def difference_interval(a: Mapping[str, object], b: Mapping[str, object], metric: str,
                        z: float = Z95) -> tuple[float, float] | None:
    """95% interval of run a's minus run b's `acc_<set>` or `avg` (fractions), the runs taken as independent.

    One set, or an Avg. over equal-sized sets: Newcombe's interval on the (pooled) counts. Otherwise a normal
    approximation with the two means' variances added. None when either run lacks the sizes, or the runs
    evaluated different numbers of sets."""
    ca, cb = _set_counts(a, metric), _set_counts(b, metric)
    if not ca or not cb or len(ca) != len(cb):
        return None
    na, nb = {n for _, n in ca}, {n for _, n in cb}
    if len(na) == 1 and len(nb) == 1:
        (n1,), (n2,) = na, nb
        k = len(ca)
        return newcombe_difference(sum(p for p, _ in ca) * n1, n1 * k, sum(p for p, _ in cb) * n2, n2 * k, z)
    k = len(ca)
    d = sum(p for p, _ in ca) / k - sum(p for p, _ in cb) / k
    var = sum(p * (1 - p) / n for p, n in ca + cb) / (k * k)
    return d - z * math.sqrt(var), d + z * math.sqrt(var)


def paired_ratio_difference(a: Sequence[float], b: Sequence[float], weights: Sequence[float],
                            z: float = Z95) -> tuple[float, float, float] | None:
    """(d, low, high) for d = Σa/Σw − Σb/Σw over the same items scored by two models, e.g. two runs' summed answer
    NLLs a_i, b_i over the items' token counts w_i (the per-token NLL each table prints).

    Items, not tokens, are the sampling units: the variance is the ratio estimator's linearisation,
    n/(n−1) · Σ(a_i − b_i − d·w_i)² / (Σw)², so the pairing removes the items' shared difficulty. None with fewer
    than two items or no weight."""
    if not len(a) == len(b) == len(weights):
        raise ValueError("need one a, one b and one weight per item")
    n, total = len(a), float(sum(weights))
    if n < 2 or total <= 0:
        return None
    d = (sum(a) - sum(b)) / total
    ss = sum((x - y - d * w) ** 2 for x, y, w in zip(a, b, weights))
    half = z * math.sqrt(n / (n - 1) * ss) / total
    return d, d - half, d + half
