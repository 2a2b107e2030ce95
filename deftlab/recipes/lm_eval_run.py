"""Run kind "lm_eval": lm-evaluation-harness tasks on an in-memory model (deftlab.eval.harness).

The model is a dense one (`model`: a name in configs/models, a hub id, or a local HF directory such as an
export), a `deftlab delta export` file applied to its base (`delta`), or rebuilt from a recorded run (`run`):
a finetune run (adapter merged, `load_finetuned`) or a compress run (the decomposed model, from the cache).
`run` is "kind/key" in the results store ($DEFTLAB_RESULTS), a run directory, or, in an experiment,
`{ref: {kind: finetune, params: {...}}}` (the runner records that run first).

Metrics (flat, for tables): <task> (the reported metric's value), <task>_metric (acc | acc_norm), <task>_version,
<task>_fewshot, <task>_n, <task>_stderr, <group>_avg (e.g. zeroshot7_avg), lm_eval_version, lm_eval_tasks (the
same per task, nested). Artifacts: lm_eval/results.json (lm-eval's own, task configs included),
lm_eval/samples_<task>.jsonl, lm_eval/tasks/ (the local tasks' YAMLs).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deftlab import settings
from deftlab.config import ConfigError, from_params, replace, to_dict
from deftlab.errors import DeftlabError
from deftlab.models import ModelConfig
from deftlab.models.factored_format import export_record, is_factored_export, load_factored
from deftlab.models.loading import torch_dtype

RUN_SOURCES = ("finetune", "compress")


@dataclass(frozen=True)
class LmEvalConfig:
    """tasks: lm-eval task names or groups (local deftlab_<set>, group deftlab_arith; hub tasks and group
    zeroshot7). num_fewshot: None = each task's own (0 for the local tasks and zeroshot7). limit: first N docs per
    task. max_new_tokens: local tasks only (None = the deftlab task's). task_options: deftlab task options for the
    local tasks (e.g. {prompt_style: llm-adapters})."""

    model: ModelConfig = field(default_factory=ModelConfig)
    run: Any = None
    delta: str | None = None
    tasks: tuple[str, ...] = ("deftlab_arith",)
    num_fewshot: int | None = None
    limit: int | None = None
    batch_size: int = 8
    max_new_tokens: int | None = None
    task_options: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    data_dir: str | None = None

    @classmethod
    def from_params(cls, params: dict) -> "LmEvalConfig":
        return from_params(cls, params)

    def validate(self) -> None:
        if not self.tasks:
            raise ConfigError("tasks is empty", "e.g. tasks: [deftlab_gsm8k] or [zeroshot7]")
        if self.run is not None and self.delta is not None:
            raise ConfigError("both run and delta given", "a delta file is applied to a dense model: drop run")
        for name in ("batch_size", "limit", "max_new_tokens"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ConfigError(f"{name} must be positive, got {v}", f"set {name} above 0, or leave it unset")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise ConfigError(f"num_fewshot must be >= 0, got {self.num_fewshot}")

    def resolve(self) -> "LmEvalConfig":
        return replace(self, model=self.model.resolve())


def resolve_run(value: Any) -> tuple[Path, dict]:
    """(directory, record) of the run `value` names: the runner's {ref, dir, ...}, a directory, or "kind/key"."""
    from deftlab.store import ResultsStore, read_record

    if isinstance(value, dict) and isinstance(value.get("dir"), str):
        run_dir = Path(value["dir"])
    elif isinstance(value, str):
        run_dir = ResultsStore().locate(value)
    else:
        raise DeftlabError(f"lm_eval param 'run' is a {type(value).__name__}",
                           "give 'kind/key', a run directory, or {ref: {kind: ..., params: ...}}")
    return run_dir, read_record(run_dir)


def load_source(cfg: LmEvalConfig):
    """(model, tokenizer, description) of what the run evaluates, in eval mode."""
    if cfg.run is not None:
        run_dir, rec = resolve_run(cfg.run)
        kind = rec.get("kind")
        ref = f"{kind}/{rec.get('key')}"
        if kind == "finetune":
            from deftlab.recipes.finetune import load_finetuned

            lm, model = load_finetuned(run_dir, merge=True)
        elif kind == "compress":
            from deftlab.recipes.compress import CompressConfig, compress_model

            ccfg = CompressConfig.from_params(rec["params"]).resolve()
            dcfg = ccfg.decomposition
            lm = ccfg.model.load(weights=not (dcfg.decomposes and dcfg.blockwise))
            model, _ = compress_model(dcfg, lm, data_dir=ccfg.data_dir)  # from the decomposition cache
        else:
            raise DeftlabError(f"run {ref} is a '{kind}' run, which holds no model to evaluate",
                               f"pass a {' or '.join(RUN_SOURCES)} run, or a model")
        source = {"source": ref, "source_kind": kind, "source_model": (rec.get("params") or {}).get("model")}
        tokenizer = lm.tokenizer
    elif cfg.delta is None and is_factored_export(cfg.model.model):
        rec = export_record(cfg.model.model)
        name = cfg.model.dtype if cfg.model.dtype not in (None, "auto") else rec.get("dtype", "float32")
        dtype = torch_dtype(name)
        model, tokenizer = load_factored(cfg.model.model, dtype=dtype, device=cfg.model.device)
        source = {"source": cfg.model.model, "source_kind": "export", "source_model": rec.get("model")}
    else:
        lm = cfg.model.load()
        model, tokenizer = lm.model, lm.tokenizer
        source = {"source": cfg.model.model, "source_kind": "model", "source_model": cfg.model.model}
        if cfg.delta:
            from deftlab.delta.extract import apply_stored

            model, _ = apply_stored(lm, cfg.delta)
            source.update(source=str(cfg.delta), source_kind="delta")
    model.eval()
    return model, tokenizer, source


def run_lm_eval(params: dict, run_dir, progress: bool = False) -> dict:
    """Run kind "lm_eval": the model of `params` on lm-eval `tasks`; flat metrics (module docstring)."""
    from deftlab.eval.harness import evaluate, expand_tasks, flat_metrics, require_lm_eval
    from deftlab.surgery.params import count_params

    cfg = LmEvalConfig.from_params(params).resolve()
    require_lm_eval()
    expand_tasks(cfg.tasks)  # unknown names fail before the model loads
    t0 = time.perf_counter()
    model, tok, source = load_source(cfg)
    load_s = time.perf_counter() - t0
    summary = evaluate(model, tok, cfg.tasks, out_dir=Path(run_dir) / "lm_eval", limit=cfg.limit,
                       num_fewshot=cfg.num_fewshot, batch_size=cfg.batch_size, max_new_tokens=cfg.max_new_tokens,
                       data_dir=settings.data_dir(cfg.data_dir), task_options=cfg.task_options, seed=cfg.seed)
    return {**flat_metrics(summary), "lm_eval_tasks": summary["tasks"], **source,
            "params_total": count_params(model)["total"], "load_seconds": load_s}


def resolved_config(params: dict) -> dict:
    """The resolved config of an lm_eval run, as the store records it (with the lm-eval version used)."""
    from deftlab.eval.harness import check_hub, expand_tasks, lm_eval_version, require_lm_eval

    cfg = LmEvalConfig.from_params(params).resolve()
    require_lm_eval()
    local, hub = expand_tasks(cfg.tasks)
    check_hub(hub)  # here, before the run is claimed: an unreachable hub fails at once, leaving no failed run
    return {**to_dict(cfg), "lm_eval_version": lm_eval_version(), "expanded_tasks": local + hub}
