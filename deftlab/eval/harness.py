"""lm-evaluation-harness (`lm_eval`) on an in-memory model: deftlab's local test sets as lm-eval tasks, and the
zero-shot suite compression papers report.

Local tasks (`deftlab_gsm8k`, `deftlab_svamp`, ..., group `deftlab_arith`) are lm-eval `generate_until` tasks
written as YAML into a directory (`write_task_dir`) that lm-eval's TaskManager includes; they read deftlab's own
data files (the data dir), use deftlab's prompt, stop strings and max_new_tokens with greedy decoding, and are
scored by a filter that calls the deftlab task's own `score` on the whole set (answer extraction and correctness
check exactly as `deftlab.eval.generate.evaluate_sets`). The same directory works with the lm_eval CLI
(`lm_eval --include_path DIR --tasks deftlab_gsm8k`) while deftlab is importable.

Hub tasks (group `zeroshot7`: BoolQ, PIQA, HellaSwag, WinoGrande, ARC-e, ARC-c, OBQA) are lm-eval's own and need
the Hugging Face hub for their data; without it they fail at once with one line, before any model work.
"""

from __future__ import annotations

import json
import logging
import math
import time
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import yaml

from deftlab.errors import DeftlabError

log = logging.getLogger(__name__)

LOCAL_TASK_VERSION = 1  # bump when a local task's prompt, data or scoring changes (recorded per task)
LOCAL_PREFIX = "deftlab_"

# deftlab task -> its eval sets offered as lm-eval tasks (generative tasks scored by accuracy only)
LOCAL_SOURCES: dict[str, tuple[str, ...]] = {
    "arith": ("AddSub", "SingleEq", "MultiArith", "SVAMP", "gsm8k", "AQuA", "mawps"),
    "generated": ("generated",),
    "math": ("math500",),
}
LOCAL_GROUPS = {"deftlab_arith": ("AddSub", "SingleEq", "MultiArith", "SVAMP", "gsm8k", "AQuA")}  # LLM-Adapters' six

ZEROSHOT7 = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
HUB_GROUPS = {"zeroshot7": ZEROSHOT7}
# The metric each hub task reports: acc_norm (length-normalised) where lm-eval defines it, as compression papers'
# zero-shot tables do (SliceGPT, SVD-LLM style); BoolQ and WinoGrande have only acc.
REPORTED_METRIC = {"boolq": "acc", "winogrande": "acc", "piqa": "acc_norm", "hellaswag": "acc_norm",
                   "arc_easy": "acc_norm", "arc_challenge": "acc_norm", "openbookqa": "acc_norm"}
# preference for tasks not listed above
METRIC_PREFERENCE = ("acc_norm", "acc", "exact_match")


def local_task_name(dataset: str) -> str:
    return LOCAL_PREFIX + dataset.lower()


def local_tasks() -> dict[str, tuple[str, str]]:
    """lm-eval name -> (deftlab task, eval set) of every local task."""
    return {local_task_name(s): (task, s) for task, sets in LOCAL_SOURCES.items() for s in sets}


def expand_tasks(names: Sequence[str]) -> tuple[list[str], list[str]]:
    """(local task names, hub task names) for `names`: groups expanded, order kept, duplicates dropped."""
    local, hub, known_local = [], [], local_tasks()
    for raw in names:
        name = raw.strip()
        if not name:
            continue
        if name in LOCAL_GROUPS:
            members = [local_task_name(s) for s in LOCAL_GROUPS[name]]
        elif name in HUB_GROUPS:
            members = list(HUB_GROUPS[name])
        else:
            members = [name]
        for m in members:
            if m.startswith(LOCAL_PREFIX):
                if m not in known_local:
                    raise DeftlabError(f"unknown local lm-eval task '{m}'",
                                       f"local tasks: {', '.join(sorted(known_local))} (group deftlab_arith)")
                if m not in local:
                    local.append(m)
            elif m not in hub:
                hub.append(m)
    if not local and not hub:
        raise DeftlabError("no lm-eval task given", "e.g. --tasks deftlab_gsm8k or --tasks zeroshot7")
    return local, hub


# --- the local tasks: YAML + a shim module that lm-eval imports with `!function` --------------------------------
_SHIM = '''"""Written by deftlab (deftlab.eval.harness.write_task_dir): lm-eval imports these through `!function`."""
from deftlab.eval.harness import doc_to_text, load_docs, process_results, score_filter  # noqa: F401
'''


class _Function(str):
    """A YAML `!function` reference."""


yaml.SafeDumper.add_representer(_Function, lambda d, v: d.represent_scalar("!function", str(v)))


