"""Measured fine-tuning (and inference) memory and throughput: dense vs decomposed, per batch size.

Registry run kind "efficiency" (DeFT Tables 4 and 9, WeLore Table 3). Every number is measured on this machine:

- train mode: the model `build_model` builds for fine-tuning (e.g. QLoRA, or QLoRA on the DeFT-decomposed model)
  takes `warmup_steps` untimed AdamW steps and then `steps` timed ones on random token batches of
  batch_size × seq_len (every token a target). Throughput = timed tokens / timed seconds.
- inference mode: `steps` forward passes (no grad) over batch_size × context_len tokens.
- memory on CUDA: `torch.cuda.max_memory_allocated` after a reset taken once the model is built, so it counts the
  resident model, activations, gradients and optimizer state, and none of the build's transients (e.g. the dense
  weights a decomposition starts from).
- memory on CPU: anonymous resident memory (Linux RssAnon: heap and anonymous mappings; elsewhere the whole RSS)
  sampled every 2 ms during the measured steps, minus the same figure before the model was built (after the
  imports). The weights are first copied out of their memory-mapped checkpoint file, so dense and decomposed
  weights count alike and the page cache of files the build read (the dense checkpoint a decomposition starts
  from stays mapped) does not. Freed build memory is handed back to the OS (glibc malloc_trim), so the build's
  transients do not inflate the figure. Each measurement runs in a fresh subprocess by default (`isolate`), so
  batch sizes do not share allocator state.

QLoRA needs bitsandbytes 4-bit support on the device; where it is missing the run falls back to fp32 LoRA and
says so in `adapter_used` and `notes`. `e2e_hours` (Table 9) is the one extrapolated number, and is labelled so:
the time to process e2e_examples × e2e_epochs sequences of seq_len tokens at the measured throughput.
`e2e_minutes` is DeFT Tables 4/9's Cost: that training time plus the measured decomposition (calibration, SVDs,
rank search and surgery; `decompose_seconds`), timed from an empty cache (`cold_decomposition`, default) in the
first batch size's build.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from deftlab.adapters.config import AdapterKind
from deftlab.config import ConfigError, from_dict, to_dict
from deftlab.decompose.config import DecompositionConfig, method_config
from deftlab.errors import DeftlabError
from deftlab.manifest import write_json_atomic
from deftlab.models import ModelConfig
from deftlab.recipes.finetune import FinetuneConfig, build_model
from deftlab.train.memory import RssSampler, anon_rss, current_rss, materialize_weights, release_free_memory
from deftlab.planner.architecture import load_architecture
from deftlab.train.module import make_optimizer, masked_lm_loss
from deftlab.train.trainer import enable_gradient_checkpointing

log = logging.getLogger(__name__)

MATH10K_EXAMPLES = 9919  # LLM-Adapters math_10k after deduplication (configs/profiles/gpu.yaml)


@dataclass(frozen=True)
class EfficiencyConfig:
    """What to measure. The model is built as `FinetuneConfig` builds it (same params, same defaults: the
    decomposition of a decomposed method is a `DecompositionConfig`); the training profile gives LoRA targets,
    dropout and the optimizer's lr."""

    model: ModelConfig = field(default_factory=ModelConfig)
    decomposition: DecompositionConfig | None = None
    method: Literal["dense", "deft", "welore", "svdllm", "asvd", "wanda"] = "dense"
    adapter: AdapterKind = "qlora"
    init: Literal["deft", "vanilla"] | None = None
    mode: Literal["train", "inference"] = "train"
    batch_size: int | tuple[int, ...] = 1
    seq_len: int = 256
    context_len: int | None = None  # inference: tokens per sequence (default seq_len)
    steps: int = 5
    warmup_steps: int = 1
    task: str = "arith"  # only chooses the default calibration data
    profile: str = "cpu-small"
    lora_r: int | None = None
    lora_alpha: float | None = None
    lr: float | None = None
    seed: int = 42
    data_dir: str | None = None
    isolate: bool = True
    threads: int | None = None  # torch CPU threads in the measuring process (None: torch's default)
    e2e_examples: int = MATH10K_EXAMPLES
    e2e_epochs: int = 3
    gpu_price_per_hour: float | None = None
    cold_decomposition: bool = True  # time the decomposition from an empty cache (the paper's end-to-end Cost)
    # synthetic: random weights at the model config's `arch` shapes, built block by block straight into NF4
    # (deftlab.surgery.synthetic), DeFT at uniform ranks: memory and speed at paper scale with no checkpoint
    weights: Literal["checkpoint", "synthetic"] = "checkpoint"
    # the optimizer of the timed steps (bitsandbytes' paged_adamw is QLoRA's recipe); gradient checkpointing comes
    # from the training profile (the paper profile turns it on)
    optimizer: Literal["adamw", "paged_adamw", "adamw_8bit", "paged_adamw_8bit"] = "adamw"
    notes: tuple[str, ...] = ()

    @classmethod
    def from_params(cls, params: dict) -> "EfficiencyConfig":
        return method_config(cls, params)

    def validate(self) -> None:
        sizes = self.batch_sizes
        if not sizes or any(b < 1 for b in sizes):
            raise ConfigError(f"batch_size must be positive, got {self.batch_size}", "e.g. batch_size: [1, 2, 4]")
        for name in ("seq_len", "steps", "e2e_examples", "e2e_epochs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.context_len is not None and self.context_len < 2:
            raise ConfigError(f"context_len must be >= 2, got {self.context_len}")
        if self.mode == "train" and self.adapter == "none":
            raise ConfigError("train mode with adapter 'none' has nothing to train", "use mode: inference")

    @property
    def batch_sizes(self) -> list[int]:
        return list(self.batch_size) if isinstance(self.batch_size, tuple) else [self.batch_size]

    def finetune_config(self, adapter: str | None = None) -> FinetuneConfig:
        """The `FinetuneConfig` whose `build_model` gives the measured model."""
        return FinetuneConfig(model=self.model, decomposition=self.decomposition, method=self.method,
                              adapter=adapter or (self.adapter if self.mode == "train" else "none"),
                              init=self.init, task=self.task, profile=self.profile, lora_r=self.lora_r,
                              lora_alpha=self.lora_alpha, lr=self.lr, seed=self.seed,
                              data_dir=self.data_dir).resolve()


# ----------------------------------------------------------------------------------------------------------------
# one measurement


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_once(cfg: EfficiencyConfig, batch_size: int, adapter: str, cold: bool = False) -> dict:
    """Build the model and time `cfg.steps` steps at one batch size in this process; memory as described above.
    cold: build the decomposition from an empty cache (a temporary directory), so decompose_seconds is its cost."""
    import contextlib
    import tempfile

    import peft  # noqa: F401  (imported before the baseline, so its import is not counted as model memory)
    import transformers  # noqa: F401

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    fcfg = cfg.finetune_config(adapter)
    release_free_memory()
    rss_base = anon_rss()
    kept = _kept_fraction(cfg)
    if cfg.weights == "synthetic":
        model, counts = _synthetic(cfg, fcfg, kept)
        decomposed, decompose_s = False, 0.0
    else:
        with tempfile.TemporaryDirectory(prefix="deftlab-cold-") if cold else contextlib.nullcontext() as empty:
            lm, model, report = build_model(fcfg, cache_root=empty)
        counts = report["params"]
        decomposed = report.get("compress") is not None
        decompose_s = report["compress"]["seconds"] if decomposed else 0.0
        del report, lm  # the decomposition report holds the DeFT tails (copied into the LoRA by now)
    device = next(model.parameters()).device
    materialize_weights(model)
    release_free_memory()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        cuda_model = torch.cuda.memory_allocated(device)
    rss_model = anon_rss()
    seq = (cfg.context_len or cfg.seq_len) if cfg.mode == "inference" else cfg.seq_len
    vocab = model.get_input_embeddings().num_embeddings if hasattr(model, "get_input_embeddings") else 32000
    gen = torch.Generator().manual_seed(cfg.seed)
    ids = torch.randint(3, vocab, (batch_size, seq), generator=gen).to(device)
    mask = torch.ones_like(ids)
    out: dict[str, Any] = {"batch_size": batch_size, "seq_len": seq, "device": str(device), "weights": cfg.weights,
                           "torch_threads": torch.get_num_threads(),
                           "adapter_used": fcfg.adapter, "params_total": counts["total"],
                           "trainable": counts["trainable"], "oom": False, "decompose_seconds": decompose_s,
                           "decompose_cold": cold and decomposed}
    timed, seconds = 0, 0.0
    try:
        with RssSampler(probe=anon_rss) as sampler:
            if cfg.mode == "train":
                profile = fcfg.train_profile()
                if profile.gradient_checkpointing:
                    enable_gradient_checkpointing(model)
                model.train()
                params = [p for p in model.parameters() if p.requires_grad]
                opt = make_optimizer(cfg.optimizer, params, lr=profile.lr)
                for step in range(cfg.warmup_steps + cfg.steps):
                    _sync(device)
                    t0 = time.perf_counter()
                    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
                    loss, _ = masked_lm_loss(logits, ids)
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    del logits, loss
                    _sync(device)
                    if step >= cfg.warmup_steps:
                        seconds += time.perf_counter() - t0
                        timed += 1
            else:
                model.eval()
                with torch.inference_mode():
                    for step in range(cfg.warmup_steps + cfg.steps):
                        _sync(device)
                        t0 = time.perf_counter()
                        model(input_ids=ids, attention_mask=mask, use_cache=False)
                        _sync(device)
                        if step >= cfg.warmup_steps:
                            seconds += time.perf_counter() - t0
                            timed += 1
    except torch.cuda.OutOfMemoryError:
        out["oom"] = True
    tokens = batch_size * seq * timed
    if device.type == "cuda":
        out.update(peak_mem_mb=torch.cuda.max_memory_allocated(device) / 2**20,
                   reserved_mem_mb=torch.cuda.max_memory_reserved(device) / 2**20,
                   model_mem_mb=cuda_model / 2**20,
                   memory_kind="cuda_max_memory_allocated")
    else:
        out.update(peak_mem_mb=(sampler.peak - rss_base) / 2**20, rss_end_mb=current_rss() / 2**20,
                   model_mem_mb=(rss_model - rss_base) / 2**20, memory_kind="anon_rss_above_baseline")
    if out["oom"]:
        out.update(peak_mem_mb=None, tokens_per_s=None)
        return out
    rate = tokens / seconds if seconds > 0 else None
    out.update(steps_timed=timed, step_seconds=seconds / timed if timed else None, tokens_per_s=rate)
    if cfg.mode == "train":
        out["train_tokens_per_s"] = rate
        predicted = _planned_peak(cfg, fcfg, kept, model, batch_size, seq)
        if predicted is not None:
            out.update(predicted_mem_mb=predicted / 2**20, mem_ratio=out["peak_mem_mb"] * 2**20 / predicted)
    return out


def _architecture(cfg: EfficiencyConfig):
    """The planner's shapes of the measured model; None where none are known (a hub id without a config)."""
    try:
        return load_architecture(cfg.model.model)
    except DeftlabError:
        return None


def _kept_fraction(cfg: EfficiencyConfig) -> float | None:
    """The decoder linears' kept fraction of a DeFT-style budget (None: dense, an ERR budget, unknown shapes)."""
    from deftlab.planner.memory import kept_linear_fraction

    d, arch = cfg.decomposition, _architecture(cfg)
    if cfg.method == "dense" or d is None or d.keep is None or arch is None:
        return None
    return kept_linear_fraction(arch, d.keep, d.keep_of)


def _synthetic(cfg: EfficiencyConfig, fcfg: FinetuneConfig, kept: float | None):
    """The synthetic model of `cfg` with its adapter attached (init vanilla: there is no spectrum)."""
    import dataclasses

    from deftlab.adapters.attach import attach
    from deftlab.planner.architecture import arch_fields
    from deftlab.surgery.params import count_params
    from deftlab.surgery.synthetic import synthetic_model

    if cfg.method != "dense" and kept is None:
        raise ConfigError("weights: synthetic builds DeFT-style budgets (keep), not ERR", "give keep")
    device = torch.device(cfg.model.resolve().device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = synthetic_model(arch_fields(cfg.model.model)[0], keep_linears=kept, device=device, dtype=dtype,
                            quantize=fcfg.adapter == "qlora", seed=cfg.seed)
    acfg = fcfg.adapter_config()
    model = attach(model, dataclasses.replace(acfg, init="vanilla") if acfg.uses_lora else acfg)
    return model, count_params(model)


def _planned_peak(cfg: EfficiencyConfig, fcfg: FinetuneConfig, kept: float | None, model, batch_size: int,
                  seq: int) -> float | None:
    """`deftlab plan`'s fine-tuning peak for this measurement's setup (None where the planner has no model of
    it: other adapters, ERR budgets, unknown shapes)."""
    from deftlab.planner.memory import TrainSetup, finetune_phase

    arch = _architecture(cfg)
    if arch is None or fcfg.adapter not in ("qlora", "lora", "full") or (cfg.method != "dense" and kept is None):
        return None
    acfg = fcfg.adapter_config()
    device = next(model.parameters()).device
    dtype = model.get_input_embeddings().weight.dtype
    setup = TrainSetup(fcfg.adapter, batch_size, seq, keep=kept, keep_of="linears",
                       lora_r=acfg.r, lora_targets=tuple(acfg.target_modules), lora_dropout=acfg.dropout,
                       compute="bf16" if dtype == torch.bfloat16 else "fp32",
                       device="cuda" if device.type == "cuda" else "cpu", optimizer=cfg.optimizer,
                       grad_ckpt=fcfg.train_profile().gradient_checkpointing)
    return finetune_phase(arch, setup).total


def _child_main() -> None:
    """Entry point of the measuring subprocess: argv = [spec.json, result.json]."""
    import json
    import sys

    spec = json.loads(Path(sys.argv[1]).read_text())
    cfg = from_dict(EfficiencyConfig, spec["config"])
    result = measure_once(cfg, spec["batch_size"], spec["adapter"], spec.get("cold", False))
    write_json_atomic(Path(sys.argv[2]), result)


def measure_isolated(cfg: EfficiencyConfig, batch_size: int, adapter: str, timeout: float | None = None,
                     cold: bool = False) -> dict:
    """`measure_once` in a fresh Python process (a plain subprocess: no multiprocessing main-module rules)."""
    import json
    import subprocess
    import sys
    import tempfile

    import deftlab

    root = str(Path(deftlab.__file__).resolve().parent.parent)  # importable even when not pip-installed
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    with tempfile.TemporaryDirectory(prefix="deftlab-eff-") as tmp:
        spec, result = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec.write_text(json.dumps({"config": to_dict(cfg), "batch_size": batch_size, "adapter": adapter,
                                    "cold": cold}))
        code = "from deftlab.recipes.efficiency import _child_main; _child_main()"
        try:
            proc = subprocess.run([sys.executable, "-c", code, str(spec), str(result)], env=env, timeout=timeout,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        except subprocess.TimeoutExpired:
            raise DeftlabError(f"efficiency measurement at batch size {batch_size} timed out after {timeout} s",
                               "lower steps / seq_len or raise the timeout") from None
        if proc.returncode != 0 or not result.is_file():
            tail = (proc.stderr or "").strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
            killed = " (killed: out of memory?)" if proc.returncode < 0 else ""
            raise DeftlabError(f"efficiency measurement at batch size {batch_size} failed{killed}: {tail[0]}",
                               "lower the batch size or seq_len, or run with isolate: false to debug")
        return json.loads(result.read_text())


# ----------------------------------------------------------------------------------------------------------------
# the run kind


def _adapter_to_use(cfg: EfficiencyConfig, notes: list[str]) -> str:
    if cfg.mode != "train":
        return "none"
    if cfg.adapter != "qlora":
        return cfg.adapter
    from deftlab.surgery.quantize import check_4bit_support

    device = cfg.model.resolve().device
    try:
        check_4bit_support(device)
        return "qlora"
    except DeftlabError as e:
        notes.append(f"QLoRA unavailable on {device} ({e.problem}); measured fp32 LoRA instead")
        return "lora"


def run_efficiency(params: dict, run_dir: str | Path) -> dict:
    """Registry run kind "efficiency": peak memory and throughput per batch size; see the module docstring.

    One batch size: flat metrics peak_mem_mb, train_tokens_per_s (train mode), tokens_per_s, e2e_hours,
    e2e_cost_usd (with gpu_price_per_hour), device, adapter_used, memory_kind, steps_timed. Several: the same
    keys suffixed _bs<k>. Writes efficiency.csv (one row per batch size) into run_dir.
    """
    import pandas as pd

    t0 = time.perf_counter()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = EfficiencyConfig.from_params(dict(params))
    notes = list(cfg.notes)
    adapter = _adapter_to_use(cfg, notes)
    rows = []
    decompose_s = None  # the first (cold) build's; every batch size builds the same decomposition
    for i, bs in enumerate(cfg.batch_sizes):
        cold = cfg.cold_decomposition and i == 0
        row = (measure_isolated(cfg, bs, adapter, cold=cold) if cfg.isolate
               else measure_once(cfg, bs, adapter, cold=cold))
        if i == 0:
            decompose_s = row["decompose_seconds"]
        rate = row.get("tokens_per_s")
        if cfg.mode == "train" and rate:
            row["e2e_hours"] = cfg.e2e_examples * cfg.e2e_epochs * cfg.seq_len / rate / 3600
            row["e2e_minutes"] = decompose_s / 60 + row["e2e_hours"] * 60
            if cfg.gpu_price_per_hour is not None:
                row["e2e_cost_usd"] = row["e2e_hours"] * cfg.gpu_price_per_hour
        rows.append(row)
        log.info("batch %d: %s", bs, row)
    pd.DataFrame(rows).to_csv(run_dir / "efficiency.csv", index=False)
    common = {"mode": cfg.mode, "method": cfg.method, "adapter": cfg.adapter, "adapter_used": adapter,
              "device": rows[0]["device"], "memory_kind": rows[0].get("memory_kind"),
              "params_total": rows[0]["params_total"], "trainable": rows[0]["trainable"],
              "seq_len": rows[0]["seq_len"], "gpu_price_per_hour": cfg.gpu_price_per_hour,
              "torch_threads": rows[0].get("torch_threads"), "decompose_seconds": decompose_s,
              "decompose_cold": rows[0]["decompose_cold"],
              "isolated": cfg.isolate, "weights": cfg.weights, "qlora_fallback": cfg.mode == "train" and adapter != cfg.adapter}
    per = ("peak_mem_mb", "train_tokens_per_s", "tokens_per_s", "model_mem_mb", "rss_end_mb", "reserved_mem_mb",
           "step_seconds", "steps_timed", "e2e_hours", "e2e_minutes", "e2e_cost_usd", "oom", "predicted_mem_mb",
           "mem_ratio")
    metrics: dict[str, Any] = dict(common)
    if len(rows) == 1:
        metrics.update({k: rows[0][k] for k in per if k in rows[0]})
        metrics["batch_size"] = rows[0]["batch_size"]
    else:
        for row in rows:
            metrics.update({f"{k}_bs{row['batch_size']}": row[k] for k in per if k in row})
    if cfg.mode == "train":
        notes.append("e2e_hours: extrapolated from the measured tokens/s to e2e_examples x e2e_epochs sequences "
                     f"of {cfg.seq_len} tokens ({cfg.e2e_examples} x {cfg.e2e_epochs}); e2e_minutes (Cost): that "
                     "plus the decomposition (calibration, SVDs, search, surgery) timed "
                     + ("from an empty cache" if metrics["decompose_cold"] else
                        "as built (cached parts reused)" if cfg.decomposition else "(none: a dense model)"))
    if notes:
        metrics["notes"] = notes
    metrics["wall_time_s"] = time.perf_counter() - t0
    return metrics


def resolved_config(params: dict) -> dict:
    """The resolved config of an efficiency run (and of the model it builds), as the store records it."""
    cfg = EfficiencyConfig.from_params(dict(params))
    return {**to_dict(cfg), "finetune": to_dict(cfg.finetune_config())}
