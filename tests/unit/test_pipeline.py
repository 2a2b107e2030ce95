"""The decompose → fine-tune → evaluate pipeline, its CLI and the efficiency kind, on the tiny random LLaMA."""

from __future__ import annotations

import json

import pytest
import torch

from deftlab.config import ConfigError
from deftlab.errors import DeftlabError
from deftlab.experiments.runner import execute, make_spec
from deftlab.recipes.compress import compress_model
from deftlab.recipes.finetune import FinetuneConfig, build_model, load_finetuned, run_finetune, summarize_eval
from deftlab.store import ResultsStore

# tiny model + generated arithmetic + the smoke profile (LoRA r=4 on q_proj/v_proj, 6 steps, 4 eval problems)
TINY = dict(model="tiny", task="generated", profile="smoke", device="cpu")
DECOMP = dict(calib_n=8, calib_max_length=64, group=4)


def cfg_of(**params) -> FinetuneConfig:
    return FinetuneConfig.from_params(params).resolve()


def record(params, root, kind="finetune"):
    """The run through the results store (as `deftlab run` / `deftlab finetune` make it): (record, run dir)."""
    store = ResultsStore(root)
    spec = make_spec(kind, params)
    rec = execute(spec, store, options={"progress": False, "wandb_mode": "disabled"} if kind == "finetune" else None)
    return rec, store.run_dir(spec.kind, spec.key)