@lru_cache(maxsize=16)
def _cached_task(task: str, options_json: str):
    from deftlab.tasks import get_task

    return get_task(task, **json.loads(options_json))


def task_options_for(task: str, data_dir=None, max_new_tokens: int | None = None, options: dict | None = None) -> dict:
    """The keyword options deftlab's task `task` is built with (data_dir / max_new_tokens where it takes them)."""
    import inspect

    from deftlab.tasks.registry import task_class

    params = inspect.signature(task_class(task).__init__).parameters
    opts = {k: v for k, v in (options or {}).items() if k in params}  # e.g. prompt_style: arith tasks only
    if "data_dir" in params and data_dir is not None:
        opts.setdefault("data_dir", str(data_dir))
    if "max_new_tokens" in params and max_new_tokens:
        opts.setdefault("max_new_tokens", int(max_new_tokens))
    return opts


def write_task_dir(out_dir, names: Sequence[str], *, data_dir=None, max_new_tokens: int | None = None,
                   task_options: dict | None = None) -> Path:
    """Write lm-eval task YAMLs for local tasks `names` (and the groups) into `out_dir`; returns it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "deftlab_lm_eval_shim.py").write_text(_SHIM)
    known = local_tasks()
    _check_options(task_options or {}, {known[n][0] for n in names})
    for name in names:
        task, dataset = known[name]
        opts = task_options_for(task, data_dir, max_new_tokens, task_options)
        deft = _cached_task(task, json.dumps(opts, sort_keys=True))
        cfg = {
            "task": name,
            "tag": ["deftlab"],
            "custom_dataset": _Function("deftlab_lm_eval_shim.load_docs"),
            "dataset_kwargs": {"deftlab_task": task, "deftlab_set": dataset, "deftlab_options": opts},
            "test_split": "test",
            "output_type": "generate_until",
            "doc_to_text": _Function("deftlab_lm_eval_shim.doc_to_text"),
            "doc_to_target": "gold",
            "target_delimiter": "",
            "num_fewshot": 0,
            "generation_kwargs": {"until": list(deft.stop_strings), "do_sample": False,
                                  "max_gen_toks": int(deft.max_new_tokens)},
            "filter_list": [{"name": "deftlab", "filter": [
                {"function": "custom", "filter_fn": _Function("deftlab_lm_eval_shim.score_filter")}]}],
            "process_results": _Function("deftlab_lm_eval_shim.process_results"),
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
            "metadata": {"version": LOCAL_TASK_VERSION},
        }
        (out / f"{name}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    for group, sets in LOCAL_GROUPS.items():
        _write_group(out, group, [local_task_name(s) for s in sets])
    for group, members in HUB_GROUPS.items():
        _write_group(out, group, list(members))
    return out


def _check_options(options: dict, tasks: set[str]) -> None:
    import inspect

    from deftlab.tasks.registry import task_class

    taken = {p for t in tasks for p in inspect.signature(task_class(t).__init__).parameters} - {"self"}
    bad = sorted(set(options) - taken)
    if bad and tasks:
        raise DeftlabError(f"task option(s) {bad} apply to none of the local tasks' deftlab tasks {sorted(tasks)}",
                           f"valid options: {', '.join(sorted(taken))}")


def _write_group(out: Path, group: str, members: list[str]) -> None:
    # no aggregate: members report different metrics; deftlab averages the reported ones itself
    (out / f"_{group}.yaml").write_text(yaml.safe_dump({"group": group, "task": members,
                                                        "metadata": {"version": LOCAL_TASK_VERSION}},
                                                       sort_keys=False))


# functions lm-eval calls (through the shim)
def load_docs(deftlab_task: str, deftlab_set: str, deftlab_options: dict, **_metadata):
    """The eval set as a datasets.DatasetDict {"test": ...}: deftlab's prompt, gold and question per problem."""
    import datasets

    task = _cached_task(deftlab_task, json.dumps(deftlab_options, sort_keys=True))
    rows = [{"prompt": e.prompt, "gold": "" if e.gold is None else str(e.gold), "question": e.question,
             "index": i, "deftlab_task": deftlab_task, "deftlab_set": deftlab_set,
             "deftlab_options": json.dumps(deftlab_options, sort_keys=True)}
            for i, e in enumerate(task.eval_examples(deftlab_set))]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def doc_to_text(doc: dict) -> str:
    return doc["prompt"]  # verbatim (a Jinja template could touch whitespace)


