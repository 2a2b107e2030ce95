"""deftlab finetune: decompose (optional) → fine-tune → evaluate: one run, recorded in the results store.

The run is the one `deftlab run` would make from the same params (same key, same record), so tables that need
it reuse it. Re-running the same command reuses the record; an interrupted run resumes from its last checkpoint.
"""

from __future__ import annotations

from deftlab.commands._args import (
    add_blockwise_flag, add_common_model_args, add_store_args, csv_list, param_flag, params_of, record_run,
)
from deftlab.config import flat_fields
from deftlab.recipes.finetune import FinetuneConfig

FT = FinetuneConfig
PARAMS = tuple(flat_fields(FinetuneConfig))


def add_parser(sub, name):
    p = sub.add_parser(
        name, help="decompose, fine-tune and evaluate (DeFT, WeLore or a dense baseline)",
        description="One run end to end: load the model, decompose it (--method deft|welore, with --keep or "
                    "--err), attach the adapter, fine-tune with a training profile, merge, evaluate on the task's "
                    "test sets, and record it in the results store (`deftlab show KEY` prints the record). "
                    "Re-running the same command reuses the record, or resumes an interrupted run (training "
                    "from the last checkpoint; evaluated sets are not redone). --method dense --adapter none "
                    "evaluates the model as loaded.")
    add_common_model_args(p)
    param_flag(p, FT, "task", help="arith | generated | xsum | math | text")
    param_flag(p, FT, "method", choices=["dense", "deft", "welore", "svdllm", "asvd", "wanda"])
    param_flag(p, FT, "adapter", choices=["none", "lora", "qlora", "loftq", "dora", "full", "lrc", "series",
                                         "parallel"],
               help="series/parallel: LLM-Adapters' bottleneck adapters on each MLP")
    param_flag(p, FT, "init", choices=["deft", "vanilla"], show_default=False,
               help="LoRA init on a decomposed model (default: deft for --method deft, else vanilla)")
    param_flag(p, FT, "profile", help="training profile: smoke | cpu-small | gpu | paper | a YAML path")
    d = p.add_argument_group("decomposition (methods deft and welore; defaults: deftlab.decompose.config)")
    param_flag(d, FT, "keep", type=float, help="fraction of decoder-linear parameters preserved")
    param_flag(d, FT, "keep_of", choices=["linears", "model"],
               help="what --keep is a fraction of: the decoder linears or the whole model (the DeFT paper's)")
    param_flag(d, FT, "err", type=float, help="effective rank reduction (WeLore)")
    param_flag(d, FT, "eta", type=float, help="importance weight η of the DeFT search")
    param_flag(d, FT, "group", type=int, help="rank cut size G of the DeFT search")
    param_flag(d, FT, "allocator", choices=["deft", "welore", "owl", "uniform", "svdllm", "asvd", "wanda"], show_default=False,
               help="rank allocator (default: the method's)")
    param_flag(d, FT, "svd", choices=["whitened", "plain", "asvd"], show_default=False, help="default: the method's")
    param_flag(d, FT, "calib", show_default=False, help="calibration data (default: the task's training text)")
    param_flag(d, FT, "calib_n", type=int, help="calibration examples")
    param_flag(d, FT, "calib_seed", type=int)
    add_blockwise_flag(d)
    d.add_argument("--wanda-owl", dest="wanda_owl", action="store_const", const=True, default=None,
                   help="method wanda: OWL's per-block sparsities instead of one sparsity everywhere")
    param_flag(d, FT, "match_memory_keep", type=float, show_default=False,
               help="matched-memory baseline (method dense, adapter qlora): the largest LoRA rank whose planned "
                    "fine-tuning peak is at most QLoRA + DeFT's at this keep of the model")
    t = p.add_argument_group("training (unset: the profile's value)")
    for name, typ in (("lr", float), ("lora_r", int), ("lora_alpha", float), ("seed", int), ("epochs", int),
                      ("max_steps", int), ("train_limit", int), ("batch_size", int), ("micro_batch_size", int),
                      ("cutoff_len", int), ("devices", int), ("num_nodes", int)):
        param_flag(t, FT, name, type=typ, show_default=False)
    param_flag(t, FT, "strategy", choices=["auto", "ddp", "ddp_spawn", "ddp_fork", "fsdp", "deepspeed"],
               show_default=False, help="multi-process strategy (auto: ddp under torchrun, else ddp_spawn for "
               "--devices > 1; fsdp: full fine-tuning; README 'more than one GPU')")
    t.add_argument("--gradient-checkpointing", dest="gradient_checkpointing", action="store_const", const=True,
                   default=None, help="recompute each layer in backward (less memory; `deftlab plan` shows how much)")
    param_flag(t, FT, "optimizer", choices=["adamw", "galore", "paged_adamw", "adamw_8bit", "paged_adamw_8bit"],
               help="galore: GaLore-projected AdamW for --adapter full (WeLore Table 4); paged_adamw: QLoRA's "
                    "recipe (bitsandbytes; states paged to the CPU under GPU memory pressure)")
    param_flag(t, FT, "bottleneck_size", type=int, show_default=False, help="series/parallel adapter width")
    param_flag(t, FT, "adapter_scaling", type=float, show_default=False, help="series/parallel output scale")
    param_flag(t, FT, "non_linearity", choices=["tanh", "relu", "gelu", "silu"], show_default=False,
               help="series/parallel activation")
    param_flag(t, FT, "bottleneck_targets", type=csv_list, show_default=False,
               help="modules the series/parallel adapters wrap")
    e = p.add_argument_group("evaluation")
    param_flag(e, FT, "eval_sets", type=csv_list, show_default=False,
               help="comma list (default: the profile's / task's)")
    param_flag(e, FT, "eval_limit", type=int, show_default=False, help="first N problems of each test set")
    param_flag(e, FT, "max_new_tokens", type=int, show_default=False)
    e.add_argument("--zero-shot", dest="zero_shot", action="store_const", const=True, default=None,
                   help="also evaluate before training")
    param_flag(e, FT, "ppl", type=csv_list, help="comma list of corpora for perplexity (wikitext2, arith, ...)")
    param_flag(e, FT, "ppl_max_tokens", type=int)
    param_flag(e, FT, "ppl_stage", choices=["before", "after"], show_default=False,
               help="perplexity before or after training (default: after for text/WeLore, else before)")
    add_store_args(p)
    p.add_argument("--wandb", default=None, choices=["offline", "online", "disabled"],
                   help="W&B mode (default: $WANDB_MODE, else offline)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's; 1 is often faster on a busy machine)")
    return p


