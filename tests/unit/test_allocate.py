"""Rank allocators on synthetic spectra: DeFT greedy vs exact optimum and the literal Algorithm 1, WeLore τ search,
OWL and uniform baselines, budgets and the Allocation record."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from deftlab.allocate import (
    Allocation,
    MatrixSpectrum,
    allocate,
    break_even_rank,
    energy,
    lrc_labels,
    stored_params,
)
from deftlab.allocate.base import effective_rank_reduction, linear_keep, make_allocation, model_keep_fraction
from deftlab.allocate.deft import deft_objective, deft_search
from deftlab.allocate.owl import layer_outlier_ratios, owl_allocate
from deftlab.allocate.reference import exact_optimum, literal_algorithm1
from deftlab.allocate.uniform import uniform_allocate
from deftlab.allocate.welore import normalised_spectrum, welore_allocate, welore_ranks
from deftlab.errors import BudgetError, DeftlabError, UnknownNameError


def decaying(R: int, tau: float, g: torch.Generator, noise: float = 0.3) -> torch.Tensor:
    s = torch.exp(-torch.arange(R, dtype=torch.float64) / tau) * (1 + noise * torch.rand(R, generator=g,
                                                                                         dtype=torch.float64))
    return torch.sort(s, descending=True).values


def spectra_for(shapes, seed: int, taus=(2.0, 12.0), per_layer: int = 3) -> list[MatrixSpectrum]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, (m, n) in enumerate(shapes):
        tau = taus[0] + (taus[1] - taus[0]) * torch.rand(1, generator=g, dtype=torch.float64).item()
        out.append(MatrixSpectrum(f"model.layers.{i // per_layer}.m{i}", i // per_layer, m, n,
                                  decaying(min(m, n), tau, g)))
    return out


def random_alpha(spectra, seed: int) -> dict[str, float]:
    g = torch.Generator().manual_seed(1000 + seed)
    return {s.name: float(torch.rand(1, generator=g)) for s in spectra}


def random_shapes(seed: int, k: int = 6, lo: int = 64, hi: int = 97) -> list[tuple[int, int]]:
    g = torch.Generator().manual_seed(seed)
    return [(int(torch.randint(lo, hi, (1,), generator=g)), int(torch.randint(lo, hi, (1,), generator=g)))
            for _ in range(k)]


def aligned_floors(spectra, group: int, f_start: float = 0.999) -> dict[str, int]:
    """Floors on each matrix's grid (θ0 − kG), so every cut saves exactly G(m+n)."""
    out = {}
    for s in spectra:
        theta0 = int(np.searchsorted(energy(s.sigma).numpy(), f_start))
        out[s.name] = theta0 - group * ((theta0 - 1) // group)
    return out


# --------------------------------------------------------------------------------------------------------------
# accounting


def test_energy_and_parameter_accounting():
    s = torch.tensor([3.0, 2.0, 1.0, 0.0], dtype=torch.float64)
    f = energy(s)
    assert torch.allclose(f, torch.tensor([0, 9 / 14, 13 / 14, 1, 1], dtype=torch.float64))
    assert float(energy(torch.zeros(3, dtype=torch.float64))[0]) == 1.0  # a zero matrix loses nothing
    for m in range(1, 40):
        for n in range(1, 40):
            be = break_even_rank(m, n)
            assert be * (m + n) < m * n <= (be + 1) * (m + n)
            assert stored_params(m, n, be) == be * (m + n) and stored_params(m, n, be + 1) == m * n


def test_matrix_spectrum_validates():
    with pytest.raises(DeftlabError, match="descending"):
        MatrixSpectrum("a", 0, 4, 4, torch.tensor([1.0, 2.0, 0.5, 0.1], dtype=torch.float64))
    with pytest.raises(DeftlabError, match="singular values"):
        MatrixSpectrum("a", 0, 4, 5, torch.ones(5, dtype=torch.float64))


# --------------------------------------------------------------------------------------------------------------
# DeFT search vs exact optimum and the literal Algorithm 1


@pytest.mark.parametrize("seed", range(4))
def test_deft_is_optimal_for_identical_shapes_off_the_plateau(seed):
    sp = spectra_for([(80, 80)] * 6, seed, taus=(1.5, 5.0))
    alpha = random_alpha(sp, seed)
    floors = aligned_floors(sp, 8)
    lo = sum(floors[s.name] * 160 for s in sp) / (6 * 80 * 80)  # every matrix at its floor
    hi = deft_search(sp, 1.0, group=8, lower_bounds=floors).keep_fraction  # the start
    assert hi > lo
    for t in (0.2, 0.5, 0.8):
        keep = lo + t * (hi - lo)
        a = deft_search(sp, keep, alpha=alpha, group=8, lower_bounds=floors)
        assert a.info["plateau_start"] == 0 and a.info["cuts"] > 0
        opt = exact_optimum(sp, keep, alpha=alpha, group=8, lower_bounds=floors)
        assert a.params_kept <= keep * a.params_dense and opt.params_kept <= keep * opt.params_dense
        assert a.info["objective"] == pytest.approx(opt.info["objective"], rel=1e-12, abs=1e-15), (keep, seed)


@pytest.mark.parametrize("seed", range(6))
def test_deft_is_within_one_hull_step_of_the_optimum(seed, capsys):
    """General shapes, including matrices that start on the dense plateau (slowly decaying spectra)."""
    sp = spectra_for(random_shapes(seed), seed, taus=(2.0, 40.0))
    alpha = random_alpha(sp, seed)
    gaps = []
    for keep in (0.15, 0.3, 0.5):
        a = deft_search(sp, keep, alpha=alpha, group=8)
        opt = exact_optimum(sp, keep, alpha=alpha, group=8)
        gap = a.info["objective"] - opt.info["objective"]
        assert gap >= -1e-12  # the DP is exact
        assert gap <= a.info["gap_bound"] + 1e-12, (keep, gap, a.info["gap_bound"])
        gaps.append(f"keep {keep}: {gap:.2e} (optimum {opt.info['objective']:.3g})")
    with capsys.disabled():
        print(f"\n  seed {seed}, {a.info['plateau_start']} on the plateau; greedy − optimum: " + "; ".join(gaps))


@pytest.mark.parametrize("seed", range(8))
def test_heap_search_equals_literal_algorithm1(seed):
    g = torch.Generator().manual_seed(seed)
    sp = spectra_for(random_shapes(seed, k=7, lo=20, hi=60), seed, taus=(1.0, 30.0))
    alpha = random_alpha(sp, seed)
    for _ in range(4):
        keep = 0.15 + 0.85 * float(torch.rand(1, generator=g))
        group = int(torch.randint(1, 9, (1,), generator=g))
        lb = {sp[0].name: int(torch.randint(1, 6, (1,), generator=g))}
        kw = dict(alpha=alpha, eta=float(torch.rand(1, generator=g)) * 3, group=group, lower_bounds=lb)
        try:
            a = deft_search(sp, keep, **kw)
        except BudgetError:
            continue
        b = literal_algorithm1(sp, keep, **kw)
        assert a.ranks == b.ranks
        assert a.info["cuts"] == b.info["cuts"]


def test_deft_always_meets_the_budget_and_starts_at_0999_energy():
    sp = spectra_for(random_shapes(11, k=9), 11, taus=(1.0, 50.0))
    for keep in (0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0):
        a = deft_search(sp, keep, alpha=random_alpha(sp, 0), group=4)
        assert a.params_kept <= keep * a.params_dense
        assert a.keep_fraction <= keep
        for s in sp:
            m, n, theta = s.out_features, s.in_features, a.ranks[s.name]
            assert a.factored[s.name] == (theta < s.full_rank and theta * (m + n) < m * n)
    loose = deft_search(sp, 1.0, group=4)
    assert loose.info["cuts"] == 0
    for s in sp:  # start: 0.999 energy, or full rank when that rank would be stored dense anyway
        f = energy(s.sigma).numpy()
        theta0 = int(np.searchsorted(f, 0.999))
        expect = theta0 if theta0 <= break_even_rank(s.out_features, s.in_features) else s.full_rank
        assert loose.ranks[s.name] == expect


def test_matrix_stays_dense_when_factoring_would_not_save():
    g = torch.Generator().manual_seed(3)
    flat = MatrixSpectrum("flat", 0, 64, 64, torch.sort(1 + 0.01 * torch.rand(64, generator=g,
                                                                                dtype=torch.float64),
                                                         descending=True).values)
    others = [MatrixSpectrum(f"fast{i}", 0, 64, 64, decaying(64, 1.5, g)) for i in range(4)]
    sp = [flat, *others]
    a = deft_search(sp, 0.6, group=4)
    assert a.ranks["flat"] == 64 and not a.factored["flat"]
    assert a.matrices["flat"]["params"] == 64 * 64
    assert all(a.factored[o.name] for o in others)
    assert a.params_kept <= 0.6 * a.params_dense


def test_plateau_matrix_can_still_be_cut():
    g = torch.Generator().manual_seed(4)
    s = torch.sort(1 + 0.1 * torch.rand(64, generator=g, dtype=torch.float64), descending=True).values
    sp = [MatrixSpectrum("slow", 0, 64, 96, s), MatrixSpectrum("slow2", 0, 96, 64, s.flip(0).flip(0))]
    be = break_even_rank(64, 96)
    a = deft_search(sp, 0.5, group=8)
    assert a.info["plateau_start"] == 2
    assert all(a.factored.values()) and max(a.ranks.values()) <= be
    assert a.params_kept <= 0.5 * a.params_dense
    lit = literal_algorithm1(sp, 0.5, group=8)
    assert lit.ranks == a.ranks


def test_eta_zero_ignores_alpha_and_positive_eta_uses_it():
    sp = spectra_for([(80, 80)] * 6, 5, taus=(3.0, 6.0))
    alpha = {s.name: v for s, v in zip(sp, [0.0, 0.9, 0.1, 0.5, 2.0, 0.3])}
    perm = dict(zip(alpha, np.roll(list(alpha.values()), 2).tolist()))
    base = deft_search(sp, 0.25, alpha=alpha, eta=0.0, group=4)
    assert deft_search(sp, 0.25, alpha=perm, eta=0.0, group=4).ranks == base.ranks
    assert deft_search(sp, 0.25, alpha=None, eta=0.0, group=4).ranks == base.ranks
    # the same permutation matters once η > 0 (so the check above can fail)
    assert deft_search(sp, 0.25, alpha=alpha, eta=5.0, group=4).ranks != \
        deft_search(sp, 0.25, alpha=perm, eta=5.0, group=4).ranks


def test_higher_alpha_keeps_at_least_as_much_rank():
    sp = spectra_for(random_shapes(7, k=6), 7, taus=(2.0, 30.0))
    alpha = random_alpha(sp, 7)
    base = deft_search(sp, 0.3, alpha=alpha, eta=2.0, group=4)
    grew = 0
    for s in sp:
        bumped = deft_search(sp, 0.3, alpha={**alpha, s.name: alpha[s.name] + 1.0}, eta=2.0, group=4)
        assert bumped.ranks[s.name] >= base.ranks[s.name]
        grew += bumped.ranks[s.name] > base.ranks[s.name]
    assert grew > 0


def test_deft_objective_and_info():
    sp = spectra_for(random_shapes(8), 8)
    alpha = random_alpha(sp, 8)
    a = deft_search(sp, 0.3, alpha=alpha, eta=1.5, group=8)
    manual = sum((1 + 1.5 * alpha[s.name]) * (1 - float(energy(s.sigma)[a.ranks[s.name]])) for s in sp)
    assert a.info["objective"] == pytest.approx(manual, rel=1e-12)
    assert a.info["objective"] == pytest.approx(deft_objective(sp, a.ranks, alpha=alpha, eta=1.5))
    assert a.info["objective_start"] <= a.info["objective"]
    assert a.info["cuts"] > 0 and a.info["budget"] == pytest.approx(0.3 * a.params_dense)


def test_deft_budget_errors():
    sp = spectra_for(random_shapes(9), 9)
    with pytest.raises(BudgetError, match="minimum achievable"):
        deft_search(sp, 0.001, group=8)
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(BudgetError):
            deft_search(sp, bad)
    with pytest.raises(BudgetError, match="minimum achievable"):
        allocate(sp, "deft", keep=0.001)
    with pytest.raises(DeftlabError, match="alpha"):
        deft_search(sp, 0.5, alpha={sp[0].name: 0.1})


# --------------------------------------------------------------------------------------------------------------
# WeLore


def test_welore_normalisation_is_min_max():
    s = torch.tensor([5.0, 4.0, 2.0, 1.0], dtype=torch.float64)
    assert np.allclose(normalised_spectrum(s), [1.0, 0.75, 0.25, 0.0])
    sp = spectra_for(random_shapes(1), 1)
    shifted = [MatrixSpectrum(x.name, x.layer, x.out_features, x.in_features, x.sigma * 3 + 7) for x in sp]
    assert welore_ranks(sp, 0.2) == welore_ranks(shifted, 0.2)  # s/max would change with the shift


@pytest.mark.parametrize("min_ratio", [0.0, 0.4999])
def test_welore_err_is_monotone_in_tau(min_ratio):
    sp = spectra_for(random_shapes(2, k=8), 2, taus=(2.0, 40.0))
    errs = [effective_rank_reduction(sp, welore_ranks(sp, float(t), min_ratio=min_ratio))
            for t in np.linspace(0, 1, 201)]
    assert all(b >= a for a, b in zip(errs, errs[1:]))
    assert errs[0] == 0.0 and errs[-1] > 0.5


@pytest.mark.parametrize("target", [0.05, 0.3, 0.5, 0.7])
@pytest.mark.parametrize("min_ratio", [0.0, 0.4999])
def test_welore_hits_target_err_within_one_step(target, min_ratio):
    """Tolerance: one step of the ERR(τ) step function (info["step"]; one σ, or a whole matrix under min_ratio)."""
    sp = spectra_for(random_shapes(3, k=8), 3, taus=(2.0, 40.0))
    a = welore_allocate(sp, target, min_ratio=min_ratio)
    assert a.err == pytest.approx(a.info["achieved_err"])
    assert a.err >= target and a.err - target <= a.info["step"] + 1e-12
    # the previous value of the step function is below the target (τ is the first one that reaches it)
    below = [v for v in np.unique(np.concatenate([normalised_spectrum(s.sigma) for s in sp])) if v < a.info["tau"]]
    if below:
        prev = effective_rank_reduction(sp, welore_ranks(sp, float(below[-1]), min_ratio=min_ratio))
        assert prev < target
        assert a.err - prev == pytest.approx(a.info["step"])
    assert welore_ranks(sp, a.info["tau"], min_ratio=min_ratio) == a.ranks
    for s in sp:
        pruned = s.full_rank - a.ranks[s.name]
        assert a.ranks[s.name] >= 1
        if min_ratio:
            assert pruned == 0 or pruned / s.full_rank > min_ratio
        assert a.lrc[s.name] == (pruned / s.full_rank > 0.4999)


def test_lrc_labels_follow_the_half_rule():
    sp = [MatrixSpectrum(f"m{i}", 0, 64, 64, torch.linspace(1, 0, 64, dtype=torch.float64)) for i in range(4)]
    a = make_allocation("x", sp, {"m0": 32, "m1": 33, "m2": 1, "m3": 64})
    assert a.lrc == {"m0": True, "m1": False, "m2": True, "m3": False}
    assert lrc_labels(a) == a.lrc
    assert lrc_labels(a, 0.0) == {"m0": True, "m1": True, "m2": True, "m3": False}
    assert not a.factored["m3"] and a.factored["m2"]


def test_welore_keep_target_and_errors():
    sp = spectra_for(random_shapes(4), 4)
    a = welore_allocate(sp, keep=0.4)
    assert a.keep_fraction <= 0.4 and 0.4 - a.keep_fraction <= a.info["step"] + 1e-12
    with pytest.raises(BudgetError, match="cannot be reached"):
        welore_allocate(sp, 0.999)
    with pytest.raises(BudgetError):
        welore_allocate(sp, 1.0)
    with pytest.raises(DeftlabError, match="exactly one"):
        welore_allocate(sp, 0.3, keep=0.5)


def test_welore_lrc_factor_rule_factors_only_lrcs():
    # 64×192: break-even θ = 48, LRC θ < 32. θ = 40 is below break-even but an N-LRC; θ = 20 is an LRC
    sp = [MatrixSpectrum(f"m{i}", 0, 64, 192, torch.linspace(1, 0.01, 64, dtype=torch.float64)) for i in range(3)]
    ranks = {"m0": 40, "m1": 20, "m2": 64}
    even, lrc = make_allocation("x", sp, ranks), make_allocation("x", sp, ranks, factor="lrc")
    assert even.factored == {"m0": True, "m1": True, "m2": False}
    assert lrc.factored == {"m0": False, "m1": True, "m2": False} and lrc.lrc == even.lrc
    assert lrc.params_kept == 64 * 192 + 20 * 256 + 64 * 192  # the N-LRC stays one dense matrix
    assert even.params_kept == 40 * 256 + 20 * 256 + 64 * 192
    # the τ search counts parameters with the same rule as the allocation it returns
    sp = spectra_for([(64, 192)] * 6, 5)
    for factor in ("break-even", "lrc"):
        a = welore_allocate(sp, keep=0.6, factor=factor)
        assert a.info["factor"] == factor
        assert a.keep_fraction <= 0.6 and 0.6 - a.keep_fraction <= a.info["step"] + 1e-12
        if factor == "lrc":
            assert a.factored == a.lrc
    with pytest.raises(DeftlabError, match="factor rule"):
        welore_allocate(sp, 0.3, factor="half")


def test_square_lrc_at_break_even_cost_is_factored():
    # 64×64 at θ = 32: an LRC (half the rank removed) whose factors cost exactly 64·64. Break-even stores it as
    # two matrices anyway (same parameters) so LRC fine-tuning can train them; θ = 33 is neither, θ = 31 both
    sp = [MatrixSpectrum(f"m{i}", 0, 64, 64, torch.linspace(1, 0.01, 64, dtype=torch.float64)) for i in range(3)]
    a = make_allocation("x", sp, {"m0": 32, "m1": 33, "m2": 31})
    assert a.lrc == {"m0": True, "m1": False, "m2": True}
    assert a.factored == {"m0": True, "m1": False, "m2": True}
    assert a.params_kept == 64 * 64 + 64 * 64 + 31 * 128  # factoring m0 costs what dense m0 costs


def test_whole_model_budget_converts_to_the_linears_and_back():
    # LLaMA-7B: 6.738B in all, 6.476B in the decoder linears; the paper's 85% of the model is 5.73B
    total, lin = 6_738_415_616, 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    k = linear_keep(0.85, total, lin)
    assert k == pytest.approx((0.85 * total - (total - lin)) / lin) and k < 0.85
    assert model_keep_fraction(total, lin, round(k * lin)) == pytest.approx(0.85)
    assert round(total * 0.85 / 1e9, 2) == 5.73
    assert linear_keep(1.0, total, lin) == 1.0
    with pytest.raises(BudgetError, match="outside the decomposed linears"):
        linear_keep(0.03, total, lin)


# --------------------------------------------------------------------------------------------------------------
# OWL and uniform


def test_layer_outlier_ratios_match_concatenated_definition():
    g = torch.Generator().manual_seed(0)
    weights, norms, layer_of = {}, {}, {}
    for layer in range(3):
        for k, (o, i) in enumerate([(16, 12), (20, 12), (12, 20)]):
            name = f"l{layer}.m{k}"
            W = torch.randn(o, i, generator=g)
            if layer == 1:
                W[:, :2] *= 30  # planted outlier columns
            weights[name], layer_of[name] = W, layer
            norms[name] = torch.rand(i, generator=g, dtype=torch.float64) * 10
    D = layer_outlier_ratios(weights, norms, layer_of, M=5.0)
    for layer in range(3):
        A = torch.cat([(weights[n].abs().double() * norms[n].sqrt()).flatten() for n in weights
                       if layer_of[n] == layer])
        assert D[layer] == pytest.approx(100.0 * float((A > 5.0 * A.mean()).sum()) / A.numel())
    assert D[1] > D[0] and D[1] > D[2]


def owl_problem():
    sp = []
    g = torch.Generator().manual_seed(5)
    for layer in range(3):
        for k, (m, n) in enumerate([(64, 64), (96, 64), (64, 96)]):
            sp.append(MatrixSpectrum(f"l{layer}.m{k}", layer, m, n, decaying(64, 10.0, g)))
    return sp, {0: 1.0, 1: 8.0, 2: 3.0}


@pytest.mark.parametrize("kw", [{"keep": 0.4}, {"keep": 0.7}, {"err": 0.3}, {"err": 0.6}])
def test_owl_hits_target_and_favours_outlier_blocks(kw):
    sp, D = owl_problem()
    a = owl_allocate(sp, outlier_ratios=D, lamda=0.08, **kw)
    if "keep" in kw:
        assert a.keep_fraction <= kw["keep"] and kw["keep"] - a.keep_fraction <= a.info["step"] + 1e-12
    else:
        assert a.err >= kw["err"] and a.err - kw["err"] <= a.info["step"] + 1e-12
    for k in range(3):  # block 1 (D=8) ≥ block 2 (D=3) ≥ block 0 (D=1), matrix by matrix
        assert a.ranks[f"l1.m{k}"] >= a.ranks[f"l2.m{k}"] >= a.ranks[f"l0.m{k}"]
    assert sum(a.ranks[f"l1.m{k}"] for k in range(3)) > sum(a.ranks[f"l0.m{k}"] for k in range(3))
    r = a.info["block_ratio"]
    assert r[1] - r[0] == pytest.approx(0.16 if "keep" in kw else -0.16)  # range 2λ


def test_owl_with_lambda_zero_is_uniform():
    sp, D = owl_problem()
    assert owl_allocate(sp, keep=0.5, outlier_ratios=D, lamda=0.0).ranks == uniform_allocate(sp, keep=0.5).ranks
    with pytest.raises(DeftlabError, match="block"):
        owl_allocate(sp, keep=0.5, outlier_ratios={0: 1.0})


def test_uniform_hits_targets_with_the_same_ratio_everywhere():
    sp = spectra_for([(64, 64)] * 3 + [(96, 64)] * 3, 6)
    a = uniform_allocate(sp, err=0.35)
    assert a.err >= 0.35 and a.err - 0.35 <= a.info["step"] + 1e-12
    assert len({a.ranks[s.name] for s in sp[:3]}) == 1
    b = uniform_allocate(sp, keep=0.5)
    assert b.keep_fraction <= 0.5 and 0.5 - b.keep_fraction <= b.info["step"] + 1e-12
    rho = b.info["ratio"]
    for s in sp:  # SVD-LLM's θ = ⌊m·n·ρ/(m+n)⌋
        m, n = s.out_features, s.in_features
        assert b.ranks[s.name] == int(m * n * rho // (m + n))
    with pytest.raises(BudgetError, match="minimum achievable"):
        uniform_allocate(sp, keep=0.01)


# --------------------------------------------------------------------------------------------------------------
# interface and record


def test_allocate_dispatch_and_errors():
    sp, D = owl_problem()
    assert allocate(sp, "uniform", keep=0.5).method == "uniform"
    assert allocate(sp, "welore", err=0.3, min_ratio=0.4999).method == "welore"
    assert allocate(sp, "owl", keep=0.5, outlier_ratios=D).method == "owl"
    assert allocate(sp, "deft", keep=0.5, group=4, eta=0.0).method == "deft"
    with pytest.raises(UnknownNameError, match="unknown allocator 'svd'"):
        allocate(sp, "svd", keep=0.5)
    with pytest.raises(DeftlabError, match="no option"):
        allocate(sp, "uniform", keep=0.5, group=4)
    with pytest.raises(DeftlabError, match="keep="):
        allocate(sp, "deft", err=0.3)
    with pytest.raises(DeftlabError, match="exactly one"):
        allocate(sp, "uniform")
    with pytest.raises(BudgetError):
        allocate(sp, "uniform", keep=0.0)


def test_allocation_round_trip_and_frame():
    sp = spectra_for(random_shapes(10), 10)
    a = deft_search(sp, 0.4, alpha=random_alpha(sp, 10), group=8)
    back = Allocation.from_dict(json.loads(json.dumps(a.to_dict())))
    assert back.ranks == a.ranks and back.factored == a.factored and back.lrc == a.lrc
    assert back.keep_fraction == a.keep_fraction and back.err == a.err and back.info == a.info
    df = a.to_frame()
    assert list(df.columns) == ["name", "layer", "m", "n", "full_rank", "rank", "factored", "lrc", "f_theta",
                                "params_dense", "params"]
    assert len(df) == len(sp) and int(df["params"].sum()) == a.params_kept
    assert (df["f_theta"] >= 0.9).all() or a.keep_fraction < 0.5
    assert a.err == pytest.approx(sum(s.full_rank - a.ranks[s.name] for s in sp) / sum(s.full_rank for s in sp))
    with pytest.raises(DeftlabError):
        Allocation.from_dict({"ranks": {}})