def score_filter(resps, docs):
    """Score every response of one task with the deftlab task's `score` (one call, so per-set work such as the
    train-overlap check runs once): each response becomes its item {output, extracted, correct, ...}."""
    from deftlab.eval.generate import cut_at_stop
    from deftlab.tasks import Example

    resps, docs = list(resps), list(docs)
    if not docs:
        return resps
    d0 = docs[0]
    task = _cached_task(d0["deftlab_task"], d0["deftlab_options"])
    outputs = [cut_at_stop(r[0] if isinstance(r, (list, tuple)) else r, task.stop_strings) for r in resps]
    examples = [Example(prompt=d["prompt"], response="", gold=d["gold"], question=d["question"],
                        meta={"index": d["index"]}) for d in docs]
    items, _ = task.score(d0["deftlab_set"], examples, outputs)
    return [{"output": o, **{k: _plain(v) for k, v in it.items()}} for o, it in zip(outputs, items, strict=True)]


def process_results(doc: dict, results: list) -> dict:
    return {"acc": float(bool(results[0]["correct"]))}


def _plain(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v if isinstance(v, (str, int, float, bool)) or v is None else str(v)


# --- running ---------------------------------------------------------------------------------------------------
def lm_eval_version() -> str:
    try:
        from importlib.metadata import version

        return version("lm_eval")
    except Exception:  # noqa: BLE001  (a source checkout without metadata)
        import lm_eval

        return getattr(lm_eval, "__version__", "unknown")


def require_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError as e:
        raise DeftlabError("lm-evaluation-harness is not installed",
                           "pip install 'lm-eval>=0.4.10' (or reinstall deftlab)") from e


def check_hub(hub_tasks: Sequence[str]) -> None:
    """One clear error, at once, when hub tasks are asked for and the hub cannot be reached (never a hang)."""
    if not hub_tasks:
        return
    from deftlab import settings
    from deftlab.models.loading import _hub_reachable

    if settings.hub_offline():
        return  # asked for offline use: the datasets library reads its local cache (or fails, caught below)
    if not _hub_reachable():
        raise DeftlabError(f"lm-eval tasks {', '.join(hub_tasks)} need their data from the Hugging Face hub, "
                           "which is not reachable", "run where the hub is reachable (or with their datasets "
                           "cached and HF_DATASETS_OFFLINE=1), or use local tasks (e.g. deftlab_gsm8k)")


def hf_lm(model, tokenizer, *, batch_size: int = 8, max_length: int | None = None):
    """lm-eval's HFLM around an in-memory model (no copy, no reload)."""
    import transformers

    if not isinstance(tokenizer, (transformers.PreTrainedTokenizer, transformers.PreTrainedTokenizerFast)):
        raise DeftlabError(f"lm-eval's HFLM needs a transformers tokenizer, got {type(tokenizer).__name__}",
                           "evaluate a transformers model (e.g. smollm2-135m); the tiny test model's byte "
                           "tokenizer is deftlab's own")
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)


def _quiet_lm_eval() -> None:
    for name in ("lm_eval", "lm-eval"):
        logging.getLogger(name).setLevel(logging.ERROR)


