"""Adapters (LoRA/QLoRA/LoftQ via PEFT, full, WeLore LRC) on a tiny random LLaMA, dense and decomposed."""

from __future__ import annotations

import copy
import importlib
import shutil
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from deftlab.adapters import (
    AdapterConfig,
    attach,
    load_adapter,
    load_decomposed_checkpoint,
    lora_target_names,
    merge_for_eval,
    save_decomposed,
)
from deftlab.adapters.lowrank_lora import LowRankLoraLinear
from deftlab.config import ConfigError
from deftlab.decompose.whiten import whitened_svd
from deftlab.errors import DeftlabError
from deftlab.models.tiny import tiny_llama
from deftlab.surgery import LowRankLinear, build_decomposed_model, count_params

attach_mod = importlib.import_module("deftlab.adapters.attach")  # the package attribute is the function
L0 = "model.layers.0."
L1 = "model.layers.1."
R, ALPHA = 4, 16.0  # scaling s = 4 ≠ 1, so a missing 1/s in the DeFT tail shows


# --- decompositions (whitened with a random Gram, so nothing relies on orthogonal factors) ----------------------
def svd_dec(W):
    X = torch.randn(4 * W.shape[1], W.shape[1], generator=torch.Generator().manual_seed(W.shape[0]))
    return whitened_svd(W, X.T @ X)


@dataclass
class Alloc:
    ranks: dict
    factored: dict
    lrc: dict


def allocation() -> Alloc:
    """Layer 0: factored (incl. θ=3 < r), dense-reduced (v) and untouched (o); layer 1: q, down factored."""
    ranks = {L0 + "self_attn.q_proj": 8, L0 + "self_attn.k_proj": 6, L0 + "self_attn.v_proj": 10,
             L0 + "self_attn.o_proj": 64, L0 + "mlp.gate_proj": 12, L0 + "mlp.up_proj": 3, L0 + "mlp.down_proj": 16,
             L1 + "self_attn.q_proj": 20, L1 + "mlp.down_proj": 24}
    factored = {n: True for n in ranks}
    factored[L0 + "self_attn.v_proj"] = False
    factored[L0 + "self_attn.o_proj"] = False
    lrc = {n: n in (L0 + "self_attn.q_proj", L0 + "mlp.gate_proj", L1 + "mlp.down_proj") for n in ranks}
    return Alloc(ranks, factored, lrc)


_DECS: dict = {}


def decompositions():
    """SVDs of the decoder linears of `tiny_llama()` (seed 0), computed once per test module (read-only)."""
    if not _DECS:
        _DECS.update({n: svd_dec(m.weight) for n, m in tiny_llama().named_modules()
                      if isinstance(m, nn.Linear) and ".layers." in n})
    return _DECS


def reference(model, alloc, decs):
    """Dense model whose reduced linears hold the rank-θ reconstruction (computed here, independently)."""
    ref = copy.deepcopy(model)
    for name, rank in alloc.ranks.items():
        lin = ref.get_submodule(name)
        if rank < min(lin.weight.shape):
            d = decs[name]
            lin.weight.data = ((d.U[:, :rank].double() * d.sigma[:rank]) @ d.Vt_Sinv[:rank].double()).float()
    return ref


IDS = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(0))


def logits(model, ids=IDS):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def decomposed(init="deft", lora_rank=R):
    model = tiny_llama()
    alloc, decs = allocation(), decompositions()
    ref = reference(model, alloc, decs)
    model, tails = build_decomposed_model(model, alloc, decs, lora_rank=lora_rank, lora_alpha=ALPHA, init=init)
    return model, tails, alloc, ref


