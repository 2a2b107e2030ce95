"""Uniform baseline: the same reduction for every matrix; shared ratio→rank machinery for the OWL baseline.

- err target (WeLore's ``uniform_rank_pruning``): pruned = int(p·full) per matrix; p starts at the target and is
  raised by bisection until the global effective rank reduction reaches it (int() floors, so p = target alone
  falls short).
- keep target (SVD-LLM): θ = ⌊m·n·ρ/(m+n)⌋ with ρ the kept-parameter ratio; ρ is bisected so the global kept
  fraction is the largest one within the target. A rank whose factors would not be smaller than the dense
  matrix is rounded up to full rank (same cost, nothing lost).

Per-matrix ratios are ``base + offset`` (``base`` = 0 here, OWL's centred outlier map in ``owl``); the offset
is bisected on the monotone step function. The achieved value can differ from the target by one step of that
function (``info["step"]``; several matrices of one shape move together).
"""

from __future__ import annotations

import numpy as np

from deftlab.allocate.base import (
    Allocation,
    MatrixSpectrum,
    Target,
    budget_error,
    check_spectra,
    make_allocation,
)
from deftlab.errors import BudgetError

_ITERS = 200


def _boundary(ok, good: float, bad: float) -> tuple[float, float]:
    """Bisect a monotone predicate with ok(good) true, ok(bad) false; return the final (good, bad) pair."""
    for _ in range(_ITERS):
        mid = (good + bad) / 2
        if mid in (good, bad):
            break
        good, bad = (mid, bad) if ok(mid) else (good, mid)
    return good, bad


class RatioRanks:
    """Ranks from per-matrix ratios (rank-reduction p for err, kept-parameter ρ for keep), vectorised."""

    def __init__(self, spectra: list[MatrixSpectrum]):
        self.m = np.array([s.out_features for s in spectra], dtype=np.int64)
        self.n = np.array([s.in_features for s in spectra], dtype=np.int64)
        self.full = np.minimum(self.m, self.n)
        self.dense = self.m * self.n

    def ranks_err(self, p: np.ndarray) -> np.ndarray:
        pruned = np.clip(np.trunc(p * self.full), 0, self.full - 1).astype(np.int64)  # int(p·full), rank ≥ 1
        return self.full - pruned

    def ranks_keep(self, rho: np.ndarray) -> np.ndarray:
        theta = np.clip(np.floor(self.dense * rho / (self.m + self.n)), 1, self.full).astype(np.int64)
        return np.where(theta * (self.m + self.n) < self.dense, theta, self.full)  # no saving → full rank

    def err(self, theta: np.ndarray) -> float:
        return float((self.full - theta).sum() / self.full.sum())

    def keep(self, theta: np.ndarray) -> float:
        fac = theta * (self.m + self.n)
        kept = np.where((theta < self.full) & (fac < self.dense), fac, self.dense)
        return float(kept.sum() / self.dense.sum())


def fit_offset(spectra: list[MatrixSpectrum], target: Target, base: np.ndarray) -> tuple[dict[str, int], dict]:
    """Ranks for ratios base + δ with δ bisected so the global target is met as tightly as the steps allow."""
    rr = RatioRanks(spectra)
    if target.kind == "err":
        def ranks(d: float) -> np.ndarray:
            return rr.ranks_err(target.err + base + d)

        def ok(d: float) -> bool:  # monotone: larger δ prunes more
            return rr.err(ranks(d)) >= target.err
        # δ = hi gives p ≥ 1 everywhere (max reduction), δ = lo gives p ≤ 0 (no reduction)
        lo, hi = -2.0 - float(np.abs(base).max()) - target.err, 2.0 + float(np.abs(base).max())
        if not ok(hi):
            raise BudgetError(f"err={target.err:g} cannot be reached: the largest rank reduction at rank ≥ 1 is "
                              f"{rr.err(ranks(hi)):.4f}", "lower err")
        if ok(lo):
            hi = lo
        hi, lo = _boundary(ok, hi, lo)  # smallest δ with ok(δ)
        chosen, other = ranks(hi), ranks(lo)
        achieved, step = rr.err(chosen), rr.err(chosen) - rr.err(other)
    else:
        def ranks(d: float) -> np.ndarray:
            return rr.ranks_keep(target.keep + base + d)

        def ok(d: float) -> bool:  # monotone: larger δ keeps more
            return rr.keep(ranks(d)) <= target.keep
        lo, hi = -2.0 - float(np.abs(base).max()) - target.keep, 2.0 + float(np.abs(base).max())
        if not ok(lo):
            raise budget_error(target.keep, rr.keep(ranks(lo)), "every matrix at rank 1")
        if ok(hi):
            lo = hi
        lo, hi = _boundary(ok, lo, hi)  # largest δ with ok(δ)
        chosen, other = ranks(lo), ranks(hi)
        achieved, step = rr.keep(chosen), rr.keep(other) - rr.keep(chosen)
    d = hi if target.kind == "err" else lo
    names = [s.name for s in spectra]
    info = {f"target_{target.kind}": target.value, f"achieved_{target.kind}": achieved, "step": step,
            "offset": d}
    return dict(zip(names, chosen.tolist())), info


def uniform_allocate(spectra, *, err: float | None = None, keep: float | None = None) -> Allocation:
    """Same rank-reduction ratio (err) or kept-parameter ratio (keep) for every matrix."""
    spectra = check_spectra(spectra)
    target = Target.from_kwargs(keep=keep, err=err)
    ranks, info = fit_offset(spectra, target, np.zeros(len(spectra)))
    info["ratio"] = target.value + info["offset"]
    return make_allocation("uniform", spectra, ranks, info=info)
