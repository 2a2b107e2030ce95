"""lm-evaluation-harness integration (deftlab.eval.harness, run kind lm_eval, `deftlab eval-lm`)."""

from __future__ import annotations

import json
import time

import pytest

pytest.importorskip("lm_eval")

from deftlab.cli import main  # noqa: E402
from deftlab.errors import DeftlabError  # noqa: E402
from deftlab.eval import harness  # noqa: E402
from deftlab.tasks import get_task  # noqa: E402

OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "DEFTLAB_OFFLINE")


def test_task_names_and_groups():
    local, hub = harness.expand_tasks(["deftlab_arith", "deftlab_gsm8k", "zeroshot7", "boolq"])
    assert local == ["deftlab_addsub", "deftlab_singleeq", "deftlab_multiarith", "deftlab_svamp", "deftlab_gsm8k",
                     "deftlab_aqua"]
    assert hub == ["boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"]
    with pytest.raises(DeftlabError, match="unknown local lm-eval task 'deftlab_nope'"):
        harness.expand_tasks(["deftlab_nope"])
    # acc_norm where lm-eval defines it (as compression papers report), acc for BoolQ / WinoGrande
    assert [harness.reported_metric(t, ["acc", "acc_norm"]) for t in harness.ZEROSHOT7] == \
        ["acc", "acc_norm", "acc_norm", "acc", "acc_norm", "acc_norm", "acc_norm"]
    assert harness.reported_metric("deftlab_gsm8k", ["acc"]) == "acc"


def test_local_task_is_an_lm_eval_task_with_deftlabs_prompt(tmp_path):
    from lm_eval.tasks import TaskManager

    d = harness.write_task_dir(tmp_path, ["deftlab_generated"], max_new_tokens=17)
    tasks = TaskManager(include_path=str(d), include_defaults=False).load(["deftlab_generated"])["tasks"]
    task = tasks["deftlab_generated"]
    deft = get_task("generated", max_new_tokens=17)
    examples = deft.eval_examples("generated")
    docs = list(task.test_docs())
    assert len(docs) == len(examples)
    assert [task.doc_to_text(doc) for doc in docs[:5]] == [e.prompt for e in examples[:5]]
    gen = task.config.generation_kwargs
    assert gen["until"] == list(deft.stop_strings) and gen["max_gen_toks"] == 17 and gen["do_sample"] is False
    assert task.config.num_fewshot == 0 and task.config.metadata["version"] == harness.LOCAL_TASK_VERSION


def test_score_filter_is_deftlabs_scoring(tmp_path):
    ds = harness.load_docs("generated", "generated", {})["test"]
    docs = [ds[i] for i in range(12)]
    # half right (the last number is the answer), half wrong, one cut at a stop string after a right answer
    outs = [f"So the answer is {d['gold']}." if i % 2 == 0 else "The answer is 12345." for i, d in enumerate(docs)]
    outs[1] = f"The answer is {docs[1]['gold']}.\n### Instruction: 999"
    items = harness.score_filter([[o] for o in outs], docs)
    deft = get_task("generated")
    want, _ = deft.score("generated", deft.eval_examples("generated", 12),
                         [o.split("### Instruction")[0] for o in outs])
    assert [it["correct"] for it in items] == [w["correct"] for w in want]
    assert sum(it["correct"] for it in items) == 7
    assert [harness.process_results(d, [it])["acc"] for d, it in zip(docs, items)] == \
        [float(w["correct"]) for w in want]


