"""Block-by-block decomposition and selective building (DecompositionConfig.blockwise): the model is never loaded
dense, yet the statistics, ranks, tails and built model equal the whole-model pipeline's, NF4 included."""

import dataclasses

import pytest
import torch

from deftlab.config import ConfigError
from deftlab.decompose.config import DecompositionConfig
from deftlab.models.loading import load_model
from deftlab.recipes import compress
from deftlab.recipes.compress import compress_model
from deftlab.recipes.finetune import FinetuneConfig, build_model
from deftlab.surgery.quantize import is_4bit
from deftlab.surgery.replace import checkpoint_files, load_decomposed

BASE = DecompositionConfig(keep=0.6, calib="arith", calib_n=16, calib_max_length=64)
IDS = torch.randint(3, 120, (2, 20), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def env(tmp_cache, data_dir, monkeypatch):
    monkeypatch.setenv("DEFTLAB_DATA_DIR", str(data_dir))
    return tmp_cache


def _logits(model):
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits


def test_weightless_load_has_no_weights_and_a_checkpoint(env):
    lm = load_model("tiny", weights=False)
    assert not lm.has_weights and all(p.is_meta for p in lm.model.parameters())
    assert checkpoint_files(lm.checkpoint_dir) and lm.fingerprint == load_model("tiny").fingerprint


@pytest.mark.parametrize("dcfg", [BASE, DecompositionConfig(allocator="welore", svd="plain", err=0.3),
                                  dataclasses.replace(BASE, allocator="uniform", eta=0.0)],
                         ids=["deft", "welore-plain", "uniform"])
def test_blockwise_equals_the_whole_model_pipeline(env, tmp_path, dcfg):
    m1, r1 = compress_model(dcfg, load_model("tiny"), cache_root=tmp_path / "whole", lora_rank=4, lora_alpha=8)
    lm = load_model("tiny", weights=False)
    m2, r2 = compress_model(dataclasses.replace(dcfg, blockwise=True), lm, cache_root=tmp_path / "blocks",
                            lora_rank=4, lora_alpha=8)
    assert m2 is lm.model and lm.has_weights
    assert r1["allocation"].ranks == r2["allocation"].ranks and r1["alpha"] == r2["alpha"]
    assert r1["params_after"] == r2["params_after"] and r1["params_before"] == r2["params_before"]
    assert set(r1["lora_tails"]) == set(r2["lora_tails"])
    for n, t in r1["lora_tails"].items():
        assert torch.equal(t.A, r2["lora_tails"][n].A) and torch.equal(t.B, r2["lora_tails"][n].B)
    assert torch.equal(_logits(m1), _logits(m2))


def test_a_second_blockwise_run_reads_only_the_cache(env, tmp_path, monkeypatch):
    dcfg = dataclasses.replace(BASE, blockwise=True)
    _, r1 = compress_model(dcfg, load_model("tiny", weights=False), cache_root=tmp_path)

    def no_calibration(*a, **k):
        raise AssertionError("calibrated again")

    monkeypatch.setattr(compress, "collect_statistics_blockwise", no_calibration)
    m, r2 = compress_model(dcfg, load_model("tiny", weights=False), cache_root=tmp_path)
    assert r1["allocation"].ranks == r2["allocation"].ranks and r1["alpha"] == r2["alpha"]
    # the whole-model pass keeps its own statistics cache: a blockwise run never hands it Gram-less stats
    assert not (tmp_path / "calibration" / r1["stats_key"] / "stats.json").exists()


@pytest.mark.parametrize("targets", [None, ("q_proj", "v_proj")], ids=["all-targets", "q-v-only"])
def test_qlora_built_block_by_block_equals_quantising_afterwards(env, tmp_path, targets):
    params = dict(model="tiny", method="deft", adapter="qlora", keep=0.6, calib_n=16, calib_max_length=64,
                  lora_r=4)
    if targets:
        params["lora_target_modules"] = targets
    _, m1, r1 = build_model(FinetuneConfig.from_params(params), cache_root=tmp_path / "whole")
    lm, m2, r2 = build_model(FinetuneConfig.from_params({**params, "blockwise": True}), cache_root=tmp_path / "b")
    assert {n: type(m).__name__ for n, m in m1.named_modules()} == {n: type(m).__name__ for n, m in m2.named_modules()}
    assert any(is_4bit(m) for m in m2.modules())
    assert torch.equal(_logits(m1), _logits(m2))
    assert r1["params"] == r2["params"]
    assert sorted(r1["folded_tails"]) == sorted(r2["folded_tails"])
    assert r2["folded_tails"] and all(n.rsplit(".", 1)[-1] not in (targets or ()) for n in r2["folded_tails"])
    assert any(n.endswith("k_proj") for n in r2["folded_tails"]) == bool(targets)


def test_finalize_sees_each_linear_once_and_complete(env, tmp_path):
    """NF4 as each linear is loaded: every linear is handed over once, with no tensor left on meta."""
    dcfg = dataclasses.replace(BASE, blockwise=True)
    lm = load_model("tiny", weights=False)
    _, report = compress_model(dcfg, lm, cache_root=tmp_path)
    cache = compress._decomposition_cache(dcfg, lm, report["stats_key"], tmp_path)
    seen = []

    def finalize(name, linear):
        assert not any(t.is_meta for t in linear.parameters())
        seen.append(name)

    model, _ = load_decomposed(lm.checkpoint_dir, report["allocation"], cache.lazy(report["allocation"].ranks),
                               finalize=finalize)
    linears = [n for n, m in model.named_modules() if type(m) is torch.nn.Linear]
    assert sorted(seen) == sorted(linears) and len(seen) == len(set(seen))


def test_owl_needs_the_whole_model_pass():
    with pytest.raises(ConfigError, match="owl"):
        DecompositionConfig(allocator="owl", keep=0.6, blockwise=True).validate()


def test_dense_qlora_is_quantised_while_loading(env, monkeypatch):
    """Dense QLoRA never holds the 16-bit model: each linear is NF4 as soon as it is read, exactly as quantising
    the loaded model gives."""
    params = dict(model="tiny", method="dense", adapter="qlora", lora_r=4)
    lm, m2, r2 = build_model(FinetuneConfig.from_params(params))
    assert lm.checkpoint_dir is not None  # streamed from the checkpoint
    _, m1, r1 = build_model(FinetuneConfig.from_params(params), loaded=load_model("tiny"))
    assert {n: type(m).__name__ for n, m in m1.named_modules()} == {n: type(m).__name__ for n, m in m2.named_modules()}
    assert torch.equal(_logits(m1), _logits(m2)) and r1["params"] == r2["params"]