@pytest.fixture(autouse=True)
def _isolated(tmp_cache, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    torch.set_num_threads(1)


def run(params, run_dir):
    return run_finetune(params, run_dir, progress=False, wandb_mode="disabled")


def batch_logits_loss(model, tokenizer, task, n=4) -> tuple[torch.Tensor, float]:
    """Logits and mean masked LM loss (the trainer's loss) of `model` on the first n training examples."""
    from deftlab.tasks.encoding import PaddingCollator, encode_example
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
def test_config_resolves_method_task_and_profile_defaults():
    deft = cfg_of(keep=0.8, **TINY)
    d = deft.decomposition
    assert (d.allocator, d.svd, deft.init, d.calib) == ("deft", "whitened", "deft", "generated")
    assert d.calib_n == 256 and d.group == 32 and d.eta == 1.0  # DecompositionConfig's defaults, the one home
    assert deft.lr == 3e-3 and deft.lora_r == 4 and deft.lora_alpha == 8.0 and deft.seed == 0  # smoke profile
    assert deft.eval_sets == ("generated",) and deft.ppl_stage == "before"
    welore = cfg_of(method="welore", adapter="lrc", err=0.5, lr=5e-5, **TINY)
    assert (welore.decomposition.allocator, welore.decomposition.svd, welore.init, welore.ppl_stage) == (
        "welore", "plain", "vanilla", "after")
    assert welore.train_profile().lr == 5e-5
    assert cfg_of(method="dense", **TINY).decomposition is None
    # the cpu-small profile's arithmetic sets apply to the arith task only
    assert cfg_of(method="dense", profile="cpu-small").eval_sets[:2] == ("AddSub", "SingleEq")
    assert cfg_of(method="dense", task="generated", profile="cpu-small").eval_sets == ("generated",)


@pytest.mark.parametrize("params, match", [
    (dict(method="dense", keep=0.8), "keeps every parameter"),
    (dict(method="deft"), "exactly one of keep"),
    (dict(method="deft", keep=1.5), "keep"),
    (dict(method="deft", keep=0.8, calib_n=0), "calib_n must be positive"),
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
        cfg_of(**{**TINY, **params})


# --- DeFT initialisation --------------------------------------------------------------------------------------
@pytest.mark.parametrize("init", ["deft", "vanilla"])
def test_step0_model_equals_rank_theta_compressed_model(init):
    """At step 0 the adapted model computes exactly the rank-θ decomposed model (DeFT tails or B = 0)."""
    from deftlab.models import load_model

    cfg = cfg_of(keep=0.8, init=init, **TINY, **DECOMP)
    lm, model, report = build_model(cfg)
    task = cfg.make_task()
    ref_model, _ = compress_model(cfg.decomposition, load_model("tiny"))  # all θ components frozen
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
    rec, run_dir = record(params, tmp_path)
    m = rec["metrics"]
    for key in ("acc_generated", "avg", "acc_generated_non_overlap", "n_overlap_generated", "params", "params_total",
                "trainable", "peak_mem_mb", "train_tokens_per_s", "train_loss_first", "train_loss_last",
                "wall_time_s", "ppl_train_heldout", "ppl_train_heldout_tokens"):
        assert key in m, key
    assert 1 < m["ppl_train_heldout"] < 1e6
    assert m["train_steps"] == 6 and m["train_loss_last"] < m["train_loss_first"]
    assert 0 < m["trainable"] < m["params_total"] and m["params"] == m["params_dense"]  # merged = dense size
    # the one record: params as hashed, the resolved config with its training profile, manifest, artifacts
    assert rec["format"] == "deftlab-record-v2" and rec["params"] == params
    assert rec["config"]["lr"] == 1e-2 and rec["config"]["training_profile"]["name"] == "smoke"
    assert rec["config"]["model"]["device"] == "cpu" and rec["manifest"]["seed"] == 0
    assert "eval/generated.predictions.jsonl" in rec["artifacts"] and "record.json" not in rec["artifacts"]
    # no second bookkeeping copy of what the record holds
    assert not {"metrics.json", "manifest.json", "run.record.json", "record.csv", "finetune_config.json"} & {
        p.name for p in run_dir.iterdir()}

    # re-running the function in its directory neither retrains nor re-evaluates
    pred, ppl_file = run_dir / "eval" / "generated.predictions.jsonl", run_dir / "perplexity.json"
    stamps = pred.stat().st_mtime_ns, ppl_file.stat().st_mtime_ns
    again = run_finetune(params, run_dir, progress=False, wandb_mode="disabled")
    assert again["resumed_from_step"] == 6 and again["train_steps"] == 6
    assert again["train_loss_first"] == m["train_loss_first"] and again["acc_generated"] == m["acc_generated"]
    assert again["ppl_train_heldout"] == m["ppl_train_heldout"]
    assert (pred.stat().st_mtime_ns, ppl_file.stat().st_mtime_ns) == stamps
    # and through the store the recorded run is reused as it is
    assert record(params, tmp_path)[0] == rec


def test_deft_run_and_load_finetuned_reproduce_the_evaluated_model(tmp_path):
    from deftlab.eval.generate import generate_ids

    params = dict(method="deft", keep=0.8, max_steps=2, lr=1e-2, **TINY, **DECOMP)
    rec, run_dir = record(params, tmp_path)
    m = rec["metrics"]
    assert m["train_steps"] == 2 and 0 < m["keep_fraction"] <= 0.8 + 1e-9
    assert m["params"] < m["params_dense"] and (run_dir / "allocation.csv").is_file()
    assert rec["config"]["init"] == "deft" and rec["config"]["decomposition"]["calib_n"] == 8

    lm, model = load_finetuned(run_dir, merge=True)
    lines = [json.loads(x) for x in (run_dir / "eval" / "generated.predictions.jsonl").read_text().splitlines()]
    cfg = cfg_of(**params)
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


def test_cli_finetune_records_in_the_store_and_show_prints_it(tmp_path, capsys):
    from deftlab.cli import main

    argv = ["finetune", "--model", "tiny", "--task", "generated", "--method", "dense", "--adapter", "none",
            "--profile", "smoke", "--device", "cpu", "--eval-limit", "2", "--no-progress", "--wandb", "disabled",
            "--results", str(tmp_path)]
    code = main(argv)
    out = capsys.readouterr().out
    assert code == 0 and "acc_generated" in out and "params" in out
    (rec,) = ResultsStore(tmp_path).records("finetune")
    m = rec["metrics"]
    assert m["trained"] is False and m["trainable"] == 0 and m["n_generated"] == 2
    assert rec["origin"]["command"] and rec["origin"]["experiment"] is None
    assert not (tmp_path / "finetune" / rec["key"] / "checkpoints").exists()
    # the same key as the registry would give the same params
    assert rec["key"] == make_spec("finetune", rec["params"]).key
    assert main(["show", rec["key"][:6], "--results", str(tmp_path)]) == 0
    shown = capsys.readouterr().out
    assert f"finetune/{rec['key']}" in shown and "acc_generated" in shown and "commit" in shown
    assert "eval/generated.predictions.jsonl" in shown
    # the same command again reuses the record
    assert main(argv) == 0 and "reusing" in capsys.readouterr().out
    assert main(["finetune", "--model", "tiny", "--method", "dense", "--keep", "0.8", "--profile", "smoke",
                 "--results", str(tmp_path)]) == 2  # one-line error, exit code 2
    assert main(["show", "ffffffffff", "--results", str(tmp_path)]) == 2


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
    from deftlab.recipes.efficiency import run_efficiency

    m = run_efficiency(dict(model="tiny", method="deft", keep=0.8, adapter="lora", batch_size=[1, 2], seq_len=32,
                            steps=2, profile="smoke", task="generated", device="cpu", isolate=False, **DECOMP),
                       tmp_path)
    for bs in (1, 2):
        assert m[f"train_tokens_per_s_bs{bs}"] > 0 and m[f"steps_timed_bs{bs}"] == 2
        assert m[f"peak_mem_mb_bs{bs}"] is not None and m[f"e2e_hours_bs{bs}"] > 0
    assert m["memory_kind"] == "anon_rss_above_baseline" and m["adapter_used"] == "lora"
    assert (tmp_path / "efficiency.csv").is_file() and not (tmp_path / "record.json").exists()
    # Cost (DeFT Tables 4/9): the cold decomposition's seconds plus the extrapolated training time
    assert m["decompose_cold"] and m["decompose_seconds"] > 0
    for bs in (1, 2):
        assert m[f"e2e_minutes_bs{bs}"] == pytest.approx(m["decompose_seconds"] / 60 + m[f"e2e_hours_bs{bs}"] * 60)

    inf = run_efficiency(dict(model="tiny", mode="inference", context_len=48, batch_size=1, steps=1,
                              profile="smoke", device="cpu", isolate=False), tmp_path / "inf")
    assert inf["seq_len"] == 48 and inf["tokens_per_s"] > 0 and "train_tokens_per_s" not in inf
    assert inf["adapter_used"] == "none" and inf["trainable"] == 0
    assert inf["decompose_seconds"] == 0.0 and not inf["decompose_cold"]  # dense: nothing to decompose


def test_efficiency_config_errors():
    from deftlab.recipes.efficiency import run_efficiency

    with pytest.raises(ConfigError, match="batch_size"):
        run_efficiency(dict(model="tiny", batch_size=[0]), "/nonexistent-not-created")
    with pytest.raises(ConfigError, match="nothing to train"):
        run_efficiency(dict(model="tiny", adapter="none"), "/nonexistent-not-created")


def test_deft_init_falls_back_to_the_standard_init_only_when_no_lora_target_was_reduced():
    # group 32 on the tiny model tends to keep the targeted q_proj/v_proj at full rank: no tail to start from
    cfg = cfg_of(keep=0.8, calib_n=8, **TINY)
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
    rec, tmp_path = record(params, tmp_path)
    m = rec["metrics"]
    hidden, layers = 64, 2
    assert m["train_steps"] == 2 and m["trainable"] == layers * 2 * hidden * 8
    assert m["params"] == m["params_dense"] + m["trainable"]  # a nonlinear adapter stays in the evaluated model
    saved = rec["config"]
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
    cfg = cfg_of(keep=0.8, adapter="parallel", bottleneck_size=8, **TINY, **DECOMP)
    assert cfg.init == "vanilla"
    lm, model, report = build_model(cfg)
    assert not report["folded_tails"] and report["adapter"]["kind"] == "parallel"
    assert report["params"]["trainable"] == report["params"]["by_kind"]["adapter"]["total"] == 2 * 2 * 64 * 8
    # a DeFT-compressed model with lora_rank 0 (no tail): the adapter starts as a no-op on it
    from deftlab.models import load_model

    ref_model, _ = compress_model(cfg.decomposition, load_model("tiny"))
    task = cfg.make_task()
    logits, _ = batch_logits_loss(model, lm.tokenizer, task)
    ref_logits, _ = batch_logits_loss(ref_model, lm.tokenizer, task)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)
