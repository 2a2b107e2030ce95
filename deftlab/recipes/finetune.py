"""The finetune recipe: (decompose →) attach an adapter → fine-tune → merge → evaluate. Run kind "finetune".

`run_finetune(params, run_dir)` is what the experiment runner and `deftlab finetune` call (both through the
results store, which writes the run's record). `build_model(cfg)` rebuilds exactly the model a run trains
(`load_finetuned(run_dir)` uses it before loading the trained tensors, e.g. for OSD update extraction).

Artifacts in a run directory:
    checkpoints/ trainable.safetensors train_stats.json csv/ wandb/   written by `deftlab.train.fit`
    eval/<set>.predictions.jsonl eval/<set>.metrics.json eval/metrics.json
    eval_zero_shot/...          with zero_shot: the same files before training
    allocation.csv              per-matrix ranks (decomposed methods)
    perplexity.json             ppl_<corpus> (with ppl) and ppl_train_heldout[_before], reused on re-runs
    train_peak_memory.json      the training memory peak, kept across resumed attempts

Resuming: the store hands an interrupted run its own directory back, so a re-run continues training from the
last checkpoint (`fit` does that; a finished run is not retrained) and skips every evaluation set and perplexity
corpus whose result file exists.
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

from deftlab import settings
from deftlab.adapters import AdapterConfig, attach, lora_target_names, merge_for_eval
from deftlab.adapters.config import BOTTLENECK_FIELDS, BOTTLENECK_KINDS, LORA_KINDS, AdapterKind, NonLinearity
from deftlab.config import ConfigError, replace, to_dict
from deftlab.data.calibration import calibration_picks
from deftlab.decompose.config import DecompositionConfig, method_config
from deftlab.decompose.targets import target_linears
from deftlab.errors import DeftlabError
from deftlab.eval.generate import evaluate_sets
from deftlab.eval.perplexity import PerplexityConfig, corpus_perplexities, text_perplexities
from deftlab.manifest import write_json_atomic
from deftlab.models import ModelConfig
from deftlab.recipes.compress import allocation_metrics, compress_model, load_quantized
from deftlab.store import read_record
from deftlab.surgery.fold import fold_tails
from deftlab.surgery.params import count_params
from deftlab.surgery.replace import checkpoint_has_safetensors
from deftlab.tasks import get_task
from deftlab.tasks.registry import task_class
from deftlab.tasks.splits import heldout_order, train_subset
from deftlab.train.distributed import is_global_zero
from deftlab.train.memory import RssSampler, peak_memory_bytes, release_free_memory
from deftlab.train.profiles import TrainProfile, load_profile

log = logging.getLogger(__name__)

EVAL_DIR = "eval"
ZERO_SHOT_DIR = "eval_zero_shot"
PEAK_FILE = "train_peak_memory.json"
PPL_FILE = "perplexity.json"

Method = Literal["dense", "deft", "welore", "svdllm", "asvd", "wanda"]
# training-profile fields a run may override
PROFILE_OVERRIDES = ("lr", "lora_r", "lora_alpha", "seed", "eval_limit", "train_limit", "max_steps", "epochs",
                     "max_new_tokens", "batch_size", "micro_batch_size", "cutoff_len", "gradient_checkpointing",
                     "devices", "num_nodes", "strategy")


@dataclass(frozen=True)
class FinetuneConfig:
    """One fine-tuning run; built from flat run params with `from_params` (see deftlab.config).

    method: dense (no decomposition) | deft (whitened SVD + DeFT search, LoRA from the spectrum's tail) | welore
    (plain SVD + WeLore's global threshold; typically with adapter "lrc") | svdllm (whitened SVD, one kept ratio
    per matrix; LoRA from the standard init) | asvd (activation-scaled SVD + ASVD's sensitivity search) | wanda (Wanda pruning to the budget, then the adapter on the masked
    dense weights). A decomposed method's `decomposition`
    (keep / err, calibration, ...) takes the method's allocator/SVD and the task's calibration text where the
    params leave them unset (`DecompositionConfig.method_params`). Training and evaluation hyper-parameters come
    from the training profile configs/profiles/<profile>.yaml; lr, lora_r, lora_alpha, seed, eval_limit,
    train_limit, max_steps, epochs, max_new_tokens, batch_size and micro_batch_size override it (None: the
    profile's). init: LoRA init (None: deft for method deft with a LoRA adapter, else vanilla). eval_sets: None →
    the profile's (arith task only: profiles list arithmetic sets), else the task's own. ppl_stage: perplexity
    "before" training (the decomposed model, DeFT Table 3) or "after" (continual fine-tuning, WeLore Table 1);
    None → "after" for the text task and WeLore, "before" otherwise. zero_shot: also evaluate before training.
    bottleneck_size, adapter_scaling, non_linearity, bottleneck_targets: adapters series/parallel only (None →
    `AdapterConfig`'s defaults).
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    decomposition: DecompositionConfig | None = None
    perplexity: PerplexityConfig = field(default_factory=PerplexityConfig)
    task: str = "arith"
    method: Method = "deft"
    adapter: AdapterKind = "lora"
    profile: str = "cpu-small"
    init: Literal["deft", "vanilla"] | None = None
    lr: float | None = None
    lora_r: int | None = None
    lora_alpha: float | None = None
    seed: int | None = None
    eval_sets: tuple[str, ...] | None = None
    eval_limit: int | None = None
    train_limit: int | None = None
    max_steps: int | None = None
    epochs: int | None = None
    max_new_tokens: int | None = None
    batch_size: int | None = None
    micro_batch_size: int | None = None
    cutoff_len: int | None = None  # tokens per training example (WeLore Table 9: 512)
    gradient_checkpointing: bool | None = None  # None: the profile's
    devices: int | None = None  # data-parallel processes per node (None: the profile's)
    num_nodes: int | None = None
    strategy: Literal["auto", "ddp", "ddp_spawn", "ddp_fork", "fsdp", "deepspeed"] | None = None
    task_options: dict[str, Any] = field(default_factory=dict)
    zero_shot: bool = False
    ppl_stage: Literal["before", "after"] | None = None
    # galore: WeLore Table 4's baseline (full weights, projected); paged_adamw: QLoRA's recipe (bitsandbytes)
    optimizer: Literal["adamw", "galore", "paged_adamw", "adamw_8bit", "paged_adamw_8bit"] = "adamw"
    data_dir: str | None = None
    bottleneck_size: int | None = None
    adapter_scaling: float | None = None
    non_linearity: NonLinearity | None = None
    bottleneck_targets: tuple[str, ...] | None = None
    # LoRA/QLoRA target linears (None: the profile's); OPT names its linears q,k,v,out_proj, fc1, fc2 (DeFT Table 7)
    lora_target_modules: tuple[str, ...] | None = None
    # matched-memory baseline: dense QLoRA at the largest LoRA rank whose planned fine-tuning peak is at most
    # QLoRA + DeFT's at this keep (deftlab.planner.memory.matched_lora_rank); resolve() sets lora_r
    match_memory_keep: float | None = None

    @classmethod
    def from_params(cls, params: dict) -> "FinetuneConfig":
        return method_config(cls, params)

    def validate(self) -> None:
        if self.match_memory_keep is not None and (self.method != "dense" or self.adapter != "qlora"):
            raise ConfigError(f"match_memory_keep with method {self.method} / adapter {self.adapter}",
                              "the matched-memory baseline is method dense with adapter qlora")
        if self.strategy == "fsdp" and self.adapter != "full":
            raise ConfigError(f"strategy fsdp with adapter '{self.adapter}': FSDP here shards full fine-tuning only",
                              "use --adapter full, or strategy ddp for adapters")
        if self.optimizer == "galore" and self.adapter != "full":
            raise ConfigError(f"optimizer 'galore' with adapter '{self.adapter}': GaLore projects the gradients of "
                              "full weight matrices", "use --adapter full with galore, or optimizer adamw")
        d = self.decomposition
        if self.method == "dense" and d is not None and d.decomposes:
            raise ConfigError(f"method 'dense' keeps every parameter (got keep={d.keep}, err={d.err})",
                              "drop --keep/--err and the calibration settings, or use --method deft/welore")
        if self.method != "dense" and (d is None or not d.decomposes):
            raise ConfigError(f"method '{self.method}' needs a budget", "e.g. --keep 0.85 (parameters preserved)")
        if self.adapter == "none" and self.zero_shot:
            raise ConfigError("zero_shot with adapter 'none' evaluates the same model twice",
                              "drop zero_shot (adapter none is already a zero-shot evaluation)")
        if self.adapter == "lrc" and self.method == "dense":
            raise ConfigError("adapter 'lrc' trains low-rank components, and method 'dense' has none",
                              "use --method welore (or deft) with --adapter lrc")
        self._validate_bottleneck()
        for name in ("lora_r", "bottleneck_size"):
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
        if self.lora_target_modules is not None and not self.lora_target_modules:
            raise ConfigError("lora_target_modules is empty", "name the linears (e.g. q_proj, v_proj), or leave it unset")

    # --- resolution ----------------------------------------------------------------------------------------
    def resolve(self) -> "FinetuneConfig":
        """A copy with every None that has a default filled in (what a run records)."""
        profile = self.train_profile()
        changes: dict[str, Any] = {name: getattr(profile, name) for name in PROFILE_OVERRIDES
                                   if getattr(self, name) is None}
        changes["lora_alpha"] = float(profile.lora_alpha) if self.lora_alpha is None else self.lora_alpha
        lora_init = "deft" if self.method == "deft" else "vanilla"
        changes["init"] = self.init or (lora_init if self.adapter in LORA_KINDS else "vanilla")
        changes["eval_sets"] = tuple(self.eval_sets or self._default_eval_sets(profile))
        changes["model"] = self.model.resolve()
        changes["ppl_stage"] = self.ppl_stage or ("after" if self.task == "text" or self.method == "welore"
                                                  else "before")
        if self.match_memory_keep is not None:
            changes["lora_r"] = self._matched_rank(changes.get("lora_r", self.lora_r),
                                                   changes.get("micro_batch_size", self.micro_batch_size),
                                                   changes.get("cutoff_len", self.cutoff_len),
                                                   changes.get("gradient_checkpointing", self.gradient_checkpointing))
        if self.adapter in BOTTLENECK_KINDS:  # record the values used (AdapterConfig's defaults)
            defaults = AdapterConfig(kind=self.adapter)
            changes.update({n: getattr(defaults, n) if getattr(self, n) is None else getattr(self, n)
                            for n in BOTTLENECK_FIELDS})
        return replace(self, **changes)

    def _matched_rank(self, r: int, batch: int, seq: int, ckpt: bool) -> int:
        from deftlab.planner.architecture import load_architecture
        from deftlab.planner.memory import TrainSetup, matched_lora_rank

        targets = self.lora_target_modules or AdapterConfig(kind="qlora").target_modules
        device = "cuda" if self.model.resolve().device.startswith("cuda") else "cpu"
        setup = TrainSetup("qlora", batch, seq, keep_of=self.decomposition_keep_of, lora_r=r,
                           lora_targets=tuple(targets), grad_ckpt=bool(ckpt), device=device,
                           compute="bf16" if device == "cuda" else "fp32", optimizer=self.optimizer)
        return matched_lora_rank(load_architecture(self.model.model), setup, self.match_memory_keep)[0]

    @property
    def decomposition_keep_of(self) -> str:
        return self.decomposition.keep_of if self.decomposition is not None else "model"

    def _default_eval_sets(self, profile) -> list[str]:
        if profile.eval_sets and self.task == "arith":
            return list(profile.eval_sets)
        return list(self.make_task().default_eval_sets)

    def train_profile(self) -> TrainProfile:
        """The training profile with this config's overrides applied."""
        overrides = {n: getattr(self, n) for n in PROFILE_OVERRIDES if getattr(self, n) is not None}
        if self.lora_alpha is not None:  # profiles hold an integer alpha
            if not float(self.lora_alpha).is_integer():
                raise ConfigError(f"lora_alpha={self.lora_alpha} is not a whole number", "use e.g. 16 or 32")
            overrides["lora_alpha"] = int(self.lora_alpha)
        if self.eval_sets is not None:
            overrides["eval_sets"] = list(self.eval_sets)
        if self.lora_target_modules is not None:
            overrides["lora_target_modules"] = list(self.lora_target_modules)
        return load_profile(self.profile, **overrides)

    def make_task(self):
        """The task object, with data_dir / max_new_tokens passed where the task takes them."""
        import inspect

        params = inspect.signature(task_class(self.task).__init__).parameters
        options = dict(self.task_options)
        data_dir = settings.data_dir(self.data_dir)
        if "data_dir" in params and data_dir is not None:
            options.setdefault("data_dir", data_dir)
        if "max_new_tokens" in params and self.max_new_tokens:
            options.setdefault("max_new_tokens", self.max_new_tokens)
        return get_task(self.task, **options)

    def adapter_config(self, profile=None) -> AdapterConfig:
        profile = profile or self.train_profile()
        kw = profile.adapter_kwargs()
        kw["alpha"] = float(kw["alpha"])
        kw.update({n: getattr(self, n) for n in BOTTLENECK_FIELDS if getattr(self, n) is not None})
        if "bottleneck_targets" in kw:
            kw["bottleneck_targets"] = tuple(kw["bottleneck_targets"])
        return AdapterConfig(kind=self.adapter, init=self.init or "vanilla", **kw)


# ----------------------------------------------------------------------------------------------------------------
# building the model


def build_model(cfg: FinetuneConfig, *, loaded=None, cache_root=None):
    """(LoadedModel, model ready for fine-tuning, report) for a config (resolved here if it is not yet).
    cache_root: the decomposition's cache root (`compress_model`).

    Loads the model, decomposes it for methods deft/welore (`compress_model`, LoRA rank = the adapter's r when
    the adapter is LoRA/QLoRA with init "deft"), and attaches the adapter (with the DeFT tails / allocation).
    """
    import dataclasses

    cfg = cfg.resolve()  # idempotent
    acfg = cfg.adapter_config()
    dcfg = cfg.decomposition
    streamed = dcfg is not None and dcfg.decomposes and dcfg.blockwise
    # The dense 16-bit model is never loaded for blockwise DeFT (compress_model builds it from the checkpoint and
    # the cache) nor for dense QLoRA (each linear is quantised as it is read), where the checkpoint is safetensors
    quantized_load = dcfg is None and acfg.kind == "qlora" and loaded is None
    lm = loaded or cfg.model.load(weights=not (streamed or quantized_load))
    if quantized_load and not lm.has_weights and not checkpoint_has_safetensors(lm.checkpoint_dir):
        lm = cfg.model.load()
    params_dense = count_params(lm.model)["total"]
    if not lm.has_weights and not streamed:
        load_quantized(lm)
    report: dict[str, Any] = {"compress": None, "allocation": None, "folded_tails": [],
                              "adapter": to_dict(acfg), "params_dense": params_dense}
    model, tails = lm.model, {}
    if cfg.decomposition is not None:
        deft_lora = acfg.uses_lora and acfg.init == "deft"
        fold = ()
        if streamed and deft_lora:  # built and quantised module by module: tails are folded while building
            fold = set(target_linears(lm.model, dcfg.targets)) - set(lora_target_names(lm.model, acfg.target_modules))
        model, creport = compress_model(dcfg, lm, data_dir=settings.data_dir(cfg.data_dir),
                                        lora_rank=acfg.r if deft_lora else 0, lora_alpha=acfg.alpha,
                                        init="deft" if deft_lora else "vanilla", cache_root=cache_root,
                                        quantize=acfg.kind == "qlora" and streamed, fold=fold)
        tails = dict(creport.get("lora_tails") or {})
        report["folded_tails"] = creport["folded_tails"]
        if tails:
            targets = set(lora_target_names(model, acfg.target_modules))
            report["folded_tails"] += fold_tails(model, {n: t for n, t in tails.items() if n not in targets})
            tails = {n: t for n, t in tails.items() if n in targets}
        report.update(compress=creport, allocation=creport["allocation"])
        if deft_lora and not tails:
            # no LoRA-targeted matrix was reduced (all kept at full rank): DeFT leaves such a matrix dense and its
            # LoRA takes the standard init, which is what init "vanilla" does everywhere here
            acfg = dataclasses.replace(acfg, init="vanilla")
            report["notes"] = ["no LoRA-targeted matrix was reduced; every LoRA starts from the standard init"]
    model = attach(model, acfg, deft_tails=tails or None, allocation=report["allocation"])
    report["params"] = count_params(model)
    return lm, model, report


def load_finetuned(run_dir: str | Path, *, merge: bool = False):
    """(LoadedModel, model) of a recorded finetune run: rebuilt from its record's params with its trained tensors.

    The model is the one fine-tuning saw (PEFT-wrapped for LoRA kinds); merge=True folds the adapter in
    (`merge_for_eval`).
    """
    from safetensors.torch import load_file

    from deftlab.train.trainer import FINAL_WEIGHTS  # Lightning: heavy, loaded only when a run needs it

    run_dir = Path(run_dir)
    record = read_record(run_dir)
    if record.get("kind") != "finetune":
        raise DeftlabError(f"{run_dir} holds a '{record.get('kind')}' run, not a finetune run",
                           "pass the directory (or key) of a finetune run")
    cfg = FinetuneConfig.from_params(record["params"])
    weights = run_dir / FINAL_WEIGHTS
    lm, model, _ = build_model(cfg)
    if cfg.adapter != "none":
        if not weights.is_file():
            raise DeftlabError(f"{run_dir} has no {FINAL_WEIGHTS} (training did not finish)",
                               "re-run the fine-tune to finish it")
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
        model = merge_for_eval(model)
    return lm, model


# ----------------------------------------------------------------------------------------------------------------
# evaluation helpers


def evaluate_profile(model, tokenizer, task, out_dir: Path, *, eval_sets, profile: TrainProfile,
                     progress: bool = True) -> dict[str, dict]:
    """`evaluate_sets` with a training profile's evaluation settings, reusing sets an earlier attempt finished."""
    return evaluate_sets(model, tokenizer, task, out_dir, eval_sets=list(eval_sets), limit=profile.eval_limit,
                         batch_size=profile.eval_batch_size, max_new_tokens=profile.max_new_tokens,
                         cutoff_len=profile.cutoff_len, progress=progress, reuse=True, num_beams=profile.num_beams,
                         answer_nll=profile.answer_nll)


def _finite(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def summarize_eval(results: dict[str, dict], prefix: str = "") -> dict:
    """Flat metrics from per-set results: acc_<set>, acc_<set>_non_overlap, n_<set>, n_overlap_<set>, avg,
    answer_nll_<set>[_non_overlap] (held-out answer loss),
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
                             ("n_overlap", f"n_overlap_{key}"), ("n_non_overlap", f"n_non_overlap_{key}"),
                             ("answer_nll", f"answer_nll_{key}"),
                             ("answer_nll_non_overlap", f"answer_nll_{key}_non_overlap")):
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
    nll = [(m["answer_nll"], m["answer_tokens"]) for m in results.values() if m.get("answer_nll") is not None]
    if nll:  # over all evaluated reference-answer tokens
        out["answer_nll"] = sum(v * t for v, t in nll) / sum(t for _, t in nll)
    return {f"{prefix}{k}": v for k, v in out.items()}


# ----------------------------------------------------------------------------------------------------------------
# the run


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


# chars of held-out text per token of ppl_max_tokens: above the ~4 of these tokenizers, so the capped text is
# long enough, yet a 10k-example training set is not tokenised whole for an 8k-token measurement
_CHARS_PER_TOKEN_CAP = 8


def heldout_train_text(cfg: FinetuneConfig, task, profile: TrainProfile) -> str | None:
    """PPL(Train)'s text: the training distribution's examples the run never trains on (`train_subset`) nor
    calibrates on (when the calibration is the task's own training data), in a seeded order, each as its training
    text (prompt + response), joined with "\n\n"; None when no example is left (the run trains on all)."""
    examples = task.train_examples()
    n = len(examples)
    exclude = set(train_subset(n, profile.train_limit, profile.seed))
    d = cfg.decomposition
    if d is not None and d.decomposes and d.calib == cfg.task and d.calib_n <= n:
        exclude.update(calibration_picks(n, d.calib_n, d.calib_seed))
    cap = cfg.perplexity.ppl_max_tokens
    budget = None if cap is None else cap * _CHARS_PER_TOKEN_CAP
    texts, size = [], 0
    for i in heldout_order(n, exclude, profile.seed):
        if budget is not None and size >= budget:
            break
        texts.append(examples[i].prompt + examples[i].response)
        size += len(texts[-1]) + 2
    return "\n\n".join(texts) if texts else None


def train_heldout_perplexity(model, tok, cfg: FinetuneConfig, task, profile: TrainProfile, run_dir: Path, *,
                             name: str, progress: bool) -> dict:
    """ppl_<name> (+ _tokens, _prefix) on `heldout_train_text`, reusing the run's perplexity.json; {} with no
    held-out example."""
    text = heldout_train_text(cfg, task, profile)
    if text is None:
        return {}
    return text_perplexities(model, tok, cfg.perplexity, {name: lambda: text}, progress=progress,
                             record=run_dir / PPL_FILE)


def run_finetune(params: dict, run_dir: str | Path, *, progress: bool = True, wandb_mode: str | None = None) -> dict:
    """Run kind "finetune": build → [zero-shot eval] → fit → merge → evaluate; returns flat metrics.

    Metrics: acc_<set> (fractions), avg, acc_<set>_non_overlap, n_overlap_<set>, params (the evaluated, merged
    model), params_total / trainable (during training, adapter included), peak_mem_mb, train_tokens_per_s,
    train_loss_first / train_loss_last, wall_time_s, keep_fraction / err (decomposed), ppl_<corpus> (with ppl),
    ppl_train_heldout (after training) and, with ppl before training, ppl_train_heldout_before: PPL(Train) on
    training-distribution examples neither trained nor calibrated on (profile flag ppl_train_heldout).
    Method dense with adapter none evaluates the model as loaded (no training).
    """
    from deftlab.train.trainer import fit  # Lightning: heavy, loaded only when a run needs it

    t_start = time.perf_counter()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = FinetuneConfig.from_params(dict(params)).resolve()
    profile = cfg.train_profile()
    data_dir = settings.data_dir(cfg.data_dir)
    task = cfg.make_task()

    lm, model, report = build_model(cfg, loaded=None)
    tok = lm.tokenizer
    metrics: dict[str, Any] = {"method": cfg.method, "adapter": cfg.adapter, "model": lm.spec.name,
                               "task": cfg.task, "profile": profile.name, "seed": profile.seed,
                               "params_dense": report["params_dense"]}
    lead = is_global_zero()  # torchrun: every rank runs this recipe; rank 0 alone evaluates and records
    alloc = report["allocation"]
    if alloc is not None and lead:
        alloc.to_frame().to_csv(run_dir / "allocation.csv", index=False)
        metrics.update(allocation_metrics(alloc, report["params_dense"]))
    if (report["compress"] or {}).get("params_nonzero") is not None:  # pruning: dense tensors, zeros not counted
        metrics["params_nonzero"] = report["compress"]["params_nonzero"]
    if report["folded_tails"]:
        metrics["tails_folded"] = len(report["folded_tails"])
    if report.get("notes"):
        metrics["notes"] = list(report["notes"])
    counts = report["params"]
    metrics.update(params_total=counts["total"], trainable=counts["trainable"],
                   params_trainable=counts["trainable"])

    def perplexities(m):
        return corpus_perplexities(m, tok, cfg.perplexity, data_dir=data_dir, progress=progress,
                                   record=run_dir / PPL_FILE)

    def heldout(m, name):
        if not profile.ppl_train_heldout:
            return
        got = train_heldout_perplexity(m, tok, cfg, task, profile, run_dir, name=name, progress=progress)
        note = "no PPL(Train) on held-out examples: the run trains on every training example"
        if not got and note not in metrics.get("notes", []):
            metrics.setdefault("notes", []).append(note)
        metrics.update(got)

    if lead and cfg.perplexity.ppl and cfg.ppl_stage == "before":
        metrics.update(perplexities(model))
        heldout(model, "train_heldout_before")
    if lead and cfg.zero_shot:
        zs = evaluate_profile(model, tok, task, run_dir / ZERO_SHOT_DIR, eval_sets=cfg.eval_sets, profile=profile,
                              progress=progress)
        metrics.update(summarize_eval(zs, prefix="zs_"))

    train_stats: dict[str, Any] = {}
    if cfg.adapter != "none":
        on_gpu = cfg.model.device.startswith("cuda")
        # CPU: the process's peak RSS would include the decomposition's transients (dense weights, Grams), so
        # sample the RSS while training instead; CUDA: fit reports max_memory_allocated since training started
        release_free_memory()
        with RssSampler(interval=0.01) as rss:
            train_stats = fit(model, tok, task, profile, run_dir, loggers="auto", wandb_mode=wandb_mode,
                              progress=progress, accelerator="gpu" if on_gpu else "cpu", optimizer=cfg.optimizer)
        model.to(cfg.model.device)  # Lightning hands the model back on the CPU
        if not lead:  # another rank of a torchrun launch: it trained its share; rank 0 evaluates and records
            return {"global_rank": train_stats["global_rank"]}
        # several processes (ddp_spawn): rank 0's own peak came back with its statistics; this process idled
        spawned = train_stats.get("world_size", 1) > 1
        peak, peak_kind = ((train_stats["peak_memory_bytes"], train_stats["peak_memory_kind"]) if on_gpu or spawned
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
        peak, kind = peak_memory_bytes(next(model.parameters()).device)
        metrics.update(peak_mem_mb=peak / 2**20, peak_mem_kind=kind)
    metrics["trained"] = cfg.adapter != "none"
    if not lead:  # adapter none: nothing to train, rank 0 evaluates
        return {}

    model = merge_for_eval(model)
    model.eval()
    metrics["params"] = count_params(model)["total"]  # the model that is evaluated (and would be deployed)
    results = evaluate_profile(model, tok, task, run_dir / EVAL_DIR, eval_sets=cfg.eval_sets, profile=profile,
                               progress=progress)
    metrics.update(summarize_eval(results))
    if cfg.perplexity.ppl and cfg.ppl_stage == "after":
        metrics.update(perplexities(model))
    if cfg.adapter != "none":
        heldout(model, "train_heldout")
    if cfg.perplexity.ppl:
        metrics["ppl_stage"] = cfg.ppl_stage
    metrics["wall_time_s"] = time.perf_counter() - t_start
    metrics = {k: _finite(v) for k, v in metrics.items()}
    return metrics


def resolved_config(params: dict) -> dict:
    """The resolved config of a finetune run (with its training profile), as the store records it."""
    cfg = FinetuneConfig.from_params(dict(params)).resolve()
    return {**to_dict(cfg), "training_profile": to_dict(cfg.train_profile())}