def train_step(model, lr=1e-2):
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    out = model(input_ids=IDS, labels=IDS)
    out.loss.backward()
    opt.step()
    opt.zero_grad()
    model.eval()


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --- config ---------------------------------------------------------------------------------------------------
def test_adapter_config_validates():
    cfg = AdapterConfig.from_dict({"kind": "lora", "r": 8, "alpha": 16, "target_modules": ["q_proj"]})
    assert cfg.scaling == 2.0 and cfg.target_modules == ("q_proj",) and cfg.init == "deft"
    with pytest.raises(ConfigError, match="unknown key"):
        AdapterConfig.from_dict({"kind": "lora", "rank": 8})
    with pytest.raises(ConfigError, match="is not one of"):
        AdapterConfig.from_dict({"kind": "vera"})
    with pytest.raises(ConfigError, match="r: 0"):
        AdapterConfig.from_dict({"kind": "qlora", "r": 0})
    with pytest.raises(ConfigError, match="train_norms"):
        AdapterConfig.from_dict({"kind": "lora", "train_norms": True})


# --- DeFT / vanilla init ----------------------------------------------------------------------------------------
def test_deft_init_reproduces_rank_theta_model_at_step_zero():
    model, tails, _, ref = decomposed("deft")
    assert tails[L0 + "mlp.up_proj"].rank == 3 and L0 + "self_attn.v_proj" in tails  # θ<r and dense-reduced
    pm = attach(model, AdapterConfig(kind="lora", r=R, alpha=ALPHA), deft_tails=tails)
    q = pm.get_base_model().get_submodule(L0 + "self_attn.q_proj")
    assert isinstance(q, LowRankLoraLinear) and q.scaling["default"] == 4.0
    assert q.get_base_layer().rank == 8 - R and q.lora_B["default"].weight.abs().sum() > 0
    torch.testing.assert_close(logits(pm), logits(ref), atol=1e-5, rtol=0)


def test_vanilla_init_freezes_all_theta_components_and_starts_at_b_zero():
    model, tails, _, ref = decomposed("vanilla")
    assert tails == {}
    assert model.get_submodule(L0 + "self_attn.q_proj").rank == 8
    pm = attach(model, AdapterConfig(kind="lora", r=R, alpha=ALPHA, init="vanilla"))
    layers = [m for m in pm.modules() if hasattr(m, "lora_B") and "default" in m.lora_B]
    assert len(layers) == 14 and all(torch.count_nonzero(m.lora_B["default"].weight) == 0 for m in layers)
    torch.testing.assert_close(logits(pm), logits(ref), atol=1e-5, rtol=0)


def test_deft_init_errors_are_specific():
    model, tails, _, _ = decomposed("deft")
    with pytest.raises(DeftlabError, match="needs deft_tails"):
        attach(copy.deepcopy(model), AdapterConfig(kind="lora", r=R, alpha=ALPHA))
    with pytest.raises(DeftlabError, match="scaling 4"):
        attach(copy.deepcopy(model), AdapterConfig(kind="lora", r=R, alpha=8.0), deft_tails=tails)
    with pytest.raises(DeftlabError, match="does not target"):
        attach(copy.deepcopy(model), AdapterConfig(kind="lora", r=R, alpha=ALPHA, target_modules=("q_proj",)),
               deft_tails=tails)
    with pytest.raises(DeftlabError, match="would be lost"):
        attach(copy.deepcopy(model), AdapterConfig(kind="lrc"), deft_tails=tails)


def test_targets_never_match_factor_children():
    model, _, _, _ = decomposed("vanilla")
    # q_proj is decomposed, so "…q_proj.v_proj" exists and ends in ".v_proj"
    assert L0 + "self_attn.q_proj.v_proj" in dict(model.named_modules())
    assert lora_target_names(model, ("v_proj",)) == [L0 + "self_attn.v_proj", L1 + "self_attn.v_proj"]
    pm = attach(model, AdapterConfig(kind="lora", r=R, alpha=ALPHA, init="vanilla", target_modules=("v_proj",)))
    wrapped = [n for n, m in pm.get_base_model().named_modules() if hasattr(m, "lora_A")]
    assert wrapped == [L0 + "self_attn.v_proj", L1 + "self_attn.v_proj"]