def test_hub_tasks_fail_at_once_with_one_line(tmp_path, monkeypatch, capsys):
    import deftlab.models.loading as loading

    for var in OFFLINE_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(loading, "_hub_reachable", lambda timeout=3.0: False)
    t0 = time.perf_counter()
    rc = main(["eval-lm", "tiny", "--tasks", "zeroshot7", "--results", str(tmp_path / "res")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and time.perf_counter() - t0 < 30
    assert len(err.splitlines()) == 1
    assert "boolq, piqa, hellaswag, winogrande, arc_easy, arc_challenge, openbookqa" in err
    assert "not reachable" in err and "local tasks" in err
    # refused before the run was claimed: no record, no failed-run directory
    kind_dir = tmp_path / "res" / "lm_eval"
    assert not kind_dir.exists() or not any(kind_dir.iterdir())


def test_a_model_without_a_transformers_tokenizer_is_refused_clearly(tmp_path):
    from deftlab.models import load_model

    lm = load_model("tiny")
    with pytest.raises(DeftlabError, match="needs a transformers tokenizer, got TinyTokenizer"):
        harness.hf_lm(lm.model, lm.tokenizer)


@pytest.mark.model
def test_eval_lm_matches_deftlabs_evaluator(tmp_path, tmp_cache, capsys):
    """`deftlab eval-lm` on a local task: the same outputs, per-problem correctness and accuracy as
    deftlab.eval.generate.evaluate_sets on the same problems (greedy, same prompt, stops and token budget)."""
    import lm_eval

    from deftlab.eval.generate import evaluate_sets
    from deftlab.models import load_model
    from deftlab.store import ResultsStore

    n, mnt = 7, 32  # SmolLM2 on 2 shared CPU cores: keep it small (problem 6 comes out right)
    results = tmp_path / "res"
    rc = main(["eval-lm", "smollm2-135m", "--tasks", "deftlab_generated", "--limit", str(n), "--max-new-tokens",
               str(mnt), "--batch-size", "1", "--device", "cpu", "--results", str(results)])
    out = capsys.readouterr().out
    assert rc == 0, out
    rec = next(ResultsStore(results).records("lm_eval"))
    m = rec["metrics"]
    # the record holds lm-eval's version, the task's version, the shots and which metric was reported
    assert m["lm_eval_version"] == lm_eval.__version__ == rec["config"]["lm_eval_version"]
    t = m["lm_eval_tasks"]["deftlab_generated"]
    assert (t["version"], t["num_fewshot"], t["metric"], t["n"]) == (harness.LOCAL_TASK_VERSION, 0, "acc", n)
    assert m["deftlab_generated_version"] == harness.LOCAL_TASK_VERSION and m["deftlab_generated_fewshot"] == 0
    assert m["deftlab_generated_metric"] == "acc"

    lm = load_model("smollm2-135m")
    task = get_task("generated", max_new_tokens=mnt)
    ours = evaluate_sets(lm.model, lm.tokenizer, task, tmp_path / "ours", eval_sets=["generated"], limit=n,
                         batch_size=1, progress=False)["generated"]
    mine = [json.loads(line) for line in open(tmp_path / "ours" / "generated.predictions.jsonl")]
    theirs = harness.local_predictions(ResultsStore(results).run_dir("lm_eval", rec["key"]) / "lm_eval",
                                       "deftlab_generated")
    assert [r["output"] for r in theirs] == [r["output"] for r in mine]
    assert [r["correct"] for r in theirs] == [r["correct"] for r in mine]
    assert m["deftlab_generated"] == ours["accuracy"] == t["acc"]
    print(f"lm-eval acc {m['deftlab_generated']:.4f} ({m['lm_eval_seconds']:.1f} s), deftlab "
          f"{ours['accuracy']:.4f} ({ours['generation_seconds']:.1f} s)")


def test_a_compress_run_is_a_source_and_a_ref(tmp_path, tmp_cache, monkeypatch):
    """A recorded run's model is rebuilt in memory ("kind/key" on the command line, {ref: ...} in experiments)."""
    from deftlab.experiments.runner import execute, make_spec
    from deftlab.recipes.lm_eval_run import LmEvalConfig, load_source
    from deftlab.store import ResultsStore
    from deftlab.surgery.params import count_params

    monkeypatch.setenv("DEFTLAB_RESULTS", str(tmp_path / "res"))
    params = {"model": "tiny", "allocator": "uniform", "svd": "plain", "keep": 0.8, "ppl": []}
    rec = execute(make_spec("compress", params), ResultsStore())
    model, _, source = load_source(LmEvalConfig.from_params({"run": f"compress/{rec['key']}"}))
    assert source == {"source": f"compress/{rec['key']}", "source_kind": "compress", "source_model": "tiny"}
    assert count_params(model)["total"] == rec["metrics"]["params_total"] < 100_000
    spec = make_spec("lm_eval", {"run": {"ref": {"kind": "compress", "params": params}}, "tasks": ["zeroshot7"]})
    assert spec.params["run"] == f"@compress/{rec['key']}" and list(spec.refs) == ["run"]
