"""SVD-LLM's allocation (Wang et al., 2024; AIoT-MLSys-Lab/SVD-LLM `whitening`): one kept-parameter ratio ρ for
every matrix, θ = ⌊m·n·ρ / (m + n)⌋, each stored as two factors. No search and no bisection: ρ is the target
itself, so the achieved kept fraction falls short of it by the floors (``info["keep_achieved"]``).
"""

from __future__ import annotations

from deftlab.allocate.base import Allocation, MatrixSpectrum, check_spectra, make_allocation
from deftlab.errors import BudgetError


def svdllm_rank(m: int, n: int, rho: float) -> int:
    """SVD-LLM's rank of an m×n matrix at kept ratio ρ (at least 1)."""
    return max(1, int(m * n * rho / (m + n)))


def svdllm_allocate(spectra: list[MatrixSpectrum], *, keep: float | None = None,
                    err: float | None = None) -> Allocation:
    """θ = ⌊m·n·keep/(m+n)⌋ for every matrix (keep: the fraction of parameters SVD-LLM's --ratio leaves, 1 − ratio)."""
    check_spectra(spectra)
    if keep is None or err is not None:
        raise BudgetError("SVD-LLM takes one kept-parameter ratio", "pass keep= (e.g. 0.8 for SVD-LLM's --ratio 0.2)")
    ranks = {s.name: min(s.full_rank, svdllm_rank(s.out_features, s.in_features, keep)) for s in spectra}
    alloc = make_allocation("svdllm", spectra, ranks)
    alloc.info.update(rho=keep, keep_achieved=alloc.keep_fraction)
    return alloc
