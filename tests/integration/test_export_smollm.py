"""`deftlab export` on SmolLM2-135M (dense LoRA, DeFT + LoRA, WeLore LRC smoke runs): both formats reload in a fresh
process without deftlab, with the tokenizer, and give the in-memory model's logits; factored = the run's #Params."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch

_spec = importlib.util.spec_from_file_location("_export_helpers", Path(__file__).parents[1] / "unit" / "test_export.py")
_helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_helpers)  # reuse the fresh-process reload of the unit tests (one place)

SMOKE = dict(model="smollm2-135m", task="generated", eval_sets=["generated"], profile="cpu-small", train_limit=4,
             batch_size=2, micro_batch_size=2, max_steps=1, eval_limit=1, max_new_tokens=8, cutoff_len=128,
             lora_r=8, device="cpu")
# the attention projections only: a fraction of the SVD time of all seven (this smoke test's budget is minutes)
DECOMP = dict(calib_n=4, calib_max_length=64, targets=["q_proj", "k_proj", "v_proj", "o_proj"])
RUNS = {
    "dense_lora": dict(SMOKE, method="dense", adapter="lora"),
    "deft_lora": dict(SMOKE, method="deft", keep=0.85, **DECOMP),
    "welore_lrc": dict(SMOKE, method="welore", adapter="lrc", err=0.5, welore_factor="lrc", lr=1e-4, **DECOMP),
}
TEXT = "Question: Tom has 12 apples and buys 30 more. How many apples does he have? Answer:"


@pytest.fixture
def cache_with_model(tmp_path, monkeypatch):
    """An empty deftlab cache that reuses the user's converted SmolLM2 checkpoint (the conversion takes ~1 min)."""
    from deftlab.settings import cache_dir

    models = tmp_path / "cache" / "models"
    models.mkdir(parents=True)
    for ckpt in (cache_dir() / "models").glob("smollm2-135m-*"):
        if ckpt.is_dir() and ".tmp" not in ckpt.name:
            (models / ckpt.name).symlink_to(ckpt)
    monkeypatch.setenv("DEFTLAB_CACHE", str(tmp_path / "cache"))


@pytest.mark.slow  # ~3 CPU minutes (two decompositions, six 135M reloads): out of the default suite
@pytest.mark.model
def test_smollm2_exports_round_trip(tmp_path, cache_with_model, monkeypatch):
    from safetensors.torch import load_file

    from deftlab.experiments.runner import execute, make_spec
    from deftlab.export import FORMATS, export_prepared, prepare
    from deftlab.store import ResultsStore

    monkeypatch.setenv("WANDB_MODE", "disabled")
    torch.set_num_threads(1)  # faster than 2 when the 2 cores are shared (the reload uses the same count)
    store = ResultsStore(tmp_path / "results")
    want, floor, runs, exports, jobs = {}, {}, {}, {}, []
    tokens = None
    for name, params in RUNS.items():
        spec = make_spec("finetune", params)
        runs[name] = execute(spec, store, options={"progress": False, "wandb_mode": "disabled"})["metrics"]
        # one rebuild per run (135M parameters): deftlab's in-memory model, then both exports of it
        prep = prepare(spec.ref, store.root)
        tokens = [prep.tokenizer(TEXT)["input_ids"]]
        want[name] = _helpers.memory_logits(prep.model, tokens)
        # fp32's own error on this model and input: the same weights computed in fp64
        floor[name] = _helpers.rel_err(want[name], _helpers.memory_logits(copy.deepcopy(prep.model).double(), tokens))
        for fmt in FORMATS:  # factored first: the merged export multiplies the factors back in place
            d = tmp_path / "exports" / f"{name}-{fmt}"
            exports[name, fmt] = export_prepared(prep, fmt, d)
            jobs.append({"dir": str(d), "remote": fmt == "factored", "tokens": tokens, "base": False,
                         "text": TEXT, "out": str(tmp_path / f"{name}-{fmt}.safetensors")})
        del prep
    report = _helpers.reload_in_fresh_process(jobs, tmp_path)
    assert report["deftlab_imported"] is False
    summary = {}
    for (name, fmt), rec in exports.items():
        got = report[str(tmp_path / "exports" / f"{name}-{fmt}")]
        err = _helpers.rel_err(load_file(str(tmp_path / f"{name}-{fmt}.safetensors"))["logits"], want[name])
        summary[name, fmt] = {"rel_err": err, "fp32_floor": floor[name], "params": got["params"],
                              "bytes": rec["bytes"]}
    print(json.dumps({f"{n}-{f}": v for (n, f), v in summary.items()}, indent=1))
    for (name, fmt), rec in exports.items():
        got, s = report[str(tmp_path / "exports" / f"{name}-{fmt}")], summary[name, fmt]
        # factored: the same modules and kernels, so the same logits. merged: W_u·W_v changes the summation order,
        # and on SmolLM2 fp32 itself is only good to ~1e-5 (the floor): the bound is that floor's order
        bound = _helpers.MAX_REL_ERR if fmt == "factored" else max(_helpers.MAX_REL_ERR, 3 * s["fp32_floor"])
        assert s["rel_err"] <= bound, (name, fmt, s)
        assert got["params"] == rec["params"] == (runs[name]["params"] if fmt == "factored"
                                                  else runs[name]["params_dense"])
        assert got["text_ids"] == tokens[0] and rec["tokenizer"] == "saved" and not rec["dequantised"]
    deft = [exports["deft_lora", f] for f in FORMATS]
    assert deft[0]["params"] < deft[1]["params"] and deft[0]["weights_bytes"] < deft[1]["weights_bytes"]