def test_lora_on_dense_model_uses_peft_linear_and_standard_init():
    from peft.tuners.lora.layer import Linear as PeftLinear

    dense = tiny_llama()
    expected = logits(dense)
    pm = attach(dense, AdapterConfig(kind="lora", r=R, alpha=ALPHA))  # init "deft" without a decomposition
    q = pm.get_base_model().get_submodule(L0 + "self_attn.q_proj")
    assert type(q) is PeftLinear and torch.count_nonzero(q.lora_B["default"].weight) == 0
    assert count_params(pm)["trainable"] == 8960  # 2 layers × (q 4·128 + k,v 4·96 + o 4·128 + 3 · 4·224)
    torch.testing.assert_close(logits(pm), expected, atol=1e-6, rtol=0)


# --- what trains ------------------------------------------------------------------------------------------------
def test_lora_step_changes_only_lora_parameters():
    model, tails, _, _ = decomposed("deft")
    pm = attach(model, AdapterConfig(kind="lora", r=R, alpha=ALPHA, dropout=0.0), deft_tails=tails)
    c = count_params(pm)
    assert c["trainable"] == c["by_kind"]["lora"]["total"] == 2 * (4 * 128 + 4 * 96 * 2 + 4 * 128 + 3 * 4 * 224)
    before = snapshot(pm)
    train_step(pm)
    after = snapshot(pm)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("lora_" in k for k in changed)
    assert any(k.startswith("base_model.model." + L0) for k in changed)  # gradients reach layer 0


