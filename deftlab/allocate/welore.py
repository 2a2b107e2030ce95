"""WeLore's data-agnostic rank allocation: one global threshold on min–max-normalised singular values.

Per matrix ŝ = (σ − min σ)/(max σ − min σ); pruned = #{ŝ < τ}; θ = full − pruned (research notes §1, §10).
A matrix with pruned/full ≤ ``min_ratio`` stays at full rank (WeLore's fine-tune scripts use 0.4999, its
rank-reduction script 0.0), and only rank-reduced matrices count towards the achieved reduction. A matrix is
labelled LRC iff pruned/full > ``lrc_ratio`` (0.4999: "at least half the rank removed").

Where we differ: WeLore has no τ search (hand-tuned per-model τ tables that disagree between its scripts). We
search τ exactly: the achieved ERR is a monotone step function of τ that changes only at the ŝ values, so we
bisect over the sorted distinct ŝ values, take the first step reaching the target, and report τ and the ERR
actually reached (it overshoots the target by at most one step of the function, ``info["step"]``). We never
prune a matrix's largest value (ŝ = 1), so every rank is ≥ 1. A constant spectrum (max = min) normalises to
all ones and is never pruned.
"""

from __future__ import annotations

import numpy as np

from deftlab.allocate.base import (
    LRC_RATIO,
    Allocation,
    MatrixSpectrum,
    Target,
    budget_error,
    check_factor_rule,
    check_spectra,
    lrc_labels,
    make_allocation,
    total_dense,
)
from deftlab.errors import BudgetError, DeftlabError

__all__ = ["normalised_spectrum", "welore_ranks", "welore_allocate", "lrc_labels"]


def normalised_spectrum(sigma) -> np.ndarray:
    """Min–max normalised σ (float64, same order as σ); all ones for a constant spectrum."""
    s = sigma.detach().double().cpu().numpy() if hasattr(sigma, "detach") else np.asarray(sigma, dtype=np.float64)
    lo, hi = float(s.min()), float(s.max())
    if hi == lo:
        return np.ones_like(s)
    return (s - lo) / (hi - lo)


class _Thresholder:
    """Vectorised pruned counts #{ŝ < τ} for all matrices, with the min_ratio rule applied."""

    def __init__(self, spectra: list[MatrixSpectrum], min_ratio: float, factor: str = "break-even",
                 lrc_ratio: float = LRC_RATIO):
        self.spectra = spectra
        self.asc = [np.sort(normalised_spectrum(s.sigma)) for s in spectra]
        self.full = np.array([s.full_rank for s in spectra], dtype=np.int64)
        self.m = np.array([s.out_features for s in spectra], dtype=np.int64)
        self.n = np.array([s.in_features for s in spectra], dtype=np.int64)
        self.min_ratio = min_ratio
        self.factor, self.lrc_ratio = factor, lrc_ratio

    def pruned(self, tau: float) -> np.ndarray:
        p = np.array([np.searchsorted(a, tau, side="left") for a in self.asc], dtype=np.int64)
        p = np.minimum(p, self.full - 1)  # τ ≤ 1 never reaches the max; guard anyway (rank ≥ 1)
        return np.where(p / self.full > self.min_ratio, p, 0)

    def err(self, tau: float) -> float:
        return float(self.pruned(tau).sum() / self.full.sum())

    def params(self, tau: float) -> int:
        pruned = self.pruned(tau)
        theta = self.full - pruned
        fac = theta * (self.m + self.n)
        if self.factor == "lrc":  # the same rule as make_allocation's, vectorised
            two = pruned / self.full > self.lrc_ratio
        else:
            two = (theta < self.full) & (fac < self.m * self.n)
        return int(np.where(two, fac, self.m * self.n).sum())


def welore_ranks(spectra, tau: float, *, min_ratio: float = 0.0) -> dict[str, int]:
    """θ per matrix for a given threshold τ (pruned = #{ŝ < τ}, min_ratio rule applied)."""
    spectra = check_spectra(spectra)
    pruned = _Thresholder(spectra, min_ratio).pruned(tau)
    return {s.name: int(s.full_rank - p) for s, p in zip(spectra, pruned)}


def welore_allocate(spectra, err: float | None = None, *, keep: float | None = None, min_ratio: float = 0.0,
                    lrc_ratio: float = LRC_RATIO, factor: str = "break-even") -> Allocation:
    """WeLore ranks for a target effective rank reduction ``err`` (or kept-parameter fraction ``keep``).

    factor "lrc": only LRCs become two matrices (WeLore §3); "break-even": every matrix whose factors are smaller."""
    spectra = check_spectra(spectra)
    target = Target.from_kwargs(keep=keep, err=err)
    if not 0 <= min_ratio < 1:
        raise DeftlabError(f"min_ratio={min_ratio!r} is not in [0, 1)", "use 0.0 or WeLore's fine-tune 0.4999")
    check_factor_rule(factor)  # before the search, whose vectorised count would read an unknown rule as break-even
    th = _Thresholder(spectra, min_ratio, factor, lrc_ratio)
    values = np.unique(np.concatenate(th.asc))
    # pruned(τ) only changes at the ŝ values: τ = values[j] prunes exactly the values below it; τ = 1 prunes all
    # but each matrix's largest (ŝ = 1 is never pruned, so every rank stays ≥ 1).
    taus = np.append(values[values < 1.0], 1.0)

    if target.kind == "err":
        def ok(j: int) -> bool:
            return th.err(taus[j]) >= target.err
        if not ok(len(taus) - 1):
            raise BudgetError(f"err={target.err:g} cannot be reached: the largest WeLore rank reduction is "
                              f"{th.err(taus[-1]):.4f} (min_ratio={min_ratio:g})", "lower err")
    else:
        budget = target.keep * total_dense(spectra)

        def ok(j: int) -> bool:
            return th.params(taus[j]) <= budget
        if not ok(len(taus) - 1):
            raise budget_error(target.keep, th.params(taus[-1]) / total_dense(spectra),
                               f"all but each matrix's largest σ pruned, min_ratio={min_ratio:g}")
    # ok is monotone in j: bisect for the smallest j where it holds
    lo, hi = 0, len(taus) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid + 1
    tau = float(taus[hi])
    pruned = th.pruned(tau)
    ranks = {s.name: int(s.full_rank - p) for s, p in zip(spectra, pruned)}
    prev = taus[hi - 1] if hi > 0 else None
    if target.kind == "err":
        achieved = th.err(tau)
        step = achieved - (th.err(prev) if prev is not None else 0.0)
    else:
        achieved = th.params(tau) / total_dense(spectra)
        step = (th.params(prev) / total_dense(spectra) - achieved) if prev is not None else 0.0
    info = {"tau": tau, f"target_{target.kind}": target.value, f"achieved_{target.kind}": achieved,
            "step": step, "min_ratio": min_ratio, "lrc_ratio": lrc_ratio, "factor": factor}
    alloc = make_allocation("welore", spectra, ranks, lrc_ratio=lrc_ratio, info=info, factor=factor)
    alloc.info["n_lrc"] = sum(alloc.lrc.values())
    return alloc