def params_from_args(args) -> dict:
    """The run params the command line set (unset options left out, so the configs' defaults apply)."""
    return params_of(args, PARAMS)


def format_summary(metrics: dict) -> str:
    """The run's headline numbers as an aligned two-column table."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
        if isinstance(v, int) and not isinstance(v, bool):
            return f"{v:,}"
        return str(v)

    keys = [k for k in metrics if k.startswith("acc_") and not k.endswith("_non_overlap")]
    keys += [k for k in metrics if k.startswith(("acc_",)) and k.endswith("_non_overlap")]
    keys += [k for k in ("avg", "rouge1", "rouge2", "rougeL") if k in metrics]
    keys += [k for k in metrics if k.startswith("ppl_") and not k.endswith(("_tokens", "_prefix"))]
    keys += [k for k in ("zs_avg", "params", "params_total", "trainable", "keep_fraction", "err",
                         "train_tokens_per_s", "train_loss_first", "train_loss_last", "peak_mem_mb",
                         "wall_time_s") if k in metrics]
    seen, rows = set(), []
    for k in keys:
        if k not in seen and metrics.get(k) is not None:
            seen.add(k)
            rows.append((k, fmt(metrics[k])))
    width = max((len(k) for k, _ in rows), default=0)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def run(args) -> int:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    rec = record_run("finetune", params_from_args(args), args,
                     options={"progress": not args.no_progress, "wandb_mode": args.wandb})
    print(format_summary(rec["metrics"]))
    return 0