def test_lrc_trains_only_lrc_factors():
    model, _, alloc, _ = decomposed("vanilla", lora_rank=0)
    model = attach(model, AdapterConfig(kind="lrc"), allocation=alloc)
    lrc_prefixes = tuple(n + "." for n, f in alloc.lrc.items() if f)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {p + c + ".weight" for p in lrc_prefixes for c in ("u_proj", "v_proj")}
    assert count_params(model)["trainable"] == 8 * 128 + 12 * 224 + 24 * 224
    before = snapshot(model)
    train_step(model)
    after = snapshot(model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == trainable  # N-LRC factors (k_proj, up_proj, …), dense weights, norms, embeddings: identical
    norms = attach(decomposed("vanilla", 0)[0], AdapterConfig(kind="lrc", train_norms=True), allocation=alloc)
    assert norms.model.norm.weight.requires_grad and count_params(norms)["trainable"] == count_params(model)[
        "trainable"] + 320


def test_lrc_requires_decomposed_lrc_matrices():
    model, _, alloc, _ = decomposed("vanilla", lora_rank=0)
    alloc.lrc[L0 + "self_attn.v_proj"] = True  # kept dense
    with pytest.raises(DeftlabError, match="not decomposed"):
        attach(model, AdapterConfig(kind="lrc"), allocation=alloc)
    with pytest.raises(DeftlabError, match="needs the allocation"):
        attach(model, AdapterConfig(kind="lrc"))


def test_full_and_none():
    model, _, _, _ = decomposed("vanilla", lora_rank=0)
    full = attach(model, AdapterConfig(kind="full"))
    assert count_params(full)["trainable"] == count_params(full)["total"]
    none = attach(full, AdapterConfig(kind="none"))
    assert count_params(none)["trainable"] == 0


# --- merging and saving -----------------------------------------------------------------------------------------
def test_merge_for_eval_concatenates_factors_and_matches_unmerged():
    model, tails, _, _ = decomposed("deft")
    pm = attach(model, AdapterConfig(kind="lora", r=R, alpha=ALPHA, dropout=0.0), deft_tails=tails)
    train_step(pm)
    expected = logits(pm)
    merged = merge_for_eval(pm)
    q = merged.get_submodule(L0 + "self_attn.q_proj")
    assert isinstance(q, LowRankLinear) and q.rank == 8  # θ−r frozen + r LoRA = θ
    assert type(merged.get_submodule(L0 + "self_attn.v_proj")) is nn.Linear
    assert not any("lora" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(logits(merged), expected, atol=1e-5, rtol=0)


def test_peft_merge_unmerge_on_lowrank_layer_round_trips():
    model, tails, _, _ = decomposed("deft")
    pm = attach(model, AdapterConfig(kind="lora", r=R, alpha=ALPHA, dropout=0.0), deft_tails=tails)
    train_step(pm)
    layer = pm.get_base_model().get_submodule(L1 + "mlp.down_proj")
    x = torch.randn(3, 160)
    with torch.no_grad():
        y = layer(x)
        u_before = layer.get_base_layer().u_proj
        layer.merge()
        assert layer.get_base_layer().rank == 24
        torch.testing.assert_close(layer(x), y, atol=1e-5, rtol=0)
        layer.unmerge()
        assert layer.get_base_layer().u_proj is u_before
        torch.testing.assert_close(layer(x), y, atol=1e-6, rtol=0)


def test_save_and_reload_decomposed_model_with_adapter(tmp_path):
    model, tails, alloc, _ = decomposed("deft")
    pm = attach(model, AdapterConfig(kind="lora", r=R, alpha=ALPHA, dropout=0.0), deft_tails=tails)
    train_step(pm)
    save_decomposed(pm, alloc, tmp_path)
    loaded = load_decomposed_checkpoint(tmp_path, tiny_llama)
    assert isinstance(loaded.get_base_model().get_submodule(L0 + "self_attn.q_proj"), LowRankLoraLinear)
    assert torch.equal(logits(loaded), logits(pm))
    # the adapter alone also reloads onto a freshly rebuilt base
    shutil.move(tmp_path / "adapter", tmp_path / "alone")
    base = load_decomposed_checkpoint(tmp_path, tiny_llama)
    assert isinstance(base.get_submodule(L0 + "self_attn.q_proj"), LowRankLinear)
    again = load_adapter(base, str(tmp_path / "alone"))
    assert torch.equal(logits(again), logits(pm))


# --- 4-bit ------------------------------------------------------------------------------------------------------
def test_qlora_quantises_base_and_factors_trains_and_merges():
    import bitsandbytes as bnb
    from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit

    model, tails, _, ref = decomposed("deft")
    pm = attach(model, AdapterConfig(kind="qlora", r=R, alpha=ALPHA, dropout=0.0), deft_tails=tails)
    base = pm.get_base_model()
    q = base.get_submodule(L0 + "self_attn.q_proj")
    assert isinstance(q, LowRankLoraLinear)
    assert isinstance(q.get_base_layer().u_proj, bnb.nn.Linear4bit)
    assert isinstance(q.get_base_layer().v_proj.weight, bnb.nn.Params4bit)
    dense = base.get_submodule(L1 + "self_attn.k_proj")
    assert isinstance(dense, PeftLinear4bit) and isinstance(dense.get_base_layer(), bnb.nn.Linear4bit)
    assert type(base.lm_head) is nn.Linear
    rel = (logits(pm) - logits(ref)).norm() / logits(ref).norm()
    assert rel < 0.25  # NF4 error only; the tails are exact
    before = snapshot(pm)
    train_step(pm)
    changed = {k for k, v in snapshot(pm).items() if not torch.equal(before[k], v)}
    assert changed and all("lora_" in k for k in changed)
    assert any(L0 + "self_attn.q_proj.lora_A" in k for k in changed)  # input gradients flow through 4-bit layers
    expected = logits(pm)
    merged = merge_for_eval(pm)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in merged.modules())
    torch.testing.assert_close(logits(merged), expected, atol=1e-5, rtol=0)


def test_loftq_on_cpu_and_on_decomposed_layers_uses_deftlab_init(monkeypatch):
    """Without CUDA (PEFT's LoftQ needs it) and on factored layers, deftlab's LoftQ init runs: NF4 bases, a LoRA
    that fits the quantisation residual plus DeFT's tail, so step 0 is closer to the rank-θ model than QLoRA's."""
    import bitsandbytes as bnb

    monkeypatch.setattr(attach_mod, "_loftq_device_available", lambda: False)
    model, tails, _, ref = decomposed("deft")
    qmodel, qtails, _, _ = decomposed("deft")
    pm = attach(model, AdapterConfig(kind="loftq", r=R, alpha=ALPHA, dropout=0.0), deft_tails=tails)
    pq = attach(qmodel, AdapterConfig(kind="qlora", r=R, alpha=ALPHA, dropout=0.0), deft_tails=qtails)
    q = pm.get_base_model().get_submodule(L0 + "self_attn.q_proj")
    assert isinstance(q, LowRankLoraLinear) and isinstance(q.get_base_layer().u_proj, bnb.nn.Linear4bit)
    dense = pm.get_base_model().get_submodule(L1 + "self_attn.k_proj")
    assert isinstance(dense.get_base_layer(), bnb.nn.Linear4bit)
    err_loftq = ((logits(pm) - logits(ref)).norm() / logits(ref).norm()).item()
    err_qlora = ((logits(pq) - logits(ref)).norm() / logits(ref).norm()).item()
    assert err_loftq < 0.9 * err_qlora, (err_loftq, err_qlora)
    before = snapshot(pm)
    train_step(pm)
    changed = {k for k, v in snapshot(pm).items() if not torch.equal(before[k], v)}
    assert changed and all("lora_" in k for k in changed)

    dense_model = tiny_llama()
    W = dense_model.get_submodule(L0 + "mlp.gate_proj").weight.detach().clone()
    pd = attach(dense_model, AdapterConfig(kind="loftq", r=R, alpha=ALPHA, init="vanilla", dropout=0.0))
    layer = pd.get_base_model().get_submodule(L0 + "mlp.gate_proj")
    x = torch.randn(5, W.shape[1], generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        exact, y, y_base = x @ W.T, layer(x), layer.get_base_layer()(x)
    assert (y - exact).norm() < 0.95 * (y_base - exact).norm()


def _cpu_loftq_init(weight, num_bits, reduced_rank, num_iter=1):
    """peft's loftq_init algorithm computed on CPU (peft hard-codes cuda/xpu)."""
    import bitsandbytes.functional as F

    W = weight.float()
    res = W.clone()
    for i in range(num_iter):
        q, state = F.quantize_4bit(res.contiguous(), quant_type="nf4", compress_statistics=False)
        deq = F.dequantize_4bit(q, state)
        U, S, Vh = torch.linalg.svd(W - deq, full_matrices=False)
        L, Rt = U[:, :reduced_rank] * S[:reduced_rank].sqrt(), S[:reduced_rank].sqrt()[:, None] * Vh[:reduced_rank]
        res = W - L @ Rt
    return deq.to(weight.dtype), Rt, L


def test_loftq_wiring_rescales_and_requantises_exactly(monkeypatch):
    import bitsandbytes as bnb
    import peft.tuners.lora.layer as lora_layer

    monkeypatch.setattr(attach_mod, "_loftq_device_available", lambda: True)
    monkeypatch.setattr(lora_layer, "loftq_init", _cpu_loftq_init)
    dense = tiny_llama()
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(4))
    W = dense.get_submodule(L0 + "mlp.gate_proj").weight.detach().clone()
    pm = attach(dense, AdapterConfig(kind="loftq", r=R, alpha=ALPHA, init="vanilla", dropout=0.0))
    layer = pm.get_base_model().get_submodule(L0 + "mlp.gate_proj")
    assert isinstance(layer.get_base_layer(), bnb.nn.Linear4bit)
    with torch.no_grad():
        exact = x @ W.T
        y = layer(x)
        y_base = layer.get_base_layer()(x)
    err_loftq, err_q = (y - exact).norm(), (y_base - exact).norm()
    assert err_loftq < 0.95 * err_q  # the rescaled LoRA corrects part of the NF4 error (α/r = 4 ≠ 1)
