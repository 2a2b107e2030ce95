"""Reference solvers for the DeFT search — for tests and benchmarks only, never used by the pipeline.

- ``literal_algorithm1``: a line-by-line transcription of Algorithm 1: every step rescans every matrix, computes
  the next cut's (1+ηα)·Δf/Δg from the rank rules directly (not from a precomputed grid) and applies the best.
  Same start, floor and dense-cap plateau rules (including the plateau jump's price) as ``deft.deft_search``;
  O(cuts · L).
- ``exact_optimum``: the exact minimiser of Σ(1+ηα)(1 − f(θ)) s.t. Σ g ≤ B over the same rank grid, by dynamic
  programming over matrices on the integer parameter budget (exact because g is an integer; use small dims).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from deftlab.allocate.base import Allocation, break_even_rank, make_allocation, stored_params
from deftlab.allocate.deft import deft_objective, prepare
from deftlab.errors import BudgetError, DeftlabError

_MAX_DP_BUDGET = 20_000_000


def literal_algorithm1(spectra, keep: float, *, alpha: Mapping[str, float] | None = None, eta: float = 1.0,
                       group: int = 32, f_start: float = 0.999,
                       lower_bounds: Mapping[str, int] | None = None) -> Allocation:
    spectra, energies, w, _grids, budget = prepare(spectra, keep, alpha=alpha, eta=eta, group=group,
                                                   f_start=f_start, lower_bounds=lower_bounds)
    L = len(spectra)
    E = [energies[s.name] for s in spectra]
    mm = [s.out_features for s in spectra]
    nn_ = [s.in_features for s in spectra]
    full = [s.full_rank for s in spectra]
    be = [break_even_rank(mm[i], nn_[i]) for i in range(L)]
    floor = [min(max(int((lower_bounds or {}).get(s.name, 1)), 1), s.full_rank) for s in spectra]
    # line 1: θ0 = smallest rank keeping f_start of the energy (never below the floor)
    theta0 = []
    for i in range(L):
        t = 0
        while E[i][t] < f_start:
            t += 1
        theta0.append(max(t, floor[i]))
    # a start on the dense plateau is stored dense anyway: keep the matrix at full rank
    theta = [theta0[i] if theta0[i] <= be[i] else full[i] for i in range(L)]

    def g(i: int, t: int) -> int:
        return stored_params(mm[i], nn_[i], t)

    def next_rank(i: int, t: int) -> int | None:
        """The rank one cut below t (None if t is the floor or nothing below saves memory)."""
        if t > be[i]:  # plateau: jump to the largest grid rank θ0 − kG that saves memory
            if floor[i] > be[i]:
                return None
            k = math.ceil((theta0[i] - be[i]) / group)
            c = theta0[i] - k * group
        else:
            c = t - group
        if c < floor[i]:
            return floor[i] if t > floor[i] else None
        return c

    def rate(i: int, t: int, c: int) -> float:
        return w[i] * (E[i][t] - E[i][c]) / (g(i, t) - g(i, c))

    # a plateau jump is priced at the best average rate over it and the cuts after it; that price does not
    # change while the matrix waits on the plateau, so it is computed once per matrix
    jump_price = {}
    for i in range(L):
        c = next_rank(i, theta[i]) if theta[i] > be[i] else None
        if c is not None:
            best = rate(i, theta[i], c)
            d = next_rank(i, c)
            while d is not None:
                best = min(best, rate(i, theta[i], d))
                d = next_rank(i, d)
            jump_price[i] = best

    def priority(i: int) -> tuple[float, int] | None:
        t = theta[i]
        c = next_rank(i, t)
        if c is None:
            return None
        return (jump_price[i] if t > be[i] else rate(i, t, c)), c

    total = sum(g(i, theta[i]) for i in range(L))
    cuts = 0
    while total > budget:  # cut the cheapest matrix until the budget holds, rescanning every matrix
        best = None
        for i in range(L):
            p = priority(i)
            if p is not None and (best is None or p[0] < best[0]):
                best = (p[0], i, p[1])
        if best is None:
            raise BudgetError("no matrix can be cut further", "raise keep")
        _, i, c = best
        total -= g(i, theta[i]) - g(i, c)
        theta[i] = c
        cuts += 1
    ranks = {s.name: theta[i] for i, s in enumerate(spectra)}
    info = {"cuts": cuts, "budget": budget,
            "objective": deft_objective(spectra, ranks, alpha=alpha, eta=eta, energies=energies)}
    return make_allocation("deft-literal", spectra, ranks, info=info, energies=energies)


def exact_optimum(spectra, keep: float, *, alpha: Mapping[str, float] | None = None, eta: float = 1.0,
                  group: int = 32, f_start: float = 0.999,
                  lower_bounds: Mapping[str, int] | None = None) -> Allocation:
    """Exact optimum on DeFT's grid (``deft.rank_grids``) by DP over matrices; Σ g is an integer, so the budget
    ⌊keep·Σmn⌋ is discretised exactly. Memory/time O(L · B): keep dims small."""
    spectra, energies, w, grids, budget = prepare(spectra, keep, alpha=alpha, eta=eta, group=group,
                                                  f_start=f_start, lower_bounds=lower_bounds)
    cap = int(math.floor(budget))
    if cap > _MAX_DP_BUDGET:
        raise DeftlabError(f"exact DP over a budget of {cap} parameters is too large",
                           "use smaller matrices for exact_optimum")
    dp = np.full(cap + 1, np.inf)
    dp[0] = 0.0  # dp[b] = least cost with Σg exactly b
    choices = []
    for i, wl in enumerate(w):
        gr = grids[i]
        new = np.full(cap + 1, np.inf)
        choice = np.full(cap + 1, -1, dtype=np.int32)
        for k in range(len(gr.ranks)):
            gk = int(gr.g[k])
            if gk > cap:
                continue
            cand = dp[: cap + 1 - gk] + wl * (1.0 - gr.f[k])
            better = cand < new[gk:]
            new[gk:][better] = cand[better]
            choice[gk:][better] = k
        dp = new
        choices.append(choice)
    b = int(np.argmin(dp))
    if not np.isfinite(dp[b]):
        raise BudgetError("no grid point meets the budget", "raise keep")
    ranks = {}
    for i in reversed(range(len(spectra))):
        s, gr, choice = spectra[i], grids[i], choices[i]
        k = int(choice[b])
        ranks[s.name] = int(gr.ranks[k])
        b -= int(gr.g[k])
    info = {"budget": budget, "objective": deft_objective(spectra, ranks, alpha=alpha, eta=eta, energies=energies)}
    return make_allocation("deft-optimum", spectra, ranks, info=info, energies=energies)
