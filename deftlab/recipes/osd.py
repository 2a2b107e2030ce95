"""The ``osd`` run kind: compress a fine-tuned run's updates with a codec at a budget; error, bytes, accuracy.

Params (experiments/osd.yaml; unknown keys are an error):

- ``finetune``: the fine-tuning run. The runner passes ``{ref, dir, params, metrics}``; also accepted: a run
  directory path, ``{ref: {kind: finetune, params: {...}}}``, or the finetune params themselves (their results-store
  key is computed as the runner computes a finetune run's: params + training-profile fingerprint; the run must
  already be recorded).
- ``codec`` (lowrank | sparse | truncsvd | magtruncsvd | osd | none), ``budget`` (fraction of each dense fp32 ΔW,
  e.g. 0.02 / "2%", or a total byte count split in proportion to matrix sizes, or "full"). Codec "none" or budget
  "full" is the uncompressed reference: base + exact ΔW.
- optional: ``model`` (checked against the run's), ``task`` (default: the run's), ``eval_sets``, ``profile`` (a
  training profile for eval_limit, eval_batch_size, max_new_tokens, cutoff_len; default: the one the fine-tuning
  run recorded), ``eval_limit``, ``eval`` (false skips generation), ``grad_at`` (base | truncated | finetuned | none; see deftlab.delta.extract),
  ``grad_batches``, ``grad_batch_size``, ``value_dtype``, ``codec_options`` (e.g. {rank: 4}), ``seed``,
  ``device``.

Metrics: ``rel_error`` (global ‖ΔW − ΔŴ‖_F/‖ΔW‖_F over all matrices), ``rel_error_mean`` / ``rel_error_max`` (per
matrix), ``nbytes``, ``budget_bytes``, ``dense_nbytes``, ``bytes_fraction``, ``n_matrices``, ``extra_nbytes``
(uncompressed non-matrix parameters, outside the budget), ``acc_<set>`` (fractions), ``avg``, ``eval_n``,
``ft_avg`` (the fine-tuned run's own average, when recorded). Artifacts: ``delta.safetensors`` (the stored
updates), ``per_matrix.csv``, ``eval/`` (predictions).
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping

import torch

from deftlab.config import from_dict, to_dict
from deftlab.delta.extract import (
    ExportReport,
    module_of,
    compress_updates,
    export_updates,
    extract_extras,
    extract_updates,
    gradient_batches,
    gradients_at,
    matrix_budgets,
    update_kinds,
)
from deftlab.delta.storage import apply_delta, save_delta
from deftlab.errors import DataNotFoundError, DeftlabError
from deftlab.models import load_model
from deftlab.recipes.finetune import FinetuneConfig, evaluate_profile, load_finetuned, summarize_eval
from deftlab.store import ResultsStore, read_record, run_key
from deftlab.tasks import get_task
from deftlab.train.profiles import TrainProfile, load_profile, profile_fingerprint

KNOWN_PARAMS = frozenset({
    "finetune", "codec", "budget", "model", "task", "eval_sets", "profile", "eval_limit", "eval_batch_size",
    "max_new_tokens", "cutoff_len", "eval", "grad_at", "grad_batches", "grad_batch_size", "value_dtype",
    "codec_options", "seed", "device",
})


def _record_of(run_dir: Path) -> dict:
    rec = read_record(run_dir)
    return {"params": rec.get("params", {}), "metrics": rec.get("metrics", {})}


def resolve_finetune(value: Any) -> tuple[Path, dict]:
    """(run directory, {params, metrics}) of the fine-tuning run an osd run refers to."""
    if isinstance(value, dict) and isinstance(value.get("dir"), str):
        run_dir = Path(value["dir"])
        rec = {"params": value.get("params", {}), "metrics": value.get("metrics", {})}
    elif isinstance(value, (str, Path)):
        run_dir = Path(value).expanduser()
        rec = _record_of(run_dir)
    elif isinstance(value, dict):
        ft_params = value["ref"].get("params") or {} if isinstance(value.get("ref"), dict) else value
        # the key exactly as the runner computes it for a finetune run (deftlab.experiments.runner.make_spec)
        key = run_key("finetune", ft_params, profile_fingerprint(ft_params))
        store = ResultsStore()
        if store.status("finetune", key).state != "done":
            raise DataNotFoundError(f"fine-tuning run finetune/{key} is not recorded in {store.root}",
                                    "run it first, or declare it as a ref so the runner records it")
        run_dir = store.run_dir("finetune", key)
        rec = _record_of(run_dir)
    else:
        raise DeftlabError(f"osd param 'finetune' is a {type(value).__name__}",
                           "give a finetune run directory, the finetune params, or a {ref: ...}")
    if not run_dir.is_dir():
        raise DataNotFoundError(f"fine-tuning run directory {run_dir} not found", "run the fine-tuning first")
    return run_dir, rec


def _layer_and_matrix(name: str) -> tuple[int | None, str]:
    m = re.search(r"layers\.(\d+)\.", name)
    return (int(m.group(1)) if m else None), name.rsplit(".", 1)[-1]


def write_per_matrix_csv(path: Path, rows: list[dict]) -> None:
    cols = ["name", "layer", "matrix", "kind", "rows", "cols", "budget_bytes", "nbytes", "rel_error", "rank", "k",
            "s_u", "s_v", "c"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            layer, matrix = _layer_and_matrix(r["name"])
            meta = r.get("meta") or {}
            w.writerow({"name": r["name"], "layer": layer, "matrix": matrix, "kind": r.get("kind", ""),
                        "rows": r["shape"][0], "cols": r["shape"][1], "budget_bytes": r["budget_bytes"],
                        "nbytes": r["nbytes"], "rel_error": r["rel_error"], "rank": meta.get("rank", meta.get("r")),
                        "k": meta.get("k"), "s_u": meta.get("s_u"), "s_v": meta.get("s_v"), "c": meta.get("c")})


def eval_profile(ft_record: dict) -> TrainProfile:
    """The training profile a fine-tuning run was evaluated with (from its record), else the one it names."""
    saved = (ft_record.get("config") or {}).get("training_profile")
    if saved:
        return from_dict(TrainProfile, saved)
    name = (ft_record.get("params") or {}).get("profile")
    return load_profile(name) if name else TrainProfile()


def run_task(ft_record: dict, name: str | None = None):
    """The run's task exactly as fine-tuning built it (data_dir, task options), or task `name` if it differs."""
    params = ft_record.get("params") or {}
    run_name = params.get("task", "arith")
    if name and name != run_name:
        return get_task(name)
    return FinetuneConfig.from_params(params).make_task()


