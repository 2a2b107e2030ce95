"""Model surgery on a tiny random LLaMA (GQA: q/o 64×64, k/v 32×64, gate/up 160×64, down 64×160)."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import deftlab.surgery.replace as replace_mod

from deftlab.decompose.whiten import whitened_svd
from deftlab.errors import DeftlabError
from deftlab.models.tiny import tiny_llama
from deftlab.adapters import load_decomposed_checkpoint, read_rank_map, save_decomposed
from deftlab.surgery import (
    LoadReport,
    LowRankLinear,
    build_decomposed_model,
    count_params,
    load_decomposed,
    plan_module,
    quantize_dense_linears,
    quantize_lowrank,
    replace_linears,
)

L0 = "model.layers.0."
L1 = "model.layers.1."


def svd_dec(W: torch.Tensor):
    return whitened_svd(W, None)  # plain SVD; test_adapters uses whitened ones


def reconstruction(dec, rank: int) -> torch.Tensor:
    """Rank-θ reconstruction computed independently of the code under test."""
    return ((dec.U[:, :rank].double() * dec.sigma[:rank].double()) @ dec.Vt_Sinv[:rank].double()).float()


@dataclass
class Alloc:
    ranks: dict
    factored: dict
    lrc: dict


_DECS: dict = {}


def decompositions():
    """SVDs of the decoder linears of `tiny_llama()` (seed 0), computed once per test module (read-only)."""
    if not _DECS:
        _DECS.update({n: svd_dec(m.weight) for n, m in tiny_llama().named_modules()
                      if isinstance(m, nn.Linear) and ".layers." in n})
    return _DECS


def mixed_allocation() -> Alloc:
    """Layer 0 decomposed in every way; layer 1 untouched."""
    ranks = {L0 + "self_attn.q_proj": 8, L0 + "self_attn.k_proj": 4, L0 + "self_attn.v_proj": 8,
             L0 + "self_attn.o_proj": 64, L0 + "mlp.gate_proj": 10, L0 + "mlp.up_proj": 10, L0 + "mlp.down_proj": 12}
    factored = {n: True for n in ranks}
    factored[L0 + "self_attn.v_proj"] = False  # dense rank-8 reconstruction
    factored[L0 + "self_attn.o_proj"] = False  # untouched
    lrc = {n: n.endswith(("q_proj", "gate_proj")) for n in ranks}
    return Alloc(ranks, factored, lrc)


def reference_model(model, alloc, decs):
    ref = copy.deepcopy(model)
    for name, rank in alloc.ranks.items():
        if rank < min(ref.get_submodule(name).weight.shape):
            ref.get_submodule(name).weight.data = reconstruction(decs[name], rank)
    return ref


def logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(ids).logits


IDS = torch.randint(3, 128, (2, 11), generator=torch.Generator().manual_seed(0))


# --- LowRankLinear ---------------------------------------------------------------------------------------------
def test_lowrank_linear_computes_factor_product_and_takes_the_given_tensors():
    g = torch.Generator().manual_seed(1)
    W_u, W_v, b = torch.randn(5, 3, generator=g), torch.randn(3, 7, generator=g), torch.randn(5, generator=g)
    m = LowRankLinear.from_factors(W_u, W_v, b)
    x = torch.randn(4, 7, generator=g)
    torch.testing.assert_close(m(x), x @ (W_u @ W_v).T + b)
    assert (m.in_features, m.out_features, m.rank) == (7, 5, 3)
    assert m.u_proj.weight.data_ptr() == W_u.data_ptr() and m.v_proj.weight.data_ptr() == W_v.data_ptr()
    assert type(m.u_proj) is nn.Linear and m.v_proj.bias is None
    with pytest.raises(DeftlabError, match="do not chain"):
        LowRankLinear.from_factors(W_u, W_v.T)


def test_replace_linears_by_name_keeps_other_modules_and_checks_shapes():
    model = tiny_llama()
    k_before = model.model.layers[0].self_attn.k_proj
    name = L0 + "mlp.gate_proj"
    W_u, W_v = torch.randn(160, 5), torch.randn(5, 64)
    replace_linears(model, {name: (W_u, W_v), L1 + "self_attn.v_proj": torch.zeros(32, 64)})
    assert isinstance(model.get_submodule(name), LowRankLinear) and model.get_submodule(name).rank == 5
    assert model.model.layers[0].self_attn.k_proj is k_before
    assert torch.count_nonzero(model.get_submodule(L1 + "self_attn.v_proj").weight) == 0
    with pytest.raises(DeftlabError, match="no module named"):
        replace_linears(model, {"model.layers.9.mlp.up_proj": (W_u, W_v)})
    with pytest.raises(DeftlabError, match="the layer is 32×64"):
        replace_linears(model, {L0 + "self_attn.k_proj": (W_u, W_v)})
    with pytest.raises(DeftlabError, match="not an nn.Linear"):
        replace_linears(model, {"model.norm": torch.zeros(64)})


def test_plan_module_splits_theta_into_frozen_and_scaled_tail():
    dec = svd_dec(torch.randn(40, 24, generator=torch.Generator().manual_seed(2)))
    (W_u, W_v), tail = plan_module(dec, rank=10, full_rank=24, factored=True, lora_rank=4, scaling=4.0)
    assert W_u.shape == (40, 6) and W_v.shape == (6, 24) and tail.A.shape == (4, 24) and tail.B.shape == (40, 4)
    torch.testing.assert_close(W_u @ W_v + 4.0 * tail.B @ tail.A, reconstruction(dec, 10), atol=1e-5, rtol=0)
    # the frozen part alone is the rank-6 reconstruction: the tail is the *smallest* kept components
    torch.testing.assert_close(W_u @ W_v, reconstruction(dec, 6), atol=1e-5, rtol=0)
    # θ ≤ r: all kept components go to the LoRA
    (W_u, W_v), tail = plan_module(dec, rank=3, full_rank=24, factored=True, lora_rank=4, scaling=4.0)
    assert W_u.shape == (40, 0) and tail.rank == 3
    torch.testing.assert_close(4.0 * tail.B @ tail.A, reconstruction(dec, 3), atol=1e-5, rtol=0)
    # dense-kept: a reconstruction, no tail for vanilla; untouched at full rank
    dense, tail = plan_module(dec, rank=10, full_rank=24, factored=False, lora_rank=4, scaling=4.0, init="vanilla")
    assert tail is None and torch.linalg.matrix_rank(dense) == 10
    assert plan_module(dec, rank=24, full_rank=24, factored=False) == (None, None)


def test_build_decomposed_model_equals_rank_theta_reconstruction():
    model = tiny_llama()
    alloc, decs = mixed_allocation(), decompositions()
    ref = reference_model(model, alloc, decs)
    o_proj = model.get_submodule(L0 + "self_attn.o_proj")
    model, tails = build_decomposed_model(model, alloc, decs)
    assert tails == {}
    assert isinstance(model.get_submodule(L0 + "mlp.down_proj"), LowRankLinear)
    assert model.get_submodule(L0 + "mlp.down_proj").rank == 12
    v = model.get_submodule(L0 + "self_attn.v_proj")
    assert type(v) is nn.Linear and torch.linalg.matrix_rank(v.weight) == 8
    assert model.get_submodule(L0 + "self_attn.o_proj") is o_proj  # full rank: untouched
    torch.testing.assert_close(logits(model, IDS), logits(ref, IDS), atol=1e-5, rtol=0)
    dense = logits(tiny_llama(), IDS)
    assert (logits(model, IDS) - dense).abs().max() > 1e-3  # the reduction really changed the model


def test_build_rejects_missing_decomposition_and_bad_allocation():
    model = tiny_llama()
    alloc = mixed_allocation()
    with pytest.raises(DeftlabError, match="no decomposition"):
        build_decomposed_model(model, alloc, {})
    alloc.ranks[L0 + "mlp.up_proj"] = 0
    with pytest.raises(DeftlabError, match="rank 0 < 1"):
        build_decomposed_model(tiny_llama(), alloc, decompositions())


# --- parameter accounting --------------------------------------------------------------------------------------
def test_count_params_exact_dense_and_decomposed():
    model = tiny_llama()
    c = count_params(model)
    # per layer: q 4096 + k 2048 + v 2048 + o 4096 + gate/up/down 3·10240 = 43008; norms 2·2·64 + 64; embed 128·64 (tied)
    assert c["decoder_linear"] == 2 * 43008
    assert c["by_kind"]["norm"]["total"] == 320 and c["by_kind"]["embedding"]["total"] == 8192
    assert c["by_kind"]["lm_head"]["total"] == 0  # tied: counted once, as the embedding
    assert c["total"] == c["trainable"] == 86016 + 320 + 8192
    model, _ = build_decomposed_model(model, mixed_allocation(), decompositions())
    c = count_params(model)
    # layer 0: q 8·128 + k 4·96 + v dense 2048 + o 4096 + gate 10·224 + up 10·224 + down 12·224
    assert c["by_kind"]["lowrank_factor"]["total"] == 1024 + 384 + 2240 + 2240 + 2688
    assert c["by_kind"]["dense_linear"]["total"] == 2048 + 4096 + 43008
    assert c["decoder_linear"] == 14720 + 43008
    assert c["total"] == 14720 + 43008 + 320 + 8192
    model.requires_grad_(False)
    model.model.norm.weight.requires_grad_(True)
    assert count_params(model)["trainable"] == 64


def test_count_params_counts_4bit_weights_logically():
    model = tiny_llama()
    model, _ = build_decomposed_model(model, mixed_allocation(), decompositions())
    before = count_params(model)
    quantize_lowrank(model)
    quantize_dense_linears(model)
    after = count_params(model)
    assert after["total"] == before["total"] and after["by_kind"] == {
        k: {"total": v["total"], "trainable": 0 if k in ("lowrank_factor", "dense_linear") else v["trainable"]}
        for k, v in before["by_kind"].items()
    }
    packed = model.get_submodule(L1 + "mlp.up_proj").weight
    assert packed.dtype == torch.uint8 and packed.numel() == 160 * 64 // 2


# --- 4-bit ----------------------------------------------------------------------------------------------------
def test_quantize_holds_factors_and_dense_weights_in_nf4():
    import bitsandbytes as bnb

    model = tiny_llama()
    model, _ = build_decomposed_model(model, mixed_allocation(), decompositions())
    ref = logits(model, IDS)
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref_gate, ref_k = model.get_submodule(L0 + "mlp.gate_proj")(x), model.get_submodule(L1 + "self_attn.k_proj")(x)
    assert quantize_lowrank(model) == [L0 + n for n in ("self_attn.q_proj", "self_attn.k_proj", "mlp.gate_proj",
                                                         "mlp.up_proj", "mlp.down_proj")]
    names = quantize_dense_linears(model)
    assert "lm_head" not in names and L1 + "mlp.down_proj" in names and L0 + "self_attn.v_proj" in names
    assert model.is_loaded_in_4bit
    low = model.get_submodule(L0 + "mlp.gate_proj")
    for child in (low.u_proj, low.v_proj, model.get_submodule(L1 + "self_attn.k_proj")):
        assert isinstance(child, bnb.nn.Linear4bit)
        assert isinstance(child.weight, bnb.nn.Params4bit) and child.weight.dtype == torch.uint8
        assert child.weight.quant_type == "nf4"
    assert type(model.lm_head) is nn.Linear
    with torch.no_grad():  # NF4 keeps ~10% relative error per matrix on Gaussian weights
        for out, exact in ((low(x), ref_gate), (model.get_submodule(L1 + "self_attn.k_proj")(x), ref_k)):
            assert 1e-3 < (out - exact).norm() / exact.norm() < 0.15
    out = logits(model, IDS)  # eval + no_grad: bnb's CPU repacking path (rank 10 is not a multiple of 32)
    rel = (out - ref).norm() / ref.norm()
    assert 1e-3 < rel < 0.25, rel  # quantised (not identical), but close


def test_missing_4bit_support_is_a_clear_error(monkeypatch):
    import deftlab.surgery.quantize as quantize_mod

    quantize_mod.check_4bit_support("cpu")  # bitsandbytes 0.50 quantises on CPU here
    monkeypatch.setattr(quantize_mod, "_probe", lambda device_type: "RuntimeError: no kernel")
    with pytest.raises(DeftlabError, match="cannot quantise to 4-bit on cpu .*use adapter kind 'lora'"):
        quantize_dense_linears(tiny_llama())


# --- selective loading ----------------------------------------------------------------------------------------
def test_selective_loading_matches_dense_then_replace_and_never_reads_replaced_weights(tmp_path, monkeypatch):
    tiny_llama().save_pretrained(tmp_path)
    alloc = mixed_allocation()
    decs = decompositions()
    dense_model, _ = load_decomposed(tmp_path, alloc, decs, selective=False)

    read: list[str] = []
    real_open = replace_mod.safe_open

    class Recording:
        def __init__(self, *a, **k):
            self.f = real_open(*a, **k)

        def __enter__(self):
            self.inner = self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def keys(self):
            return self.inner.keys()

        def get_slice(self, key):
            return self.inner.get_slice(key)

        def get_tensor(self, key):
            read.append(key)
            return self.inner.get_tensor(key)

    monkeypatch.setattr(replace_mod, "safe_open", Recording)
    report = LoadReport()
    model, tails = load_decomposed(tmp_path, alloc, decs, selective=True, report=report)
    replaced = {L0 + n + ".weight" for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    assert replaced == set(report.skipped)
    assert not replaced & set(read) and L0 + "self_attn.o_proj.weight" in read
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    torch.testing.assert_close(logits(model, IDS), logits(dense_model, IDS), atol=1e-6, rtol=0)
    assert count_params(model)["total"] == count_params(dense_model)["total"]


def test_selective_loading_fails_loudly_on_missing_tensors(tmp_path):
    from safetensors.torch import save_file

    model = tiny_llama()
    sd = {k: v for k, v in model.state_dict().items() if k != "model.norm.weight" and k != "lm_head.weight"}
    save_file(sd, str(tmp_path / "w.safetensors"))
    with pytest.raises(DeftlabError, match="model.norm.weight"):
        load_decomposed(tmp_path / "w.safetensors", mixed_allocation(), decompositions(), model_factory=tiny_llama)


# --- checkpoints ----------------------------------------------------------------------------------------------
def test_save_load_decomposed_round_trip(tmp_path):
    model = tiny_llama()
    alloc = mixed_allocation()
    model, _ = build_decomposed_model(model, alloc, decompositions())
    save_decomposed(model, alloc, tmp_path)
    rank_map = json.loads((tmp_path / "rank_map.json").read_text())
    assert rank_map == read_rank_map(tmp_path)
    q = rank_map["modules"][L0 + "self_attn.q_proj"]
    assert q == {"rank": 8, "factored": True, "shape": [64, 64], "lrc": True, "full_rank": 64}
    assert rank_map["modules"][L0 + "self_attn.v_proj"]["factored"] is False
    assert rank_map["tied"] == {"lm_head.weight": "model.embed_tokens.weight"} and rank_map["lora"] is None
    assert not list(tmp_path.glob("*.bin")) and not list(tmp_path.glob("*.pt"))
    loaded = load_decomposed_checkpoint(tmp_path, tiny_llama)
    assert loaded.get_submodule(L0 + "mlp.down_proj").rank == 12
    assert torch.equal(logits(loaded, IDS), logits(model, IDS))
    loaded_hf = load_decomposed_checkpoint(tmp_path)  # architecture from the saved config.json
    assert torch.equal(logits(loaded_hf, IDS), logits(model, IDS))


def test_load_checkpoint_rejects_foreign_rank_map(tmp_path):
    (tmp_path / "rank_map.json").write_text(json.dumps({"format": "other", "modules": {}}))
    with pytest.raises(DeftlabError, match="not a deftlab-decomposed"):
        load_decomposed_checkpoint(tmp_path, tiny_llama)
