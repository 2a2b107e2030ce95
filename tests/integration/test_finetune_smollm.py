"""The fine-tuning pipeline and the efficiency kind on the embedded SmolLM2-135M (and one subprocess check)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

SMOLLM_PARAMS = 134_515_008
# LoRA r on q,k,v (576→576, 576→192, 576→192) and up, down (576↔1536): r·(in+out) each, 30 blocks
LORA_PER_RANK = 30 * ((576 + 576) + 2 * (576 + 192) + 3 * (576 + 1536))  # q, k, v, gate, up, down


def real_data_dir() -> Path | None:
    """$DEFTLAB_DATA_DIR, else the shared data beside the checkout (as tests/conftest.py looks for it)."""
    env = os.environ.get("DEFTLAB_DATA_DIR")
    for cand in ([Path(env)] if env else []) + [Path(__file__).resolve().parents[2].parent / "shared" / "data"]:
        if cand.is_dir():
            return cand.resolve()
    return None


def _task_params() -> dict:
    data = real_data_dir()
    if data is None:
        return {"task": "generated", "eval_sets": ["generated"]}
    return {"task": "arith", "eval_sets": ["AddSub"], "data_dir": str(data)}


SMOKE = dict(model="smollm2-135m", profile="cpu-small", train_limit=8, batch_size=4, micro_batch_size=2,
             max_steps=2, eval_limit=2, max_new_tokens=24, lora_r=8, device="cpu")


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")


def test_efficiency_measures_in_a_fresh_subprocess(tmp_path, tmp_cache):
    from deftlab.recipes.efficiency import run_efficiency

    m = run_efficiency(dict(model="tiny", adapter="lora", batch_size=1, seq_len=16, steps=1, profile="smoke",
                            device="cpu"), tmp_path)
    assert m["isolated"] is True and m["train_tokens_per_s"] > 0
    assert m["model_mem_mb"] is not None and m["peak_mem_mb"] >= 0


@pytest.mark.model
def test_smollm2_dense_lora_smoke_finetune(tmp_path):
    from deftlab.experiments.runner import execute, make_spec
    from deftlab.store import ResultsStore

    torch.set_num_threads(1)  # faster than 2 when the 2 cores are shared
    rec = execute(make_spec("finetune", dict(SMOKE, method="dense", adapter="lora", **_task_params())),
                  ResultsStore(tmp_path), options={"progress": False, "wandb_mode": "disabled"})
    m = rec["metrics"]
    assert m["train_steps"] == 2 and m["trainable"] == 8 * LORA_PER_RANK
    assert m["params"] == SMOLLM_PARAMS and m["params_total"] == SMOLLM_PARAMS + 8 * LORA_PER_RANK
    assert 0 < m["train_loss_first"] < 5 and m["train_tokens_per_s"] > 0
    key = next(k for k in m if k.startswith("acc_") and not k.endswith("_non_overlap"))
    assert 0 <= m[key] <= 1 and m["avg"] == m[key]
    assert rec["config"]["lora_r"] == 8 and rec["config"]["training_profile"]["name"] == "cpu-small"


@pytest.mark.slow
@pytest.mark.model
def test_smollm2_deft_step0_finetune_and_reload(tmp_path, tmp_cache):
    """DeFT at 85% on the real model: step-0 equivalence, a short fine-tune, and rebuilding the trained model."""
    from deftlab.experiments.runner import execute, make_spec
    from deftlab.models import load_model
    from deftlab.recipes.compress import compress_model
    from deftlab.recipes.finetune import FinetuneConfig, build_model, load_finetuned
    from deftlab.store import ResultsStore
    from deftlab.tasks.encoding import PaddingCollator, encode_example
    from deftlab.train.module import masked_lm_loss

    torch.set_num_threads(1)
    params = dict(SMOKE, method="deft", keep=0.85, calib_n=8, calib_max_length=256, **_task_params())
    cfg = FinetuneConfig.from_params(params).resolve()
    lm, model, report = build_model(cfg)
    task = cfg.make_task()
    feats = [encode_example(lm.tokenizer, ex, 256) for ex in task.train_examples()[:2]]
    batch = PaddingCollator(lm.tokenizer.pad_token_id)(feats)

    def loss(mdl):
        mdl.eval()
        with torch.no_grad():
            logits = mdl(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return float(masked_lm_loss(logits, batch["labels"])[0])

    ref_model, _ = compress_model(cfg.decomposition, load_model("smollm2-135m"))
    assert loss(model) == pytest.approx(loss(ref_model), abs=2e-4)
    assert report["allocation"].keep_fraction == pytest.approx(0.85, abs=0.01)
    del ref_model, model

    store = ResultsStore(tmp_path)
    spec = make_spec("finetune", params)
    m = execute(spec, store, options={"progress": False, "wandb_mode": "disabled"})["metrics"]
    assert m["train_steps"] == 2 and m["params"] < 0.9 * SMOLLM_PARAMS
    _, reloaded = load_finetuned(store.run_dir(spec.kind, spec.key))
    trained = [n for n, p in reloaded.named_parameters() if p.requires_grad]
    assert len(trained) == 2 * 5 * 30  # lora_A and lora_B of 5 projections in 30 blocks


@pytest.mark.slow
@pytest.mark.model
def test_smollm2_deft_lowers_training_memory(tmp_path, tmp_cache):
    """Measured, not estimated: the DeFT-decomposed model's resident memory is smaller by about its parameter bytes."""
    from deftlab.recipes.efficiency import run_efficiency

    common = dict(model="smollm2-135m", adapter="lora", batch_size=1, seq_len=64, steps=2, profile="cpu-small",
                  device="cpu", threads=1, calib_n=8, calib_max_length=256, **{k: v for k, v in _task_params().items()
                                                                    if k in ("task", "data_dir")})
    dense = run_efficiency(dict(common, method="dense"), tmp_path / "dense")
    deft = run_efficiency(dict(common, method="deft", keep=0.85), tmp_path / "deft")
    saved_mb = (dense["params_total"] - deft["params_total"]) * 4 / 2**20
    assert saved_mb > 40
    assert deft["model_mem_mb"] < dense["model_mem_mb"] - 0.5 * saved_mb
    assert deft["train_tokens_per_s"] > 0 and dense["train_tokens_per_s"] > 0
    print(json.dumps({"dense": dense, "deft": deft, "cpu_count": os.cpu_count()}, indent=1))
