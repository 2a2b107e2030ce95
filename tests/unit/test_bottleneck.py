"""LLM-Adapters' series / parallel bottleneck adapters on the tiny random LLaMA, dense and decomposed."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from deftlab.adapters import AdapterConfig, BottleneckAdapter, attach, attach_bottleneck
from deftlab.config import ConfigError
from deftlab.decompose.whiten import whitened_svd
from deftlab.errors import DeftlabError
from deftlab.models.tiny import tiny_llama
from deftlab.surgery import LowRankLinear, build_decomposed_model, count_params

H, I, LAYERS, B = 64, 160, 2, 16  # tiny_llama: hidden, intermediate, layers; a bottleneck narrower than H
KINDS = ("series", "parallel")
IDS = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(0))


def logits(model, ids=IDS):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def cfg(kind, **kw):
    return AdapterConfig(kind=kind, **{"bottleneck_size": B, **kw})


@torch.no_grad()
def randomise_up(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, BottleneckAdapter):
            m.adapter_up.weight.copy_(0.1 * torch.randn(m.adapter_up.weight.shape, generator=g))


@dataclass
class Alloc:
    ranks: dict
    factored: dict
    lrc: dict


def decomposed_mlps():
    """tiny_llama with every MLP projection factored (LowRankLinear) or rank-reduced in place."""
    model = tiny_llama()
    ranks, factored = {}, {}
    for layer in range(LAYERS):
        for proj, rank, fac in (("gate_proj", 12, True), ("up_proj", 20, False), ("down_proj", 16, True)):
            name = f"model.layers.{layer}.mlp.{proj}"
            ranks[name], factored[name] = rank, fac
    decs = {}
    for n in ranks:
        W = model.get_submodule(n).weight
        X = torch.randn(4 * W.shape[1], W.shape[1], generator=torch.Generator().manual_seed(W.shape[0]))
        decs[n] = whitened_svd(W, X.T @ X)
    model, _ = build_decomposed_model(model, Alloc(ranks, factored, {n: False for n in ranks}), decs, lora_rank=0)
    return model


# --- (1) step 0 ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_step0_logits_equal_the_base_model(kind):
    base = logits(tiny_llama())
    model = attach(tiny_llama(), cfg(kind))  # through the generic entry point
    assert all(isinstance(model.model.layers[i].mlp, BottleneckAdapter) for i in range(LAYERS))
    assert all(torch.count_nonzero(m.adapter_up.weight) == 0 for m in model.modules()
               if isinstance(m, BottleneckAdapter))
    torch.testing.assert_close(logits(model), base, atol=0, rtol=0)


# --- (2) what trains, and how much --------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_only_adapter_weights_train_and_their_count_is_exact(kind):
    dense_counts = count_params(tiny_llama())
    model = attach_bottleneck(tiny_llama(), cfg(kind))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"model.layers.{i}.mlp.adapter_{w}.weight" for i in range(LAYERS) for w in ("down", "up")}
    c = count_params(model)
    expected = LAYERS * 2 * H * B  # W_down (H→B) + W_up (B→H), no biases (LLM-Adapters' bias "none")
    assert c["trainable"] == c["by_kind"]["adapter"]["total"] == expected
    assert c["total"] == dense_counts["total"] + expected
    assert c["decoder_linear"] == dense_counts["decoder_linear"]  # adapters are not decoder projections
    # LLM-Adapters' default width
    assert count_params(attach_bottleneck(tiny_llama(), AdapterConfig(kind=kind)))["trainable"] == LAYERS * 2 * H * 256


# --- (3) where the adapter reads its input ----------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_output_matches_a_manual_computation(kind):
    ref_mlp = tiny_llama().model.layers[0].mlp
    model = attach_bottleneck(tiny_llama(), cfg(kind, adapter_scaling=0.5))
    randomise_up(model)
    wrapper = model.model.layers[0].mlp
    Wd, Wu = wrapper.adapter_down.weight, wrapper.adapter_up.weight
    x = torch.randn(2, 5, H, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        f = ref_mlp(x)
        h = f if kind == "series" else x  # series: after the MLP; parallel: from the MLP's input
        expected = f + 0.5 * torch.tanh(h @ Wd.T) @ Wu.T
        torch.testing.assert_close(wrapper(x), expected, atol=1e-6, rtol=1e-5)
        other = f + 0.5 * torch.tanh((x if kind == "series" else f) @ Wd.T) @ Wu.T
        assert (wrapper(x) - other).abs().max() > 1e-3  # the two placements really differ


def test_series_and_parallel_models_differ_once_trained_weights_are_nonzero():
    out = {}
    for kind in KINDS:
        torch.manual_seed(0)  # same W_down for both
        model = attach_bottleneck(tiny_llama(), cfg(kind))
        randomise_up(model)
        out[kind] = logits(model)
    assert (out["series"] - out["parallel"]).abs().max() > 1e-4


# --- (4) training -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_a_few_steps_lower_the_loss_and_change_only_adapters(kind):
    model = attach_bottleneck(tiny_llama(), cfg(kind))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(5):
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


# --- (5) configuration errors ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("data, match", [
    ({"kind": "series", "bottleneck_size": 0}, "bottleneck_size: 0 < 1"),
    ({"kind": "parallel", "adapter_scaling": 0.0}, "adapter_scaling"),
    ({"kind": "series", "bottleneck_targets": []}, "bottleneck_targets is empty"),
    ({"kind": "series", "non_linearity": "swish"}, "is not one of"),
    ({"kind": "lora", "bottleneck_size": 64}, "bottleneck_size only applies to kinds 'series'/'parallel'"),
    ({"kind": "full", "non_linearity": "relu"}, "non_linearity only applies"),
])
def test_bad_configs_raise_config_errors(data, match):
    with pytest.raises(ConfigError, match=match):
        AdapterConfig.from_dict(data)


def test_defaults_follow_llm_adapters_and_other_kinds_are_untouched():
    c = AdapterConfig.from_dict({"kind": "series"})
    assert (c.bottleneck_size, c.adapter_scaling, c.non_linearity, c.bottleneck_targets) == (256, 1.0, "tanh",
                                                                                           ("mlp",))
    AdapterConfig.from_dict({"kind": "lora"})  # the bottleneck defaults do not trip other kinds' validation
    with pytest.raises(DeftlabError, match="needs kind 'series' or 'parallel'"):
        attach_bottleneck(tiny_llama(), AdapterConfig(kind="lora"))


# --- placement and model variants ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_wraps_decomposed_mlps_and_keeps_the_decomposed_model_at_step0(kind):
    model = decomposed_mlps()
    before = logits(model)
    model = attach(model, cfg(kind))
    wrapper = model.model.layers[0].mlp
    assert isinstance(wrapper, BottleneckAdapter) and isinstance(wrapper.base_layer.down_proj, LowRankLinear)
    torch.testing.assert_close(logits(model), before, atol=0, rtol=0)
    assert count_params(model)["trainable"] == LAYERS * 2 * H * B
    randomise_up(model)
    assert (logits(model) - before).abs().max() > 1e-4


def test_per_linear_targets_as_in_llm_adapters_llama_parallel_command():
    # LLM-Adapters' LLaMA math command for the parallel adapter targets up_proj and down_proj
    model = attach_bottleneck(tiny_llama(), cfg("parallel", bottleneck_targets=("up_proj", "down_proj")))
    up = model.model.layers[0].mlp.up_proj
    assert isinstance(up, BottleneckAdapter) and up.adapter_down.in_features == H and up.adapter_up.out_features == I
    assert count_params(model)["trainable"] == LAYERS * ((H * B + B * I) + (I * B + B * H))
    torch.testing.assert_close(logits(model), logits(tiny_llama()), atol=0, rtol=0)


def test_target_errors():
    with pytest.raises(DeftlabError, match="no module matches"):
        attach_bottleneck(tiny_llama(), cfg("series", bottleneck_targets=("ffn",)))
    with pytest.raises(DeftlabError, match="overlap"):
        attach_bottleneck(tiny_llama(), cfg("series", bottleneck_targets=("mlp", "down_proj")))
    model = attach_bottleneck(tiny_llama(), cfg("series"))
    with pytest.raises(DeftlabError, match="already has bottleneck adapters"):
        attach_bottleneck(model, cfg("series"))
    # factor children of a decomposed layer never match a projection name ("…down_proj.v_proj")
    model = attach_bottleneck(decomposed_mlps(), cfg("parallel", bottleneck_targets=("v_proj",)))
    wrapped = [n for n, m in model.named_modules() if isinstance(m, BottleneckAdapter)]
    assert wrapped == [f"model.layers.{i}.self_attn.v_proj" for i in range(LAYERS)]


def test_half_precision_model_keeps_float32_adapters():
    model = attach_bottleneck(tiny_llama().to(torch.bfloat16), cfg("parallel"))
    wrapper = model.model.layers[0].mlp
    assert wrapper.adapter_down.weight.dtype == torch.float32
    assert logits(model).dtype == torch.bfloat16


def test_adapter_weights_round_trip_through_safetensors(tmp_path):
    from deftlab.train.trainer import save_safetensors_atomic, trainable_state

    model = attach_bottleneck(tiny_llama(), cfg("series"))
    randomise_up(model)
    save_safetensors_atomic(trainable_state(model), tmp_path / "w.safetensors")
    state = load_file(str(tmp_path / "w.safetensors"))
    assert set(state) == {n for n, p in model.named_parameters() if p.requires_grad}
    fresh = attach_bottleneck(tiny_llama(), cfg("series"))
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    assert not unexpected and all(not p.requires_grad for n, p in fresh.named_parameters() if n in missing)
    torch.testing.assert_close(logits(fresh), logits(model), atol=0, rtol=0)


def test_module_features_of_a_block_without_hidden_size_is_an_error():
    from deftlab.adapters.bottleneck import module_features

    assert module_features(nn.Linear(3, 5)) == (3, 5)
    with pytest.raises(DeftlabError, match="cannot tell the width"):
        module_features(nn.Sequential(nn.ReLU()))