def load_base_for(lm: Any, finetuned_model: Any, device: str | None = None):
    """A fresh copy of the dense base model of a run (same name, same dtype as the fine-tuned embeddings)."""
    emb = module_of(finetuned_model).get_input_embeddings().weight
    dtype = str(emb.dtype).removeprefix("torch.")
    return load_model(lm.spec.name, dtype=dtype, device=device or _device_of(finetuned_model))


def _device_of(model: Any) -> str:
    try:
        return str(next(module_of(model).parameters()).device)
    except StopIteration:
        return "cpu"


def export_run(run_dir: str | os.PathLike, codec: str, budget: Any, out_path: str | os.PathLike | None = None, *,
               grad_at: str = "base", grad_batches: int = 4, grad_batch_size: int = 4, cutoff_len: int = 256,
               task: str | None = None, value_dtype: str = "float32", device: str | None = None,
               codec_options: Mapping[str, Any] | None = None) -> ExportReport:
    """load_finetuned → extract ΔW → (task gradients for osd) → encode per matrix → save_delta.

    `out_path` defaults to <run_dir>/delta-<codec>-<budget>.safetensors. The task for gradients is the run's
    unless `task` names another. The base model is loaded on `device` (default: where the fine-tuned model is).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DataNotFoundError(f"run directory {run_dir} not found", "pass a recorded fine-tuning run's directory")
    record = read_record(run_dir)
    lm, ft = load_finetuned(run_dir)
    base_lm = load_base_for(lm, ft, device=device or _device_of(ft))
    batches = None
    if codec == "osd" and grad_at != "none":
        batches = gradient_batches(run_task(record, task), base_lm.tokenizer, n_batches=grad_batches,
                                   batch_size=grad_batch_size, cutoff_len=cutoff_len)
    tag = str(budget).replace("%", "pct").replace("/", "_")
    out = Path(out_path) if out_path else run_dir / f"delta-{codec}-{tag}.safetensors"
    meta = {"run_id": run_dir.name, "run_dir": str(run_dir.resolve()),
            "task": task or (record.get("config") or {}).get("task")}
    return export_updates(base_lm, ft, codec, budget, out, batches=batches, grad_at=grad_at,
                          value_dtype=value_dtype, codec_options=codec_options, metadata=meta)


def _check_params(params: dict) -> None:
    unknown = sorted(set(params) - KNOWN_PARAMS)
    if unknown:
        raise DeftlabError(f"osd run: unknown param(s) {unknown}", f"known: {', '.join(sorted(KNOWN_PARAMS))}")
    for need in ("finetune", "codec", "budget"):
        if need not in params:
            raise DeftlabError(f"osd run: missing param '{need}'", "see deftlab.recipes.osd for the params")


def eval_settings(params: dict, ft_record: dict, task) -> tuple[TrainProfile, list[str]]:
    """(training profile with the run's evaluation overrides, evaluation sets) an osd run evaluates with."""
    profile = load_profile(params["profile"]) if params.get("profile") else eval_profile(ft_record)
    overrides = {k: params[k] for k in ("eval_limit", "eval_batch_size", "max_new_tokens") if k in params}
    if overrides:
        profile = replace(profile, **overrides)
    eval_sets = list(params.get("eval_sets") or (ft_record.get("config") or {}).get("eval_sets") or profile.eval_sets
                     or task.default_eval_sets)
    return profile, eval_sets


def resolved_config(params: dict) -> dict:
    """What an osd run will use (codec, budget, the evaluation profile and sets), as the store records it."""
    _check_params(params)
    ft_dir, _ = resolve_finetune(params["finetune"])
    ft_record = read_record(ft_dir)  # read once; the helpers below take it
    task = run_task(ft_record, params.get("task"))
    profile, eval_sets = eval_settings(params, ft_record, task)
    return {"finetune": str(ft_dir.name), "task": task.name, "codec": params["codec"], "budget": params["budget"],
            "grad_at": params.get("grad_at", "base"), "value_dtype": params.get("value_dtype", "float32"),
            "eval": params.get("eval", True), "eval_sets": eval_sets, "eval_limit": profile.eval_limit,
            "max_new_tokens": profile.max_new_tokens, "training_profile": to_dict(profile)}


def run_osd(params: dict, run_dir) -> dict:
    """Run kind "osd" (see the module docstring)."""
    _check_params(params)
    run_dir = Path(run_dir)
    codec = str(params["codec"])
    budget = params["budget"]
    grad_at = params.get("grad_at", "base")
    value_dtype = params.get("value_dtype", "float32")
    torch.manual_seed(int(params.get("seed", 0)))

    ft_dir, _ = resolve_finetune(params["finetune"])
    ft_record = read_record(ft_dir)  # read once; the helpers below take it
    ft_metrics = ft_record.get("metrics") or {}
    task = run_task(ft_record, params.get("task"))
    profile, eval_sets = eval_settings(params, ft_record, task)

    lm, ft = load_finetuned(ft_dir)
    if params.get("model") and params["model"] != lm.spec.name:
        raise DeftlabError(f"osd run: model '{params['model']}' but the fine-tuned run used '{lm.spec.name}'",
                           "make the osd model param match its finetune run")
    base_lm = load_base_for(lm, ft, device=params.get("device"))
    kinds = update_kinds(base_lm.model, ft)
    updates = extract_updates(base_lm.model, ft)
    extras = extract_extras(base_lm.model, ft)
    del ft, lm  # only the base and the updates are needed from here on

    cutoff_len = int(params.get("cutoff_len", profile.cutoff_len))
    grads = None
    if codec == "osd" and grad_at != "none":
        batches = gradient_batches(task, base_lm.tokenizer, n_batches=int(params.get("grad_batches", 4)),
                                   batch_size=int(params.get("grad_batch_size", 4)), cutoff_len=cutoff_len,
                                   seed=int(params.get("seed", 0)))
        budgets = matrix_budgets({n: tuple(d.shape) for n, d in updates.items()}, budget)
        grads = gradients_at(base_lm.model, updates, batches, grad_at, budgets, value_dtype)
    encoded, stats, decoded = compress_updates(updates, codec, budget, grads=grads, value_dtype=value_dtype,
                                               kinds=kinds, codec_options=params.get("codec_options"),
                                               keep_decoded=True)
    if encoded:
        save_delta(run_dir / "delta.safetensors", encoded,
                   {"run_id": ft_dir.name, "base_model": base_lm.spec.name, "base_fingerprint": base_lm.fingerprint,
                    "codec": codec, "budget": budget if isinstance(budget, (int, float)) else str(budget),
                    "value_dtype": value_dtype, "grad_at": grad_at if codec == "osd" else None, "kinds": kinds,
                    "rel_error": {r["name"]: r["rel_error"] for r in stats.rows}})
    write_per_matrix_csv(run_dir / "per_matrix.csv", stats.rows)

    metrics: dict[str, Any] = stats.summary()
    metrics["budget"] = metrics["budget"] if isinstance(metrics["budget"], (int, float)) else str(metrics["budget"])
    metrics["extra_nbytes"] = sum(v.numel() * v.element_size() for v in extras.values())
    metrics["grad_at"] = grad_at if codec == "osd" else None
    notes = []
    if extras:
        notes.append(f"{len(extras)} non-matrix parameters changed by fine-tuning (norms/biases) are applied "
                     f"uncompressed ({metrics['extra_nbytes']} bytes, outside the budget)")
    if isinstance(ft_metrics.get("avg"), (int, float)):
        metrics["ft_avg"] = ft_metrics["avg"]

    if params.get("eval", True):
        model = base_lm.model
        apply_delta(model, decoded)
        with torch.no_grad():
            named = dict(model.named_parameters())
            for k, v in extras.items():
                named[k].copy_((named[k].float() + v.to(named[k].device)).to(named[k].dtype))
        del decoded
        results = evaluate_profile(model, base_lm.tokenizer, task, run_dir / "eval", eval_sets=eval_sets,
                                   profile=profile, progress=False)
        metrics.update(summarize_eval(results))
        metrics["eval_n"] = sum(int(m.get("n", 0)) for m in results.values())
        metrics["eval_limit"] = profile.eval_limit
    if notes:
        metrics["notes"] = notes
    return metrics
