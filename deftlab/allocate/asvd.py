"""ASVD's rank search (Yuan et al., 2023; hahnyuan/ASVD4LLM `binary_search_truncation_rank`): every matrix was
truncated alone at each kept ratio ρ of a list and the calibration perplexity measured (`sensitivity`); the
(matrix, ρ, ppl) triples are sorted by perplexity, worst first, and for a cut `mid` each matrix takes the smallest
ρ among its triples in sorted[mid:] (the less damaging ones), matrices with none staying dense. The cut is
bisected on the parameter ratio Σ ρ·m·n / Σ m·n (monotone in `mid`).

Differences from ASVD's code: we return the cut at the budget boundary (the smallest parameter ratio within
`keep`), where ASVD keeps its loop's last `mid` and can land one step off; ranks are ASVD's ⌊m·n·ρ⌋ // (m+n).
"""

from __future__ import annotations

from collections.abc import Mapping

from deftlab.allocate.base import Allocation, MatrixSpectrum, check_spectra, make_allocation
from deftlab.errors import BudgetError, DeftlabError


def asvd_rank(m: int, n: int, rho: float) -> int:
    """ASVD's rank of an m×n matrix at kept ratio ρ (`SVDLinear.from_linear`: int(m·n·ρ) // (m+n)), at least 1."""
    return max(1, int(m * n * rho) // (m + n))


def asvd_ratios(sensitivity: Mapping[str, Mapping[float, float]], sizes: Mapping[str, int],
                keep: float) -> dict[str, float]:
    """Each matrix's kept ratio (1.0: left dense) at the budget `keep` of Σ sizes."""
    missing = set(sizes) - set(sensitivity)
    if missing:
        raise DeftlabError(f"no sensitivity for {sorted(missing)[:3]}", "measure every matrix at every ratio")
    triples = sorted(((float(ppl), name, float(rho)) for name, row in sensitivity.items()
                      for rho, ppl in row.items()), key=lambda t: -t[0])
    total = sum(sizes.values())

    def at(mid: int) -> tuple[dict[str, float], float]:
        ratios = dict.fromkeys(sizes, 1.0)
        for _, name, rho in triples[mid:]:
            ratios[name] = min(ratios[name], rho)
        return ratios, sum(ratios[n] * sizes[n] for n in sizes) / total

    if at(0)[1] > keep:
        raise BudgetError(f"keep={keep:g} is below what the smallest measured ratios give ({at(0)[1]:.4f})",
                          "add smaller ratios, or use a larger keep")
    lo, hi = 0, len(triples)  # at(lo) fits; find the largest cut that still fits (fewest matrices reduced)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if at(mid)[1] <= keep else (lo, mid - 1)
    return at(lo)[0]


def asvd_allocate(spectra: list[MatrixSpectrum], *, keep: float | None = None, err: float | None = None,
                  sensitivity: Mapping[str, Mapping[float, float]] | None = None) -> Allocation:
    """Ranks from ASVD's sensitivity search under the kept-parameter budget `keep`."""
    check_spectra(spectra)
    if keep is None or err is not None or sensitivity is None:
        raise BudgetError("ASVD's search takes keep= and the per-matrix sensitivity", "pass keep= and sensitivity=")
    ratios = asvd_ratios(sensitivity, {s.name: s.out_features * s.in_features for s in spectra}, keep)
    ranks = {s.name: s.full_rank if ratios[s.name] >= 1.0
             else min(s.full_rank, asvd_rank(s.out_features, s.in_features, ratios[s.name])) for s in spectra}
    alloc = make_allocation("asvd", spectra, ranks)
    alloc.info.update(ratios=ratios)
    return alloc
