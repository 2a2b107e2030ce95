"""The reviewers' baselines, each checked against its definition on a small case: SVD-LLM's ranks, Wanda's masks
and OWL's per-block sparsities, DoRA through PEFT."""

import pytest
import torch

from deftlab.allocate import MatrixSpectrum, allocate
from deftlab.allocate.owl import owl_ratio_offsets
from deftlab.errors import DeftlabError
from deftlab.prune import block_sparsities, wanda_mask
from deftlab.recipes.finetune import FinetuneConfig, build_model

SHAPES = [(64, 64), (32, 64), (160, 64), (64, 160), (576, 1536), (1536, 576), (192, 576)]


def _spectra():
    g = torch.Generator().manual_seed(0)
    return [MatrixSpectrum(name=f"model.layers.{i}.mlp.p{i}", layer=i, out_features=m, in_features=n,
                           sigma=torch.rand(min(m, n), generator=g, dtype=torch.float64).sort(descending=True).values)
            for i, (m, n) in enumerate(SHAPES)]


@pytest.mark.parametrize("rho", [0.85, 0.7, 0.55, 0.2])
def test_svdllm_ranks_are_floor_mn_rho_over_m_plus_n(rho):
    alloc = allocate(_spectra(), "svdllm", keep=rho)
    for (m, n), s in zip(SHAPES, _spectra()):
        assert alloc.ranks[s.name] == max(1, (m * n * rho) // (m + n)) == int(m * n * rho / (m + n))
        assert alloc.factored[s.name]
    assert alloc.keep_fraction <= rho and alloc.info["rho"] == rho


def test_svdllm_takes_a_budget_not_err():
    with pytest.raises(DeftlabError, match="keep"):
        allocate(_spectra(), "svdllm", err=0.3)


@pytest.mark.parametrize("sparsity", [0.0, 0.15, 0.3, 0.5])
def test_wanda_keeps_exactly_the_top_scores_of_each_row(sparsity):
    g = torch.Generator().manual_seed(1)
    W = torch.randn(24, 40, generator=g)
    sq = torch.rand(40, generator=g) * 10
    mask = wanda_mask(W, sq, sparsity)
    score = W.abs() * sq.sqrt()[None, :]
    drop = int(40 * sparsity)
    for i in range(24):
        kept, pruned = score[i][mask[i]], score[i][~mask[i]]
        assert len(pruned) == drop  # per output row, ⌊n·s⌋ pruned
        if drop:
            assert kept.min() >= pruned.max()
        # the definition, by brute force: the kept set is the 40 − drop largest scores
        assert set(torch.topk(score[i], 40 - drop).indices.tolist()) == set(mask[i].nonzero().flatten().tolist())


def test_wanda_is_not_magnitude_pruning():
    """A small weight on a loud input outranks a larger weight on a quiet one."""
    W = torch.tensor([[1.0, 0.5]])
    assert wanda_mask(W, torch.tensor([1.0, 100.0]), 0.5).tolist() == [[False, True]]
    assert wanda_mask(W, torch.tensor([1.0, 1.0]), 0.5).tolist() == [[True, False]]


def test_owl_block_sparsities_keep_the_mean_and_span_two_lambda():
    D = {0: 3.0, 1: 7.0, 2: 5.0, 3: 11.0}
    s = block_sparsities(0.3, [0, 1, 2, 3], owl_ratio_offsets(D, [0, 1, 2, 3], lamda=0.08))
    assert sum(s.values()) / 4 == pytest.approx(0.3)
    assert max(s.values()) - min(s.values()) == pytest.approx(0.16)
    assert s[3] == min(s.values())  # more outliers, fewer pruned (OWL)
    assert block_sparsities(0.3, [0, 1]) == {0: 0.3, 1: 0.3}


def _build(tmp_path, **params):
    return build_model(FinetuneConfig.from_params({"model": "tiny", "calib_n": 16, "calib_max_length": 64,
                                                    "lora_r": 4, **params}), cache_root=tmp_path)


@pytest.fixture
def env(tmp_cache, data_dir, monkeypatch):
    monkeypatch.setenv("DEFTLAB_DATA_DIR", str(data_dir))


@pytest.mark.parametrize("owl", [False, True])
def test_wanda_lora_prunes_to_the_parameter_budget(env, tmp_path, owl):
    lm, model, report = _build(tmp_path, method="wanda", adapter="lora", keep=0.7, wanda_owl=owl)
    pruning = report["allocation"]
    base = model.get_base_model()
    zeros = sum(int((base.get_submodule(n).base_layer.weight == 0).sum()) if hasattr(base.get_submodule(n), "base_layer")
                else int((base.get_submodule(n).weight == 0).sum()) for n in pruning.kept)
    assert zeros == pruning.params_dense - pruning.params_kept
    assert pruning.keep_fraction == pytest.approx(0.7, abs=0.02)
    assert report["compress"]["params_nonzero"] == report["params_dense"] - zeros
    assert (len(set(pruning.info["block_sparsity"].values())) > 1) == owl  # per block under OWL, else one


def test_svdllm_method_factors_every_matrix_with_a_standard_lora(env, tmp_path):
    _, model, report = _build(tmp_path, method="svdllm", adapter="lora", keep=0.7)
    alloc = report["allocation"]
    assert alloc.method == "svdllm" and all(alloc.factored.values())
    assert report["compress"]["lora_tails"] == {}  # SVD-LLM + LoRA: the LoRA starts at B = 0, not DeFT's tail


def test_dora_starts_at_the_dense_model_and_trains_magnitudes(env, tmp_path):
    from deftlab.models.loading import load_model

    ids = torch.randint(3, 120, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = load_model("tiny").model(input_ids=ids).logits
    _, model, report = _build(tmp_path, method="dense", adapter="dora")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lora_magnitude_vector" in n for n in names) and any("lora_A" in n for n in names)
    model.eval()
    with torch.no_grad():
        out = model(input_ids=ids).logits
    assert torch.allclose(out, ref, atol=1e-5)
    with pytest.raises(DeftlabError, match="DoRA"):
        _build(tmp_path, method="deft", adapter="dora", keep=0.7, init="vanilla")


def test_matched_memory_rank_is_the_largest_that_fits():
    from dataclasses import replace

    from deftlab.planner.architecture import load_architecture
    from deftlab.planner.memory import TrainSetup, finetune_phase, matched_lora_rank

    arch = load_architecture("smollm2-135m")
    setup = TrainSetup("qlora", 4, 256, lora_r=32, device="cpu", compute="fp32")
    r, dense, deft = matched_lora_rank(arch, setup, 0.7)
    assert 1 <= r < 32 and dense <= deft == finetune_phase(arch, replace(setup, keep=0.7)).total
    assert finetune_phase(arch, replace(setup, lora_r=r + 1)).total > deft
    assert matched_lora_rank(arch, setup, 0.85)[0] > r  # a smaller saving leaves more rank
    with pytest.raises(DeftlabError, match="no LoRA rank"):  # 45 % of LLaMA-65B in NF4 is more than any LoRA
        matched_lora_rank(load_architecture("llama-65b"), replace(setup, device="cuda", compute="bf16"), 0.55)


def test_matched_memory_run_resolves_its_rank():
    cfg = FinetuneConfig.from_params({"model": "smollm2-135m", "method": "dense", "adapter": "qlora",
                                      "match_memory_keep": 0.7}).resolve()
    assert cfg.lora_r < 32
    with pytest.raises(Exception, match="matched-memory"):
        FinetuneConfig.from_params({"model": "tiny", "method": "deft", "keep": 0.7, "adapter": "qlora",
                                    "match_memory_keep": 0.7}).validate()


def test_asvd_scaled_svd_reconstructs_and_truncates_in_the_scaled_norm():
    from deftlab.decompose.asvd import activation_scale, scaled_svd
    from deftlab.decompose.whiten import truncated_factors

    g = torch.Generator().manual_seed(2)
    W, absmean = torch.randn(12, 20, generator=g, dtype=torch.float64), torch.rand(20, generator=g, dtype=torch.float64)
    S = activation_scale(absmean, 0.5)
    assert torch.allclose(S, (absmean + 1e-6) ** 0.5)
    dec = scaled_svd(W, S, dtype=torch.float64)
    assert torch.allclose(dec.U @ torch.diag(dec.sigma) @ dec.Vt_Sinv, W, atol=1e-10)
    B, A = truncated_factors(dec, 5)  # best rank 5 of W·diag(S) (Eckart–Young), unscaled
    U, s, Vh = torch.linalg.svd(W * S[None, :], full_matrices=False)
    assert torch.allclose((B @ A) * S[None, :], U[:, :5] @ torch.diag(s[:5]) @ Vh[:5], atol=1e-10)


def test_asvd_search_follows_its_definition():
    """Sorted worst first; at a cut, each matrix takes its smallest ratio among the less damaging triples; the
    cut is the largest one whose parameter ratio Σρ·size/Σsize fits the budget."""
    from deftlab.allocate.asvd import asvd_rank, asvd_ratios

    sens = {"a": {0.4: 30.0, 0.6: 12.0, 0.8: 10.5}, "b": {0.4: 11.0, 0.6: 10.2, 0.8: 10.1}}
    sizes = {"a": 100, "b": 300}

    def brute(keep):
        triples = sorted(((p, n, r) for n, row in sens.items() for r, p in row.items()), key=lambda t: -t[0])
        best = None
        for mid in range(len(triples) + 1):
            ratios = {n: min([r for _, m, r in triples[mid:] if m == n], default=1.0) for n in sizes}
            if sum(ratios[n] * sizes[n] for n in sizes) / 400 <= keep:
                best = ratios
        return best

    for keep in (0.45, 0.55, 0.7, 0.85, 0.95):
        assert asvd_ratios(sens, sizes, keep) == brute(keep)
    assert asvd_ratios(sens, sizes, 0.55) == {"a": 0.8, "b": 0.4}  # b is the cheaper one to cut
    assert asvd_rank(64, 160, 0.8) == int(64 * 160 * 0.8) // 224


def test_asvd_sensitivity_is_each_matrix_truncated_alone(tmp_cache):
    """The block-replay sensitivity equals its definition, one whole dense forward per (matrix, ratio) with only
    that matrix truncated, exactly; a table resumed from half its rows is the same table."""
    import math

    from deftlab.allocate.asvd import asvd_rank
    from deftlab.decompose.asvd import batches_nll, scaled_svd, sensitivity
    from deftlab.decompose.targets import target_linears
    from deftlab.decompose.whiten import truncated_factors
    from deftlab.models import load_model

    model = load_model("tiny").model.eval()
    linears = target_linears(model, ("q_proj", "o_proj", "down_proj"))
    g = torch.Generator().manual_seed(0)
    decs = {n: scaled_svd(m.weight, 0.5 + torch.rand(m.in_features, generator=g)) for n, m in linears.items()}
    batches = [{"input_ids": torch.randint(3, 128, (2, 12), generator=g)},
               {"input_ids": torch.randint(3, 128, (1, 9), generator=g),
                "attention_mask": torch.tensor([[1] * 7 + [0] * 2])}]
    ratios = (0.5, 0.8)
    brute = {}
    with torch.inference_mode():
        for name, lin in linears.items():
            original, (m, n) = lin.weight.data, lin.weight.shape
            brute[name] = {}
            for rho in ratios:
                B, A = truncated_factors(decs[name], min(asvd_rank(m, n, rho), decs[name].full_rank))
                lin.weight.data = (B @ A).to(original)
                brute[name][rho] = math.exp(batches_nll(model, batches))
            lin.weight.data = original
    before = [p.clone() for p in model.parameters()]
    seen = []
    table = sensitivity(model, linears, decs, batches, ratios=ratios, progress=False,
                        on_matrix=lambda n, row: seen.append(n))
    assert table == brute and seen == list(linears)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # every block and weight restored
    half = dict(list(brute.items())[: len(brute) // 2])
    seen.clear()
    assert sensitivity(model, linears, decs, batches, ratios=ratios, progress=False, done=half,
                       on_matrix=lambda n, row: seen.append(n)) == brute
    assert seen == list(linears)[len(half):]
    assert len({type(b).__name__ for b in model.model.layers}) == 1  # no replay left behind


def test_asvd_method_end_to_end(env, tmp_path):
    from deftlab.allocate.asvd import asvd_rank

    _, _, report = _build(tmp_path, method="asvd", adapter="lora", keep=0.7, asvd_ratios=[0.5, 0.8],
                          asvd_sensitivity_n=8)
    alloc = report["allocation"]
    assert alloc.method == "asvd" and alloc.keep_fraction <= 0.7
    for name, rho in alloc.info["ratios"].items():
        m, n = alloc.matrices[name]["m"], alloc.matrices[name]["n"]
        assert alloc.ranks[name] == (min(m, n) if rho == 1.0 else asvd_rank(m, n, rho))
    assert report["compress"]["lora_tails"] == {}
