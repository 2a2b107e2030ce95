"""The decompose → fine-tune → evaluate pipeline, its CLI and the efficiency kind, on the tiny random LLaMA."""

from __future__ import annotations

import json

import pytest
import torch

from deftlab.config import ConfigError, from_dict
from deftlab.errors import DeftlabError
from deftlab.train.pipeline import (
    CONFIG_FILE,
    FinetuneConfig,
    build_model,
    load_finetuned,
    run_finetune,
    summarize_eval,
)

# tiny model + generated arithmetic + the smoke preset (LoRA r=4 on q_proj/v_proj, 6 steps, 4 eval problems)
TINY = dict(model="tiny", task="generated", preset="smoke", device="cpu")
DECOMP = dict(calib_n=8, calib_max_length=64, group=4)


@pytest.fixture(autouse=True)
def _isolated(tmp_cache, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    torch.set_num_threads(1)


def run(params, run_dir):
    return run_finetune(params, run_dir, progress=False, wandb_mode="disabled")


def batch_logits_loss(model, tokenizer, task, n=4) -> tuple[torch.Tensor, float]:
    """Logits and mean masked LM loss (the trainer's loss) of `model` on the first n training examples."""
    from deftlab.train.datamodule import PaddingCollator, encode_example
    from deftlab.train.module import masked_lm_loss

    feats = [encode_example(tokenizer, ex, 320) for ex in task.train_examples()[:n]]
    batch = PaddingCollator(tokenizer.pad_token_id)(feats)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return logits, float(masked_lm_loss(logits, batch["labels"])[0])


def batch_loss(model, tokenizer, task, n=4) -> float:
    return batch_logits_loss(model, tokenizer, task, n)[1]


# --- config ---------------------------------------------------------------------------------------------------
def test_config_resolves_method_task_and_preset_defaults():
    deft = FinetuneConfig(keep=0.8, **TINY).resolve()
    assert (deft.allocator, deft.svd, deft.init, deft.calib) == ("deft", "whitened", "deft", "generated")
    assert deft.lr == 3e-3 and deft.lora_r == 4 and deft.lora_alpha == 8.0 and deft.seed == 0  # smoke preset
    assert deft.eval_sets == ["generated"] and deft.ppl_stage == "before"
    welore = FinetuneConfig(method="welore", adapter="lrc", err=0.5, lr=5e-5, **TINY).resolve()
    assert (welore.allocator, welore.svd, welore.init, welore.ppl_stage) == ("welore", "plain", "vanilla", "after")
    assert welore.train_preset().lr == 5e-5
    # the cpu-small preset's arithmetic sets apply to the arith task only
    assert FinetuneConfig(method="dense", preset="cpu-small").resolve().eval_sets[:2] == ["AddSub", "SingleEq"]
    assert FinetuneConfig(method="dense", task="generated", preset="cpu-small").resolve().eval_sets == ["generated"]


@pytest.mark.parametrize("params, match", [
    (dict(method="dense", keep=0.8), "keeps every parameter"),
    (dict(method="deft"), "exactly one of keep"),
    (dict(method="deft", err=0.3), "parameter budget"),
    (dict(method="welore", keep=0.5, err=0.5), "exactly one of keep"),
    (dict(method="dense", adapter="lrc"), "low-rank components"),
    (dict(method="dense", optimizer="galore"), "GaLore projects the gradients of full weight"),
    (dict(method="dense", optimizer="sgd"), "not one of"),
    (dict(method="dense", adapter="prefix"), "not one of"),
    (dict(method="dense", bottleneck_size=64), "only applies to adapters 'series'/'parallel'"),
    (dict(method="deft", keep=0.8, adapter="series", init="deft"), "only LoRA adapters take DeFT's tail"),
    (dict(method="dense", adapter="parallel", bottleneck_size=0), "bottleneck_size must be positive"),
    (dict(method="dense", lora_alpha=7.5), "whole number"),
])
def test_bad_configs_fail_with_one_line_errors(params, match):
    with pytest.raises(DeftlabError, match=match):
        from_dict(FinetuneConfig, {**TINY, **params}).resolve()


# --- DeFT initialisation --------------------------------------------------------------------------------------
@pytest.mark.parametrize("init", ["deft", "vanilla"])
def test_step0_model_equals_rank_theta_compressed_model(init):
    """At step 0 the adapted model computes exactly the rank-θ decomposed model (DeFT tails or B = 0)."""
    from deftlab.decompose.pipeline import compress_model
    from deftlab.models import load_model

    cfg = FinetuneConfig(keep=0.8, init=init, **TINY, **DECOMP).resolve()
    lm, model, report = build_model(cfg)
    task = cfg.make_task()
    ref_model, _ = compress_model(cfg.compress_config(), loaded=load_model("tiny"))  # all θ components frozen
    ref_logits, ref = batch_logits_loss(ref_model, lm.tokenizer, task)
    dense_logits, _ = batch_logits_loss(load_model("tiny").model, lm.tokenizer, task)
    logits, loss = batch_logits_loss(model, lm.tokenizer, task)
    assert loss == pytest.approx(ref, abs=1e-6)
    gap = (logits - ref_logits).abs().max().item()
    # the decomposition moved the logits far more than that, so the equality is not trivially true
    assert gap < 1e-4 and (dense_logits - ref_logits).abs().max().item() > 100 * gap + 1e-3
    assert report["params"]["trainable"] > 0
    if init == "deft":
        # tails of matrices the LoRA does not target (smoke: only q_proj, v_proj) went back into the frozen part
        assert report["folded_tails"] and not any(n.endswith(("q_proj", "v_proj")) for n in report["folded_tails"])
        lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
        assert any(float(b.detach().abs().sum()) > 0 for b in lora_b)  # initialised from the spectrum, not zero
    else:
        assert not report["folded_tails"]
        assert all(float(p.detach().abs().sum()) == 0 for n, p in model.named_parameters() if "lora_B" in n)


# --- runs -------------------------------------------------------------------------------------------------------
def test_dense_lora_run_records_lowers_loss_and_resumes(tmp_path):
    params = dict(method="dense", adapter="lora", lr=1e-2, **TINY)
    m = run(params, tmp_path)
    for key in ("acc_generated", "avg", "acc_generated_non_overlap", "n_overlap_generated", "params", "params_total",
                "trainable", "peak_mem_mb", "train_tokens_per_s", "train_loss_first", "train_loss_last",
                "wall_time_s"):
        assert key in m, key
    assert m["train_steps"] == 6 and m["train_loss_last"] < m["train_loss_first"]
    assert 0 < m["trainable"] < m["params_total"] and m["params"] == m["params_dense"]  # merged = dense size
    rec = json.loads((tmp_path / "record.json").read_text())
    res = rec["results"]
    assert res["params"]["trainable"] == m["trainable"] and res["train_tokens_per_s"] > 0
    assert res["metrics"]["generated"]["n"] == 4 and "n_overlap" in res["metrics"]["generated"]
    assert rec["config"]["config"]["lr"] == 1e-2 and rec["config"]["preset"]["name"] == "smoke"
    assert (tmp_path / "eval" / "generated.predictions.jsonl").is_file()

    # re-running the finished run neither retrains nor re-evaluates
    pred = tmp_path / "eval" / "generated.predictions.jsonl"
    stamp = pred.stat().st_mtime_ns
    again = run(params, tmp_path)
    assert again["resumed_from_step"] == 6 and again["train_steps"] == 6
    assert again["train_loss_first"] == m["train_loss_first"] and again["acc_generated"] == m["acc_generated"]
    assert pred.stat().st_mtime_ns == stamp

    with pytest.raises(DeftlabError, match="different config"):
        run({**params, "lr": 5e-3}, tmp_path)


def test_deft_run_and_load_finetuned_reproduce_the_evaluated_model(tmp_path):
    from deftlab.eval.generate import generate_ids

    params = dict(method="deft", keep=0.8, max_steps=2, lr=1e-2, **TINY, **DECOMP)
    m = run(params, tmp_path)
    assert m["train_steps"] == 2 and 0 < m["keep_fraction"] <= 0.8 + 1e-9
    assert m["params"] < m["params_dense"] and (tmp_path / "allocation.csv").is_file()
    assert json.loads((tmp_path / CONFIG_FILE).read_text())["config"]["init"] == "deft"

    lm, model = load_finetuned(tmp_path, merge=True)
    lines = [json.loads(x) for x in (tmp_path / "eval" / "generated.predictions.jsonl").read_text().splitlines()]
    cfg = FinetuneConfig(**{k: v for k, v in params.items()}).resolve()
    task = cfg.make_task()
    prompts = [e.prompt for e in task.eval_examples("generated", 2)]
    ids = generate_ids(model, lm.tokenizer, prompts, max_new_tokens=16, progress=False)
    assert [lm.tokenizer.decode(r) for r in ids] == [line["raw_output"] for line in lines[:2]]
    # the trained tensors were loaded: the untrained rebuild differs
    _, fresh, _ = build_model(cfg)
    from deftlab.adapters import merge_for_eval

    assert batch_loss(merge_for_eval(fresh), lm.tokenizer, task) != pytest.approx(
        batch_loss(model, lm.tokenizer, task), abs=1e-6)


def test_welore_lrc_trains_only_low_rank_components(tmp_path):
    params = dict(method="welore", adapter="lrc", err=0.5, max_steps=2, lr=1e-3, ppl=["generated"],
                  ppl_max_tokens=256, **TINY, **DECOMP)
    m = run(params, tmp_path)
    alloc = (tmp_path / "allocation.csv").read_text().splitlines()
    header = alloc[0].split(",")
    rows = [dict(zip(header, line.split(","))) for line in alloc[1:]]
    lrc_params = sum(int(r["params"]) for r in rows if r["lrc"] == "True")
    assert lrc_params > 0 and m["trainable"] == lrc_params
    assert m["ppl_stage"] == "after" and m["ppl_generated"] > 1 and m["ppl_generated_tokens"] > 0
    # a re-run reuses the recorded perplexity (the file is not rewritten)
    stamp = (tmp_path / "perplexity.json").stat().st_mtime_ns
    assert run(params, tmp_path)["ppl_generated"] == m["ppl_generated"]
    assert (tmp_path / "perplexity.json").stat().st_mtime_ns == stamp


def test_cli_dense_none_is_a_zero_shot_evaluation(tmp_path, capsys):
    from deftlab.cli import main

    code = main(["finetune", "--model", "tiny", "--task", "generated", "--method", "dense", "--adapter", "none",
                 "--preset", "smoke", "--device", "cpu", "--eval-limit", "2", "--no-progress", "--wandb", "disabled",
                 "--run-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0 and "acc_generated" in out and "params" in out
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["trained"] is False and m["trainable"] == 0 and m["n_generated"] == 2
    assert not (tmp_path / "checkpoints").exists()
    assert main(["finetune", "--model", "tiny", "--method", "dense", "--keep", "0.8", "--preset", "smoke",
                 "--run-dir", str(tmp_path / "bad")]) == 2  # one-line error, exit code 2


def test_default_run_name_is_deterministic_and_distinguishes_budgets():
    from deftlab.commands.finetune import default_run_name

    a = default_run_name(FinetuneConfig(keep=0.8, **TINY).resolve())
    assert a == default_run_name(FinetuneConfig(keep=0.8, **TINY).resolve())
    assert a != default_run_name(FinetuneConfig(keep=0.7, **TINY).resolve())
    assert "keep0.8" in a and "smoke" in a
    full = dict(TINY, method="dense", adapter="full")
    assert default_run_name(FinetuneConfig(**full, optimizer="galore").resolve()) != \
        default_run_name(FinetuneConfig(**full).resolve())


def test_summarize_eval_names_metrics_per_set():
    res = {"AddSub": {"accuracy": 0.5, "accuracy_non_overlap": 0.25, "n": 4, "n_overlap": 2},
           "gsm8k": {"accuracy": 0.25, "n": 4}}
    s = summarize_eval(res)
    assert s["acc_addsub"] == 0.5 and s["acc_gsm8k"] == 0.25 and s["avg"] == pytest.approx(0.375)
    assert s["acc_addsub_non_overlap"] == 0.25 and s["n_overlap_addsub"] == 2
    assert summarize_eval({"test": {"rouge1": 30.0, "rouge2": 10.0, "rougeL": 25.0, "n": 3}})["rougeL"] == 25.0
    assert summarize_eval({"heldout": {"perplexity": 12.0, "tokens": 99}})["ppl_heldout"] == 12.0


# --- efficiency ---------------------------------------------------------------------------------------------------
def test_efficiency_measures_memory_and_throughput(tmp_path):
    from deftlab.train.efficiency import run_efficiency

    m = run_efficiency(dict(model="tiny", method="deft", keep=0.8, adapter="lora", batch_size=[1, 2], seq_len=32,
                            steps=2, preset="smoke", task="generated", device="cpu", isolate=False, **DECOMP),
                       tmp_path)
    for bs in (1, 2):
        assert m[f"train_tokens_per_s_bs{bs}"] > 0 and m[f"steps_timed_bs{bs}"] == 2
        assert m[f"peak_mem_mb_bs{bs}"] is not None and m[f"e2e_hours_bs{bs}"] > 0
    assert m["memory_kind"] == "anon_rss_above_baseline" and m["adapter_used"] == "lora"
    assert (tmp_path / "efficiency.csv").is_file() and (tmp_path / "record.json").is_file()

    inf = run_efficiency(dict(model="tiny", mode="inference", context_len=48, batch_size=1, steps=1,
                              preset="smoke", device="cpu", isolate=False), tmp_path / "inf")
    assert inf["seq_len"] == 48 and inf["tokens_per_s"] > 0 and "train_tokens_per_s" not in inf
    assert inf["adapter_used"] == "none" and inf["trainable"] == 0


def test_efficiency_config_errors():
    from deftlab.train.efficiency import run_efficiency

    with pytest.raises(ConfigError, match="batch_size"):
        run_efficiency(dict(model="tiny", batch_size=[0]), "/nonexistent-not-created")
    with pytest.raises(ConfigError, match="nothing to train"):
        run_efficiency(dict(model="tiny", adapter="none"), "/nonexistent-not-created")


def test_deft_init_falls_back_to_the_standard_init_only_when_no_lora_target_was_reduced():
    # group 32 on the tiny model tends to keep the targeted q_proj/v_proj at full rank: no tail to start from
    cfg = FinetuneConfig(keep=0.8, calib_n=8, **TINY).resolve()
    lm, model, report = build_model(cfg)
    df = report["allocation"].to_frame()
    targets = df[df["name"].str.endswith(("q_proj", "v_proj"))]
    reduced = bool((targets["factored"] | (targets["rank"] < targets["full_rank"])).any())
    b_sum = sum(float(p.detach().abs().sum()) for n, p in model.named_parameters() if "lora_B" in n)
    if reduced:
        assert not report.get("notes") and b_sum > 0
    else:
        assert report.get("notes") and "standard init" in report["notes"][0] and b_sum == 0


# --- bottleneck adapters (LLM-Adapters' series / parallel) -----------------------------------------------------------
def test_dense_series_run_trains_saves_and_reloads_only_the_adapters(tmp_path):
    from safetensors.torch import load_file

    from deftlab.adapters import BottleneckAdapter
    from deftlab.train.trainer import FINAL_WEIGHTS

    params = dict(method="dense", adapter="series", bottleneck_size=8, max_steps=2, lr=1e-2, **TINY)
    m = run(params, tmp_path)
    hidden, layers = 64, 2
    assert m["train_steps"] == 2 and m["trainable"] == layers * 2 * hidden * 8
    assert m["params"] == m["params_dense"] + m["trainable"]  # a nonlinear adapter stays in the evaluated model
    saved = json.loads((tmp_path / CONFIG_FILE).read_text())["config"]
    assert (saved["init"], saved["bottleneck_size"], saved["non_linearity"], saved["bottleneck_targets"]) == (
        "vanilla", 8, "tanh", ["mlp"])
    state = load_file(str(tmp_path / FINAL_WEIGHTS))
    assert sorted(state) == sorted(f"model.layers.{i}.mlp.adapter_{w}.weight" for i in range(layers)
                                   for w in ("down", "up"))
    assert any(float(v.abs().sum()) > 0 for k, v in state.items() if "adapter_up" in k)  # trained away from 0
    lm, model = load_finetuned(tmp_path, merge=True)
    assert isinstance(model.model.layers[0].mlp, BottleneckAdapter)
    assert torch.equal(model.model.layers[1].mlp.adapter_up.weight, state["model.layers.1.mlp.adapter_up.weight"])


def test_deft_model_with_a_parallel_adapter_keeps_all_theta_components_frozen():
    cfg = FinetuneConfig(keep=0.8, adapter="parallel", bottleneck_size=8, **TINY, **DECOMP).resolve()
    assert cfg.init == "vanilla"
    lm, model, report = build_model(cfg)
    assert not report["folded_tails"] and report["adapter"]["kind"] == "parallel"
    assert report["params"]["trainable"] == report["params"]["by_kind"]["adapter"]["total"] == 2 * 2 * 64 * 8
    # a DeFT-compressed model with lora_rank 0 (no tail): the adapter starts as a no-op on it
    from deftlab.decompose.pipeline import compress_model
    from deftlab.models import load_model

    ref_model, _ = compress_model(cfg.compress_config(), loaded=load_model("tiny"))
    task = cfg.make_task()
    logits, _ = batch_logits_loss(model, lm.tokenizer, task)
    ref_logits, _ = batch_logits_loss(ref_model, lm.tokenizer, task)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)


def test_config_files_written_before_a_field_existed_still_resume(tmp_path):
    from deftlab.config import to_dict
    from deftlab.train.pipeline import _check_or_write_config

    cfg = FinetuneConfig(method="dense", **TINY).resolve()
    saved = {"config": to_dict(cfg), "preset": to_dict(cfg.train_preset())}
    old = json.loads(json.dumps(saved))
    del old["config"]["bottleneck_size"]  # a run directory from before bottleneck adapters
    (tmp_path / CONFIG_FILE).write_text(json.dumps(old))
    _check_or_write_config(tmp_path, saved)
    changed = json.loads(json.dumps(saved))
    changed["config"]["lr"] = 1.0
    with pytest.raises(DeftlabError, match="different config fields"):
        _check_or_write_config(tmp_path, changed)