def evaluate(model, tokenizer, tasks: Sequence[str], *, out_dir, limit: int | None = None,
             num_fewshot: int | None = None, batch_size: int = 8, max_new_tokens: int | None = None,
             data_dir=None, task_options: dict | None = None, seed: int = 0) -> dict:
    """Run lm-eval `tasks` (names or groups) on `model`; returns the record part:

    {"lm_eval_version", "tasks": {name: {version, num_fewshot, metric, value, stderr, n, acc, acc_norm, ...}},
     "averages": {group: mean of the reported metric}, "seconds"}. Files in `out_dir`: tasks/ (the YAMLs),
    results.json (lm-eval's results, configs included) and samples_<task>.jsonl (every doc, response, score).
    """
    require_lm_eval()
    local, hub = expand_tasks(tasks)
    check_hub(hub)
    from lm_eval.evaluator import simple_evaluate
    from lm_eval.tasks import TaskManager

    _quiet_lm_eval()
    out = Path(out_dir)
    task_dir = write_task_dir(out / "tasks", local, data_dir=data_dir, max_new_tokens=max_new_tokens,
                              task_options=task_options)
    # lm-eval's own task index (~15 s to build) only when a hub task needs it
    manager = TaskManager(include_path=str(task_dir), include_defaults=bool(hub))
    lm = hf_lm(model, tokenizer, batch_size=batch_size)
    t0 = time.perf_counter()
    try:
        res = simple_evaluate(model=lm, tasks=local + hub, task_manager=manager, num_fewshot=num_fewshot,
                              limit=limit, log_samples=True, bootstrap_iters=1000, random_seed=seed,
                              numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
    except (ConnectionError, OSError) as e:  # e.g. offline with an uncached hub dataset
        if not hub:
            raise
        raise DeftlabError(f"lm-eval could not load the data of {', '.join(hub)}: {str(e).splitlines()[0][:200]}",
                           "run where the Hugging Face hub is reachable, or use local tasks") from e
    seconds = time.perf_counter() - t0
    samples = res.pop("samples", {}) or {}
    for name, rows in samples.items():
        with open(out / f"samples_{name}.jsonl", "w") as f:
            for r in rows:
                f.write(json.dumps(r, default=str, ensure_ascii=False) + "\n")
    (out / "results.json").write_text(json.dumps(res, default=str, indent=1))
    summary = summarize(res, local + hub)
    summary["averages"] = {g: _mean([summary["tasks"][m]["value"] for m in members])
                           for g, members in {**HUB_GROUPS, **{k: [local_task_name(s) for s in v]
                                                               for k, v in LOCAL_GROUPS.items()}}.items()
                           if all(m in summary["tasks"] for m in members)}
    summary.update(seconds=seconds, limit=limit, batch_size=batch_size,
                   decoding="greedy (do_sample false), lm-eval HFLM" if local else None)
    return summary


def _mean(values):
    vals = [v for v in values if isinstance(v, (int, float))]
    return sum(vals) / len(vals) if vals else None


def reported_metric(task: str, available: Sequence[str]) -> str:
    if task in REPORTED_METRIC and REPORTED_METRIC[task] in available:
        return REPORTED_METRIC[task]
    for m in METRIC_PREFERENCE:
        if m in available:
            return m
    if not available:
        raise DeftlabError(f"lm-eval reported no metric for task '{task}'")
    return sorted(available)[0]


def summarize(res: dict, names: Sequence[str]) -> dict:
    """Per task: lm-eval's task version, shots, the reported metric (and why), its value and stderr, n."""
    tasks = {}
    for name in names:
        r = res["results"].get(name)
        if r is None:
            continue
        values = {}
        for k, v in r.items():  # "acc,none" / "acc,deftlab" / "acc_stderr,none"
            metric, _, flt = k.partition(",")
            if flt and not metric.endswith("_stderr") and isinstance(v, (int, float)):
                values[metric] = (float(v), flt)
        metric = reported_metric(name, list(values))
        value, flt = values[metric]
        stderr = r.get(f"{metric}_stderr,{flt}")
        n = (res.get("n-samples") or {}).get(name, {})
        tasks[name] = {"version": _version_of(res, name), "num_fewshot": (res.get("n-shot") or {}).get(name),
                       "metric": metric, "filter": flt, "value": value,
                       "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
                       "n": n.get("effective"), "n_total": n.get("original"),
                       "local": name.startswith(LOCAL_PREFIX),
                       **{m: v for m, (v, _) in values.items()}}
    return {"lm_eval_version": lm_eval_version(), "tasks": tasks}


def _version_of(res: dict, name: str):
    v = (res.get("versions") or {}).get(name)
    if v is None:
        v = ((res.get("configs") or {}).get(name, {}).get("metadata") or {}).get("version")
    return v


def flat_metrics(summary: dict) -> dict:
    """Flat, table-friendly metrics: <task> (the reported metric's value), <task>_metric, <task>_version,
    <task>_n, <task>_fewshot, <group>_avg, lm_eval_version."""
    m: dict[str, Any] = {"lm_eval_version": summary["lm_eval_version"]}
    for name, t in summary["tasks"].items():
        m[name] = t["value"]
        m[f"{name}_metric"] = t["metric"]
        m[f"{name}_version"] = t["version"]
        m[f"{name}_fewshot"] = t["num_fewshot"]
        m[f"{name}_n"] = t["n"]
        if t["stderr"] is not None:
            m[f"{name}_stderr"] = t["stderr"]
    for g, v in (summary.get("averages") or {}).items():
        m[f"{g}_avg"] = v
    m["lm_eval_seconds"] = summary.get("seconds")
    return m


def local_predictions(out_dir, name: str) -> list[dict]:
    """The per-problem items (output, extracted, correct) of local task `name`, in problem order."""
    rows = [json.loads(line) for line in open(Path(out_dir) / f"samples_{name}.jsonl")]
    rows.sort(key=lambda r: r["doc_id"])
    out = []
    for r in rows:
        item = r["filtered_resps"]
        item = item[0] if isinstance(item, list) else item
        out.append({"index": r["doc"]["index"], "raw_output": r["resps"][0][0] if r["resps"] else None, **item})
    return out

