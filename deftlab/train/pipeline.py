"""One fine-tuning run end to end: (decompose →) attach an adapter → fine-tune → merge → evaluate → record.

`run_finetune(params, run_dir)` is the experiment-registry run kind "finetune" and the body of `deftlab finetune`.
`build_model(cfg)` rebuilds exactly the model a run trains (other code, e.g. OSD update extraction, uses it through
`load_finetuned(run_dir)` before loading the trained tensors).

Files in a run directory:
    finetune_config.json        the resolved config and training preset (a re-run must match it)
    checkpoints/ trainable.safetensors train_stats.json csv/ wandb/   written by `deftlab.train.fit`
    eval/<set>.predictions.jsonl eval/<set>.metrics.json eval/metrics.json
    eval_zero_shot/...          with zero_shot: the same files before training
    allocation.csv              per-matrix ranks (decomposed methods)
    perplexity.json             ppl_<corpus> (with ppl), reused on re-runs
    train_peak_memory.json      the training memory peak, kept across resumed attempts
    record.json record.csv      manifest + results (`deftlab.train.write_run_record`)
    metrics.json                the flat metrics this function returns

Resuming: re-running with the same run directory continues training from the last checkpoint (`fit` does that;
a finished run is not retrained) and skips every evaluation set whose metrics file exists.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from deftlab.adapters.config import BOTTLENECK_FIELDS, BOTTLENECK_KINDS, LORA_KINDS, AdapterKind, NonLinearity
from deftlab.config import ConfigError, from_dict, to_dict
from deftlab.errors import DeftlabError
from deftlab.manifest import write_json_atomic

log = logging.getLogger(__name__)

CONFIG_FILE = "finetune_config.json"
METRICS_FILE = "metrics.json"
EVAL_DIR = "eval"
ZERO_SHOT_DIR = "eval_zero_shot"
PEAK_FILE = "train_peak_memory.json"
PPL_FILE = "perplexity.json"

Method = Literal["dense", "deft", "welore"]
# method → (allocator, svd, LoRA init) used when the config leaves them unset
METHOD_DEFAULTS: dict[str, tuple[str, str, str]] = {
    "deft": ("deft", "whitened", "deft"),
    "welore": ("welore", "plain", "vanilla"),
    "dense": ("none", "plain", "vanilla"),
}
# task → calibration data when `calib` is unset: the task's own training text (DeFT calibrates on task data)
TASK_CALIB = {"arith": "arith", "generated": "generated", "xsum": "xsum", "math": "math", "text": "c4"}
# preset fields a run may override
PRESET_OVERRIDES = ("lr", "lora_r", "lora_alpha", "seed", "eval_limit", "train_limit", "max_steps", "epochs",
                    "max_new_tokens", "batch_size", "micro_batch_size")


@dataclass
class DecompositionChoice:
    """How a decomposed method builds its model (None: the method's default, filled by `FinetuneConfig.resolve`).

    Shared by `FinetuneConfig` and `EfficiencyConfig`, so both accept the same run params.
    """

    init: Literal["deft", "vanilla"] | None = None
    keep: float | None = None
    err: float | None = None
    eta: float | None = None
    allocator: Literal["deft", "welore", "owl", "uniform"] | None = None
    svd: Literal["whitened", "plain"] | None = None
    group: int | None = None
    calib: str | None = None
    calib_n: int | None = None
    calib_seed: int | None = None
    calib_max_length: int | None = None


@dataclass
class FinetuneConfig(DecompositionChoice):
    """One fine-tuning run. Unset (None) fields take the method's, task's or training preset's value (`resolve`).

    method: dense (no decomposition) | deft (whitened SVD + DeFT search, LoRA from the spectrum's tail) | welore
    (plain SVD + WeLore's global threshold; typically with adapter "lrc"). keep / err: the budget (exactly one for
    decomposed methods). Training and evaluation hyper-parameters come from configs/presets/<preset>.yaml;
    lr, lora_r, lora_alpha, seed, eval_limit, train_limit, max_steps, epochs, max_new_tokens, batch_size and
    micro_batch_size override it. eval_sets: None → the preset's (arith task only: the preset lists arithmetic
    sets), else the task's own sets. ppl: corpora whose perplexity is reported (`ppl_<corpus>`), at ppl_stage
    "before" training (the decomposed model, DeFT Table 3) or "after" (continual fine-tuning, WeLore Table 1);
    None → "after" for the text task and WeLore, "before" otherwise. zero_shot: also evaluate before training.
    bottleneck_size, adapter_scaling, non_linearity, bottleneck_targets: adapters series/parallel only (LLM-Adapters'
    bottleneck adapters; None → `AdapterConfig`'s defaults 256, 1.0, tanh, [mlp]).
    """

    model: str = "smollm2-135m"
    task: str = "arith"
    method: Method = "deft"
    adapter: AdapterKind = "lora"
    preset: str = "cpu-small"
    lr: float | None = None
    lora_r: int | None = None
    lora_alpha: float | None = None
    seed: int | None = None
    eval_sets: list[str] | None = None
    eval_limit: int | None = None
    train_limit: int | None = None
    max_steps: int | None = None
    epochs: int | None = None
    max_new_tokens: int | None = None
    batch_size: int | None = None
    micro_batch_size: int | None = None
    task_options: dict[str, Any] = field(default_factory=dict)
    zero_shot: bool = False
    ppl: list[str] = field(default_factory=list)
    ppl_max_tokens: int | None = 8192
    ppl_seqlen: int = 2048
    ppl_stage: Literal["before", "after"] | None = None
    optimizer: Literal["adamw", "galore"] = "adamw"  # galore: WeLore Table 4's baseline (full weights, projected)
    data_dir: str | None = None
    device: str = "auto"  # auto: cuda when available, else cpu (training and evaluation run there)
    dtype: str | None = None
    bottleneck_size: int | None = None
    adapter_scaling: float | None = None
    non_linearity: NonLinearity | None = None
    bottleneck_targets: list[str] | None = None

    def validate(self) -> None:
        if self.optimizer == "galore" and self.adapter != "full":
            raise ConfigError(f"optimizer 'galore' with adapter '{self.adapter}': GaLore projects the gradients of "
                              "full weight matrices", "use --adapter full with galore, or optimizer adamw")
        if self.method == "dense":
            if self.keep not in (None, 1.0) or self.err not in (None, 0.0):
                raise ConfigError(f"method 'dense' keeps every parameter (got keep={self.keep}, err={self.err})",
                                  "drop --keep/--err, or use --method deft/welore to decompose")
        else:
            if (self.keep is None) == (self.err is None):
                raise ConfigError(f"method '{self.method}' needs exactly one of keep= or err=",
                                  "e.g. --keep 0.85 (parameters preserved) or --err 0.3 (rank reduction)")
            if self.keep is not None and not 0 < self.keep <= 1:
                raise ConfigError(f"keep={self.keep} is not a fraction in (0, 1]", "e.g. --keep 0.85")
            if self.err is not None and not 0 <= self.err < 1:
                raise ConfigError(f"err={self.err} is not a fraction in [0, 1)", "e.g. --err 0.3")
            if (self.allocator or METHOD_DEFAULTS[self.method][0]) == "deft" and self.keep is None:
                raise ConfigError("the DeFT search takes a parameter budget", "pass keep= instead of err=")
        if self.adapter == "none" and self.zero_shot:
            raise ConfigError("zero_shot with adapter 'none' evaluates the same model twice",
                              "drop zero_shot (adapter none is already a zero-shot evaluation)")
        if self.adapter == "lrc" and self.method == "dense":
            raise ConfigError("adapter 'lrc' trains low-rank components, and method 'dense' has none",
                              "use --method welore (or deft) with --adapter lrc")
        self._validate_bottleneck()
        for name in ("calib_n", "group", "lora_r", "ppl_seqlen", "ppl_max_tokens", "calib_max_length",
                     "bottleneck_size"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ConfigError(f"{name} must be positive, got {v}", f"set {name} above 0, or leave it unset")
        if self.lr is not None and self.lr <= 0:
            raise ConfigError(f"lr must be positive, got {self.lr}")
        if self.eval_sets is not None and not self.eval_sets:
            raise ConfigError("eval_sets is empty", "name at least one evaluation set, or leave it unset")

    def _validate_bottleneck(self) -> None:
        given = [n for n in BOTTLENECK_FIELDS if getattr(self, n) is not None]
        if self.adapter not in BOTTLENECK_KINDS:
            if given:
                raise ConfigError(f"{given[0]} only applies to adapters 'series'/'parallel' (adapter is "
                                  f"'{self.adapter}')", f"drop {given[0]}, or use --adapter series/parallel")
            return
        if self.init == "deft":
            # DeFT init hands the spectrum's tail to a LoRA; a bottleneck adapter has none to take it
            raise ConfigError(f"init 'deft' with adapter '{self.adapter}': only LoRA adapters take DeFT's tail",
                              "drop init (a decomposed model then keeps all θ components frozen) or use vanilla")
        s = self.adapter_scaling
        if s is not None and not (math.isfinite(s) and s > 0):
            raise ConfigError(f"adapter_scaling must be a positive number, got {self.adapter_scaling}", "e.g. 1.0")
        if self.bottleneck_targets is not None and not self.bottleneck_targets:
            raise ConfigError("bottleneck_targets is empty", "name at least one module (e.g. mlp), or leave it unset")

    # --- resolution ----------------------------------------------------------------------------------------
    def resolve(self) -> "FinetuneConfig":
        """A copy with every None that has a default filled in (what a run records and compares on resume)."""
        from deftlab.config import replace

        preset = self.train_preset()
        allocator, svd, init = METHOD_DEFAULTS[self.method]
        changes: dict[str, Any] = {name: getattr(preset, name) for name in PRESET_OVERRIDES
                                   if getattr(self, name) is None}
        changes["lora_alpha"] = float(preset.lora_alpha) if self.lora_alpha is None else self.lora_alpha
        changes["init"] = self.init or (init if self.adapter in LORA_KINDS else "vanilla")
        changes["eval_sets"] = list(self.eval_sets or self._default_eval_sets(preset))
        if self.device == "auto":
            changes["device"] = "cuda" if torch.cuda.is_available() else "cpu"
        changes["ppl_stage"] = self.ppl_stage or ("after" if self.task == "text" or self.method == "welore"
                                                  else "before")
        if self.method != "dense":
            changes.update(
                allocator=self.allocator or allocator,
                svd=self.svd or svd,
                eta=1.0 if self.eta is None else self.eta,
                group=self.group or 32,
                calib=self.calib or TASK_CALIB.get(self.task, self.task),
                calib_n=self.calib_n or 256,
                calib_seed=42 if self.calib_seed is None else self.calib_seed,
                calib_max_length=self.calib_max_length or 512,
            )
        if self.adapter in BOTTLENECK_KINDS:  # record the values used (AdapterConfig's defaults)
            from deftlab.adapters import AdapterConfig

            defaults = AdapterConfig(kind=self.adapter)
            changes.update({n: getattr(defaults, n) if getattr(self, n) is None else getattr(self, n)
                            for n in BOTTLENECK_FIELDS})
            changes["bottleneck_targets"] = list(changes["bottleneck_targets"])
        return replace(self, **changes)

    def _default_eval_sets(self, preset) -> list[str]:
        if preset.eval_sets and self.task == "arith":
            return list(preset.eval_sets)
        return list(self.make_task().default_eval_sets)

    def train_preset(self):
        """The training preset with this config's overrides applied."""
        from deftlab.train.presets import load_preset

        overrides = {n: getattr(self, n) for n in PRESET_OVERRIDES if getattr(self, n) is not None}
        if self.lora_alpha is not None:  # presets hold an integer alpha
            if not float(self.lora_alpha).is_integer():
                raise ConfigError(f"lora_alpha={self.lora_alpha} is not a whole number", "use e.g. 16 or 32")
            overrides["lora_alpha"] = int(self.lora_alpha)
        if self.eval_sets is not None:
            overrides["eval_sets"] = list(self.eval_sets)
        return load_preset(self.preset, **overrides)

    def make_task(self):
        """The task object, with data_dir / max_new_tokens passed where the task takes them."""
        import inspect

        from deftlab import settings
        from deftlab.tasks import get_task
        from deftlab.tasks.registry import task_class

        params = inspect.signature(task_class(self.task).__init__).parameters
        options = dict(self.task_options)
        data_dir = settings.data_dir(self.data_dir)
        if "data_dir" in params and data_dir is not None:
            options.setdefault("data_dir", data_dir)
        if "max_new_tokens" in params and self.max_new_tokens:
            options.setdefault("max_new_tokens", self.max_new_tokens)
        return get_task(self.task, **options)

    def compress_config(self):
        """The `CompressConfig` of a decomposed method (call on a resolved config)."""
        from deftlab.decompose.pipeline import CompressConfig

        if self.method == "dense":
            raise DeftlabError("method 'dense' has no decomposition", "use --method deft or welore")
        return CompressConfig(model=self.model, calib=self.calib, calib_n=self.calib_n, calib_seed=self.calib_seed,
                              calib_max_length=self.calib_max_length, svd=self.svd, allocator=self.allocator,
                              keep=self.keep, err=self.err, eta=self.eta, group=self.group, ppl=[],
                              dtype=self.dtype, device=self.device)

    def adapter_config(self, preset=None):
        from deftlab.adapters import AdapterConfig

        preset = preset or self.train_preset()
        kw = preset.adapter_kwargs()
        kw["alpha"] = float(kw["alpha"])
        kw.update({n: getattr(self, n) for n in BOTTLENECK_FIELDS if getattr(self, n) is not None})
        if "bottleneck_targets" in kw:
            kw["bottleneck_targets"] = tuple(kw["bottleneck_targets"])
        return AdapterConfig(kind=self.adapter, init=self.init or "vanilla", **kw)


# ----------------------------------------------------------------------------------------------------------------
# building the model


@torch.no_grad()
def fold_tails(model: torch.nn.Module, tails: dict) -> list[str]:
    """Put DeFT tails back into the frozen weights of modules the LoRA does not target; returns their names.

    The decomposition hands every reduced matrix its r tail components for the LoRA, but the adapter may target
    only some projections (LLM-Adapters: q, k, v, up, down). Without this, the others would lose those
    components; folding keeps every matrix at exactly its allocated rank θ (frozen).
    """
    from deftlab.surgery.lowrank import LowRankLinear
    from deftlab.surgery.replace import get_parent

    folded = []
    for name, tail in tails.items():
        parent, attr = get_parent(model, name)
        module = getattr(parent, attr)
        sB = tail.B * tail.scaling
        if isinstance(module, LowRankLinear):
            W_u = torch.cat([module.u_proj.weight, sB.to(module.u_proj.weight)], dim=1)
            W_v = torch.cat([module.v_proj.weight, tail.A.to(module.v_proj.weight)], dim=0)
            bias = module.u_proj.bias
            new = LowRankLinear.from_factors(W_u, W_v, bias, requires_grad=module.u_proj.weight.requires_grad)
            setattr(parent, attr, new)
        elif isinstance(module, torch.nn.Linear):
            module.weight.add_((sB @ tail.A).to(module.weight))
        else:
            raise DeftlabError(f"cannot fold a DeFT tail into '{name}' ({type(module).__name__})")
        folded.append(name)
    return folded


def build_model(cfg: FinetuneConfig, *, loaded=None):
    """(LoadedModel, model ready for fine-tuning, report) for a config (resolved here if it is not yet).

    Loads the model, decomposes it for methods deft/welore (`compress_model`, LoRA rank = the adapter's r when
    the adapter is LoRA/QLoRA with init "deft"), and attaches the adapter (with the DeFT tails / allocation).
    """
    from deftlab import settings
    from deftlab.adapters import attach, lora_target_names
    from deftlab.models import load_model
    from deftlab.surgery.params import count_params

    cfg = cfg.resolve()  # idempotent
    preset = cfg.train_preset()
    acfg = cfg.adapter_config(preset)
    lm = loaded or load_model(cfg.model, dtype=cfg.dtype, device=cfg.device)
    params_dense = count_params(lm.model)["total"]
    report: dict[str, Any] = {"compress": None, "allocation": None, "folded_tails": [],
                              "adapter": to_dict(acfg), "params_dense": params_dense}
    model, tails = lm.model, {}
    if cfg.method != "dense":
        from deftlab.decompose.pipeline import compress_model

        deft_lora = acfg.uses_lora and acfg.init == "deft"
        model, creport = compress_model(cfg.compress_config(), loaded=lm, data_dir=settings.data_dir(cfg.data_dir),
                                        lora_rank=acfg.r if deft_lora else 0, lora_alpha=acfg.alpha,
                                        init="deft" if deft_lora else "vanilla")
        tails = dict(creport.get("lora_tails") or {})
        if tails:
            targets = set(lora_target_names(model, acfg.target_modules))
            report["folded_tails"] = fold_tails(model, {n: t for n, t in tails.items() if n not in targets})
            tails = {n: t for n, t in tails.items() if n in targets}
        report.update(compress=creport, allocation=creport["allocation"])
        if deft_lora and not tails:
            # no LoRA-targeted matrix was reduced (all kept at full rank): DeFT leaves such a matrix dense and its
            # LoRA takes the standard init, which is what init "vanilla" does everywhere here
            import dataclasses

            acfg = dataclasses.replace(acfg, init="vanilla")
            report["notes"] = ["no LoRA-targeted matrix was reduced; every LoRA starts from the standard init"]
    model = attach(model, acfg, deft_tails=tails or None, allocation=report["allocation"])
    report["params"] = count_params(model)
    return lm, model, report


def load_finetuned(run_dir: str | Path, *, merge: bool = False):
    """(LoadedModel, model) of a finished run: rebuilt from finetune_config.json with its trained tensors.

    The model is the one fine-tuning saw (PEFT-wrapped for LoRA kinds); merge=True folds the adapter in
    (`merge_for_eval`).
    """
    from safetensors.torch import load_file

    from deftlab.train.trainer import FINAL_WEIGHTS

    run_dir = Path(run_dir)
    cfg_path, weights = run_dir / CONFIG_FILE, run_dir / FINAL_WEIGHTS
    if not cfg_path.is_file():
        raise DeftlabError(f"{run_dir} has no {CONFIG_FILE}", "pass the directory of a finetune run")
    cfg = from_dict(FinetuneConfig, json.loads(cfg_path.read_text())["config"])
    lm, model, _ = build_model(cfg)
    if cfg.adapter != "none":
        if not weights.is_file():
            raise DeftlabError(f"{run_dir} has no {FINAL_WEIGHTS} (training did not finish)",
                               f"re-run the fine-tune with --run-dir {run_dir} to finish it")
        state = load_file(str(weights), device=str(next(model.parameters()).device))
        names = {n for n, p in model.named_parameters()}
        unknown = sorted(set(state) - names)
        if unknown:
            raise DeftlabError(f"{FINAL_WEIGHTS} holds tensors the rebuilt model lacks, e.g. {unknown[:3]}",
                               "the code or config changed since the run; re-run it")
        with torch.no_grad():
            params = dict(model.named_parameters())
            for k, v in state.items():
                params[k].copy_(v.to(params[k].dtype))
    model.eval()
    if merge:
        from deftlab.adapters import merge_for_eval

        model = merge_for_eval(model)
    return lm, model


# ----------------------------------------------------------------------------------------------------------------
# evaluation helpers


def evaluate_resumable(model, tokenizer, task, out_dir: Path, *, eval_sets: list[str], preset,
                       progress: bool = True) -> dict[str, dict]:
    """`evaluate_task` per set, reusing <out_dir>/<set>.metrics.json when a previous attempt wrote it."""
    from deftlab.eval.generate import evaluate_task

    out_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in eval_sets:
        path = out_dir / f"{name}.metrics.json"
        if path.is_file():
            try:
                results[name] = json.loads(path.read_text())
                log.info("eval set %s: reusing %s", name, path)
                continue
            except json.JSONDecodeError:
                log.warning("unreadable %s; evaluating again", path)
        results[name] = evaluate_task(model, tokenizer, task, name, limit=preset.eval_limit,
                                      batch_size=preset.eval_batch_size, out_dir=out_dir,
                                      max_new_tokens=preset.max_new_tokens, cutoff_len=preset.cutoff_len,
                                      progress=progress)
    write_json_atomic(out_dir / "metrics.json", results)
    return results


def _finite(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def summarize_eval(results: dict[str, dict], prefix: str = "") -> dict:
    """Flat metrics from per-set results: acc_<set>, acc_<set>_non_overlap, n_<set>, n_overlap_<set>, avg,
    rouge1/2/L (one set) or <set>_rouge*, ppl_<set> (perplexity tasks)."""
    out: dict[str, Any] = {}
    accs = []
    rouge_sets = [s for s, m in results.items() if "rougeL" in m]
    for name, m in results.items():
        key = name.lower()
        if "accuracy" in m:
            out[f"acc_{key}"] = _finite(m["accuracy"])
            accs.append(m["accuracy"])
            for src, dst in (("accuracy_non_overlap", f"acc_{key}_non_overlap"), ("n", f"n_{key}"),
                             ("n_overlap", f"n_overlap_{key}"), ("n_non_overlap", f"n_non_overlap_{key}")):
                if src in m:
                    out[dst] = _finite(m[src])
        if "rougeL" in m:
            for r in ("rouge1", "rouge2", "rougeL"):
                if r in m:
                    out[r if len(rouge_sets) == 1 else f"{key}_{r}"] = m[r]
            out[f"n_{key}"] = m.get("n")
        if "perplexity" in m:
            out[f"ppl_{key}"] = _finite(m["perplexity"])
            out[f"ppl_{key}_tokens"] = m.get("tokens")
        if m.get("new_tokens_per_s"):
            out[f"gen_tokens_per_s_{key}"] = m["new_tokens_per_s"]
    if accs:
        out["avg"] = sum(accs) / len(accs)
    return {f"{prefix}{k}": v for k, v in out.items()}


def corpus_perplexities(model, tokenizer, corpora: list[str], *, data_dir, max_tokens: int | None, seqlen: int,
                        progress: bool = True, record: Path | None = None) -> dict:
    """ppl_<corpus>, ppl_<corpus>_tokens, ppl_<corpus>_prefix; corpora already in `record` (a JSON file) are
    reused, new ones are added to it."""
    from deftlab.eval.corpora import corpus_text
    from deftlab.eval.perplexity import perplexity, tokenize_corpus

    out = {}
    if record is not None and record.is_file():
        try:
            out = json.loads(record.read_text())
        except json.JSONDecodeError:
            out = {}
    for corpus in corpora:
        if f"ppl_{corpus}" in out:
            continue
        ids = tokenize_corpus(tokenizer, corpus_text(corpus, data_dir))
        r = perplexity(model, ids, seqlen=seqlen, max_tokens=max_tokens, progress=progress, desc=f"ppl {corpus}")
        out.update({f"ppl_{corpus}": r.ppl, f"ppl_{corpus}_tokens": r.tokens, f"ppl_{corpus}_prefix": r.prefix})
        if record is not None:
            write_json_atomic(record, out)
    return {k: v for k, v in out.items() if any(k == f"ppl_{c}" or k.startswith(f"ppl_{c}_") for c in corpora)}


# ----------------------------------------------------------------------------------------------------------------
# the run


def _with_new_fields(old: dict, new: dict) -> dict:
    """`old` plus the config fields it predates (absent there, None now), so adding an optional field to
    FinetuneConfig does not make earlier run directories look like different runs."""
    config = dict(old.get("config", {}))
    for k, v in new.get("config", {}).items():
        if k not in config and v is None:
            config[k] = None
    return {**old, "config": config}


def _check_or_write_config(run_dir: Path, saved: dict) -> None:
    path = run_dir / CONFIG_FILE
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError:
            old = None
        plain = json.loads(json.dumps(saved))  # as it reads back from disk (tuples become lists)
        if isinstance(old, dict):
            old = _with_new_fields(old, plain)
        if old is not None and old != plain:
            diff = sorted(k for k in set(old.get("config", {})) | set(saved["config"])
                          if old.get("config", {}).get(k) != saved["config"].get(k))
            what = f"config fields {diff}" if diff else "training preset"
            raise DeftlabError(f"{run_dir} holds a run with a different {what}",
                               "use another --run-dir, or delete that directory to start over")
    write_json_atomic(path, saved)


def _remember_peak(run_dir: Path, peak: int, kind: str) -> int:
    path = run_dir / PEAK_FILE
    try:
        old = json.loads(path.read_text())
        if old.get("kind") == kind:
            peak = max(peak, int(old["peak_bytes"]))
    except (OSError, ValueError, KeyError, TypeError):
        pass
    write_json_atomic(path, {"peak_bytes": peak, "kind": kind})
    return peak


def run_finetune(params: dict, run_dir: str | Path, *, progress: bool = True, wandb_mode: str | None = None) -> dict:
    """Registry run kind "finetune": build → [zero-shot eval] → fit → merge → evaluate → record; flat metrics.

    Metrics: acc_<set> (fractions), avg, acc_<set>_non_overlap, n_overlap_<set>, params (the evaluated, merged
    model), params_total / trainable (during training, adapter included), peak_mem_mb, train_tokens_per_s,
    train_loss_first / train_loss_last, wall_time_s, keep_fraction / err (decomposed), ppl_<corpus> (with ppl).
    Method dense with adapter none evaluates the model as loaded (no training).
    """
    from deftlab import settings
    from deftlab.adapters import merge_for_eval
    from deftlab.surgery.params import count_params
    from deftlab.train.records import write_run_record

    t_start = time.perf_counter()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = from_dict(FinetuneConfig, dict(params)).resolve()
    preset = cfg.train_preset()
    resolved = {"config": to_dict(cfg), "preset": to_dict(preset)}
    _check_or_write_config(run_dir, resolved)
    data_dir = settings.data_dir(cfg.data_dir)
    task = cfg.make_task()

    lm, model, report = build_model(cfg, loaded=None)
    tok = lm.tokenizer
    metrics: dict[str, Any] = {"method": cfg.method, "adapter": cfg.adapter, "model": lm.spec.name,
                               "task": cfg.task, "preset": preset.name, "seed": preset.seed,
                               "params_dense": report["params_dense"]}
    alloc = report["allocation"]
    if alloc is not None:
        alloc.to_frame().to_csv(run_dir / "allocation.csv", index=False)
        metrics.update(keep_fraction=alloc.keep_fraction, err=alloc.err, params_decoder_kept=alloc.params_kept,
                       params_decoder_dense=alloc.params_dense)
    if report["folded_tails"]:
        metrics["tails_folded"] = len(report["folded_tails"])
    if report.get("notes"):
        metrics["notes"] = list(report["notes"])
    counts = report["params"]
    metrics.update(params_total=counts["total"], trainable=counts["trainable"],
                   params_trainable=counts["trainable"])

    if cfg.ppl and cfg.ppl_stage == "before":
        metrics.update(corpus_perplexities(model, tok, cfg.ppl, data_dir=data_dir, max_tokens=cfg.ppl_max_tokens,
                                           seqlen=cfg.ppl_seqlen, progress=progress, record=run_dir / PPL_FILE))
    if cfg.zero_shot:
        zs = evaluate_resumable(model, tok, task, run_dir / ZERO_SHOT_DIR, eval_sets=cfg.eval_sets, preset=preset,
                                progress=progress)
        metrics.update(summarize_eval(zs, prefix="zs_"))

    train_stats: dict[str, Any] = {}
    if cfg.adapter != "none":
        from deftlab.train.trainer import fit

        from deftlab.train.efficiency import RssSampler, release_free_memory

        on_gpu = cfg.device.startswith("cuda")
        # CPU: the process's peak RSS would include the decomposition's transients (dense weights, Grams), so
        # sample the RSS while training instead; CUDA: fit reports max_memory_allocated since training started
        release_free_memory()
        with RssSampler(interval=0.01) as rss:
            train_stats = fit(model, tok, task, preset, run_dir, loggers="auto", wandb_mode=wandb_mode,
                              progress=progress, accelerator="gpu" if on_gpu else "cpu", optimizer=cfg.optimizer)
        model.to(cfg.device)  # Lightning hands the model back on the CPU
        peak, peak_kind = ((train_stats["peak_memory_bytes"], train_stats["peak_memory_kind"]) if on_gpu
                           else (rss.peak, "process_rss_during_training"))
        peak = _remember_peak(run_dir, peak, peak_kind)  # a resumed run keeps the earlier attempts' peak
        metrics.update(
            train_steps=train_stats["global_step"],
            train_tokens=train_stats["train_tokens"],
            train_seconds=train_stats["train_seconds"],
            train_tokens_per_s=train_stats["tokens_per_s"],
            train_loss_first=train_stats["initial_loss"],
            train_loss_last=train_stats["final_loss"],
            peak_mem_mb=peak / 2**20,
            peak_mem_kind=peak_kind,
            resumed_from_step=train_stats.get("resumed_from_step"),
        )
    else:
        from deftlab.train.module import peak_memory_bytes

        peak, kind = peak_memory_bytes(next(model.parameters()).device)
        metrics.update(peak_mem_mb=peak / 2**20, peak_mem_kind=kind)
    metrics["trained"] = cfg.adapter != "none"

    model = merge_for_eval(model)
    model.eval()
    metrics["params"] = count_params(model)["total"]  # the model that is evaluated (and would be deployed)
    results = evaluate_resumable(model, tok, task, run_dir / EVAL_DIR, eval_sets=cfg.eval_sets, preset=preset,
                                 progress=progress)
    metrics.update(summarize_eval(results))
    if cfg.ppl and cfg.ppl_stage == "after":
        metrics.update(corpus_perplexities(model, tok, cfg.ppl, data_dir=data_dir, max_tokens=cfg.ppl_max_tokens,
                                           seqlen=cfg.ppl_seqlen, progress=progress, record=run_dir / PPL_FILE))
    if cfg.ppl:
        metrics["ppl_stage"] = cfg.ppl_stage
    metrics["wall_time_s"] = time.perf_counter() - t_start
    metrics = {k: _finite(v) for k, v in metrics.items()}

    write_run_record(run_dir, config=resolved, seed=preset.seed, params=counts, train=train_stats,
                     metrics=results, wall_time_s=metrics["wall_time_s"],
                     extra={"summary": metrics, "params_evaluated": metrics["params"],
                            "folded_tails": report["folded_tails"]})
    write_json_atomic(run_dir / METRICS_FILE, metrics)
    return metrics
