"""The ``osd`` run kind: compress a fine-tuned run's updates with a codec at a budget; error, bytes, accuracy.

Params (experiments/osd.yaml; unknown keys are an error):

- ``finetune``: the fine-tuning run. The runner passes ``{ref, dir, params, metrics}``; also accepted: a run
  directory path, ``{ref: {kind: finetune, params: {...}}}``, or the finetune params themselves (their results-store
  key is computed exactly as the runner does, with ``make_spec``; the run must already be recorded).
- ``codec`` (lowrank | sparse | truncsvd | magtruncsvd | osd | none), ``budget`` (fraction of each dense fp32 ΔW,
  e.g. 0.02 / "2%", or a total byte count split in proportion to matrix sizes, or "full"). Codec "none" or budget
  "full" is the uncompressed reference: base + exact ΔW.
- optional: ``model`` (checked against the run's), ``task`` (default: the run's), ``eval_sets``, ``preset``
  (configs/presets: eval_limit, eval_batch_size, max_new_tokens, cutoff_len), ``eval_limit``, ``eval`` (false
  skips generation), ``grad_at`` (base | truncated | finetuned | none; see deftlab.delta.extract),
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
import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from deftlab.errors import DataNotFoundError, DeftlabError

KNOWN_PARAMS = frozenset({
    "finetune", "codec", "budget", "model", "task", "eval_sets", "preset", "eval_limit", "eval_batch_size",
    "max_new_tokens", "cutoff_len", "eval", "grad_at", "grad_batches", "grad_batch_size", "value_dtype",
    "codec_options", "seed", "device",
})


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, json.JSONDecodeError):
        return None


def _record_of(run_dir: Path) -> dict:
    """{params, metrics} of a run directory: the results store's record.json, else the run's metrics.json."""
    rec = _json(run_dir / "record.json")
    rec = rec if isinstance(rec, dict) else {}
    params = rec.get("params") if isinstance(rec.get("params"), dict) else {}
    metrics = rec.get("metrics") if isinstance(rec.get("metrics"), dict) and rec.get("status") == "ok" else None
    if metrics is None:
        flat = _json(run_dir / "metrics.json")  # written by run_finetune itself (flat metrics)
        metrics = flat if isinstance(flat, dict) else {}
    return {"params": params, "metrics": metrics}


def resolve_finetune(value: Any) -> tuple[Path, dict]:
    """(run directory, {params, metrics}) of the fine-tuning run an osd run refers to."""
    if isinstance(value, dict) and isinstance(value.get("dir"), str):
        run_dir = Path(value["dir"])
        rec = {"params": value.get("params", {}), "metrics": value.get("metrics", {})}
    elif isinstance(value, (str, Path)):
        run_dir = Path(value).expanduser()
        rec = _record_of(run_dir)
    elif isinstance(value, dict):
        from deftlab.experiments.runner import make_spec
        from deftlab.experiments.store import ResultsStore

        if isinstance(value.get("ref"), dict):
            spec = make_spec(value["ref"].get("kind", "finetune"), value["ref"].get("params") or {})
        else:
            spec = make_spec("finetune", value)
        store = ResultsStore()
        if store.status(spec.kind, spec.key).state != "done":
            raise DataNotFoundError(f"fine-tuning run {spec.ref} is not recorded in {store.root}",
                                    "run it first, or declare it as a ref so the runner records it")
        run_dir = store.run_dir(spec.kind, spec.key)
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


def _eval_preset(ft_dir: Path, name: str | None):
    """The training preset the run was evaluated with (saved in finetune_config.json), else preset `name`."""
    from deftlab.config import from_dict
    from deftlab.train.presets import TrainPreset, load_preset

    saved = {}
    p = ft_dir / "finetune_config.json"
    if p.is_file():
        try:
            saved = json.loads(p.read_text()).get("preset") or {}
        except (OSError, json.JSONDecodeError, AttributeError):
            saved = {}
    if saved:
        return from_dict(TrainPreset, saved)
    if name:
        return load_preset(name)
    return TrainPreset()


def run_osd(params: dict, run_dir) -> dict:
    """Registry run kind "osd" (see the module docstring)."""
    from deftlab.delta.extract import (
        compress_updates,
        extract_extras,
        extract_updates,
        gradient_batches,
        gradients_at,
        load_base_for,
        load_finetuned_run,
        matrix_budgets,
        run_config,
        run_task,
        update_kinds,
    )
    from deftlab.delta.storage import apply_delta, save_delta

    unknown = sorted(set(params) - KNOWN_PARAMS)
    if unknown:
        raise DeftlabError(f"osd run: unknown param(s) {unknown}", f"known: {', '.join(sorted(KNOWN_PARAMS))}")
    for need in ("finetune", "codec", "budget"):
        if need not in params:
            raise DeftlabError(f"osd run: missing param '{need}'", "see deftlab.delta.experiment for the params")
    run_dir = Path(run_dir)
    codec = str(params["codec"])
    budget = params["budget"]
    grad_at = params.get("grad_at", "base")
    value_dtype = params.get("value_dtype", "float32")
    torch.manual_seed(int(params.get("seed", 0)))

    ft_dir, ft_rec = resolve_finetune(params["finetune"])
    ft_params, ft_metrics = ft_rec.get("params") or {}, ft_rec.get("metrics") or {}
    ft_cfg = run_config(ft_dir)
    preset = _eval_preset(ft_dir, params.get("preset") or ft_cfg.get("preset") or ft_params.get("preset"))
    task = run_task(ft_dir, params.get("task") or ft_cfg.get("task") or ft_params.get("task"))

    lm, ft = load_finetuned_run(ft_dir)
    if params.get("model") and params["model"] != lm.spec.name:
        raise DeftlabError(f"osd run: model '{params['model']}' but the fine-tuned run used '{lm.spec.name}'",
                           "make the osd model param match its finetune run")
    base_lm = load_base_for(lm, ft, device=params.get("device"))
    kinds = update_kinds(base_lm.model, ft)
    updates = extract_updates(base_lm.model, ft)
    extras = extract_extras(base_lm.model, ft)
    del ft, lm  # only the base and the updates are needed from here on

    cutoff_len = int(params.get("cutoff_len", preset.cutoff_len))
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
        from deftlab.train.pipeline import evaluate_resumable, summarize_eval

        model = base_lm.model
        apply_delta(model, decoded)
        with torch.no_grad():
            named = dict(model.named_parameters())
            for k, v in extras.items():
                named[k].copy_((named[k].float() + v.to(named[k].device)).to(named[k].dtype))
        del decoded
        overrides = {k: params[k] for k in ("eval_limit", "eval_batch_size", "max_new_tokens") if k in params}
        if overrides:
            preset = replace(preset, **overrides)
        eval_sets = list(params.get("eval_sets") or ft_cfg.get("eval_sets") or preset.eval_sets
                         or task.default_eval_sets)
        results = evaluate_resumable(model, base_lm.tokenizer, task, run_dir / "eval", eval_sets=eval_sets,
                                     preset=preset, progress=False)
        metrics.update(summarize_eval(results))
        metrics["eval_n"] = sum(int(m.get("n", 0)) for m in results.values())
        metrics["eval_limit"] = preset.eval_limit
    if notes:
        metrics["notes"] = notes
    return metrics
