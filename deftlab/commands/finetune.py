"""deftlab finetune: decompose (optional) → fine-tune → evaluate in one recorded, resumable command."""

from __future__ import annotations

import json
from pathlib import Path

from deftlab.cli import add_common_model_args


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def add_parser(sub, name):
    p = sub.add_parser(
        name, help="decompose, fine-tune and evaluate (DeFT, WeLore or a dense baseline)",
        description="One run end to end: load the model, decompose it (--method deft|welore, with --keep or "
                    "--err), attach the adapter, fine-tune with a training preset, merge, evaluate on the task's "
                    "test sets and record everything under the run directory. Re-running the same command "
                    "resumes it (training from the last checkpoint; evaluated sets are not redone). "
                    "--method dense --adapter none evaluates the model as loaded.")
    add_common_model_args(p)
    p.set_defaults(device="auto")
    p.add_argument("--task", default="arith", help="arith | generated | xsum | math | text (default arith)")
    p.add_argument("--method", default="deft", choices=["dense", "deft", "welore"])
    p.add_argument("--adapter", default="lora",
                   choices=["none", "lora", "qlora", "loftq", "full", "lrc", "series", "parallel"],
                   help="series/parallel: LLM-Adapters' bottleneck adapters on each MLP (default lora)")
    p.add_argument("--init", default=None, choices=["deft", "vanilla"],
                   help="LoRA init on a decomposed model (default: deft for --method deft, else vanilla)")
    p.add_argument("--keep", type=float, default=None, help="fraction of decoder-linear parameters preserved")
    p.add_argument("--err", type=float, default=None, help="effective rank reduction (WeLore)")
    p.add_argument("--eta", type=float, default=None, help="importance weight η of the DeFT search (default 1)")
    p.add_argument("--allocator", default=None, choices=["deft", "welore", "owl", "uniform"],
                   help="rank allocator (default: the method's)")
    p.add_argument("--svd", default=None, choices=["whitened", "plain"], help="default: the method's")
    p.add_argument("--calib", default=None, help="calibration data (default: the task's training text)")
    p.add_argument("--calib-n", type=int, default=None, help="calibration examples (default 256)")
    p.add_argument("--calib-seed", type=int, default=None)
    p.add_argument("--preset", default="cpu-small", help="training preset: smoke | cpu-small | gpu | paper | path")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--lora-r", type=int, default=None)
    p.add_argument("--lora-alpha", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--optimizer", default=None, choices=["adamw", "galore"],
                   help="galore: GaLore-projected AdamW for --adapter full (WeLore Table 4; default adamw)")
    p.add_argument("--bottleneck-size", type=int, default=None, help="series/parallel adapter width (default 256)")
    p.add_argument("--adapter-scaling", type=float, default=None, help="series/parallel output scale (default 1)")
    p.add_argument("--non-linearity", default=None, choices=["tanh", "relu", "gelu", "silu"],
                   help="series/parallel activation (default tanh, as LLM-Adapters)")
    p.add_argument("--bottleneck-targets", type=_csv, default=None,
                   help="modules the series/parallel adapters wrap (default mlp)")
    p.add_argument("--eval-sets", type=_csv, default=None, help="comma list (default: the preset's / task's)")
    p.add_argument("--eval-limit", type=int, default=None, help="first N problems of each test set")
    p.add_argument("--train-limit", type=int, default=None, help="training examples used")
    p.add_argument("--max-steps", type=int, default=None, help="stop after N optimizer steps")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--zero-shot", action="store_true", help="also evaluate before training")
    p.add_argument("--ppl", type=_csv, default=[], help="comma list of corpora for perplexity (wikitext2, arith, ...)")
    p.add_argument("--ppl-max-tokens", type=int, default=8192)
    p.add_argument("--wandb", default=None, choices=["offline", "online", "disabled"],
                   help="W&B mode (default: $WANDB_MODE, else offline)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's; 1 is often faster on a busy machine)")
    p.add_argument("--run-dir", default=None, help="default results/finetune/<model>-<task>-<method>-...")
    return p


def params_from_args(args) -> dict:
    """FinetuneConfig fields from the parsed arguments (unset options left out, so defaults apply)."""
    fields = {
        "model": args.model, "task": args.task, "method": args.method, "adapter": args.adapter, "init": args.init,
        "keep": args.keep, "err": args.err, "eta": args.eta, "allocator": args.allocator, "svd": args.svd,
        "calib": args.calib, "calib_n": args.calib_n, "calib_seed": args.calib_seed, "preset": args.preset,
        "lr": args.lr, "lora_r": args.lora_r, "lora_alpha": args.lora_alpha, "seed": args.seed,
        "eval_sets": args.eval_sets, "eval_limit": args.eval_limit, "train_limit": args.train_limit,
        "max_steps": args.max_steps, "epochs": args.epochs, "max_new_tokens": args.max_new_tokens,
        "zero_shot": args.zero_shot or None, "ppl": args.ppl or None, "ppl_max_tokens": args.ppl_max_tokens,
        "data_dir": args.data_dir, "device": args.device, "dtype": args.dtype,
        "optimizer": args.optimizer, "bottleneck_size": args.bottleneck_size, "adapter_scaling": args.adapter_scaling,
        "non_linearity": args.non_linearity, "bottleneck_targets": args.bottleneck_targets,
    }
    return {k: v for k, v in fields.items() if v is not None}


def default_run_name(cfg) -> str:
    """A readable, deterministic name for a resolved FinetuneConfig (same command → same directory)."""
    parts = [Path(cfg.model).name, cfg.task, cfg.method]
    if cfg.method != "dense":
        budget = f"keep{cfg.keep:g}" if cfg.keep is not None else f"err{cfg.err:g}"
        parts += [cfg.allocator, cfg.svd, budget, f"eta{cfg.eta:g}", f"{cfg.calib}{cfg.calib_n}s{cfg.calib_seed}"]
    parts.append(cfg.adapter)
    if cfg.adapter in ("lora", "qlora", "loftq"):
        parts += [f"r{cfg.lora_r}", cfg.init] if cfg.method != "dense" else [f"r{cfg.lora_r}"]
    elif cfg.adapter in ("series", "parallel"):
        parts += [f"bn{cfg.bottleneck_size}", f"s{cfg.adapter_scaling:g}", cfg.non_linearity,
                  "+".join(cfg.bottleneck_targets)]
    if cfg.optimizer != "adamw":
        parts.append(cfg.optimizer)
    parts += [cfg.preset if "/" not in cfg.preset else Path(cfg.preset).stem, f"lr{cfg.lr:g}", f"seed{cfg.seed}"]
    for flag in ("train_limit", "eval_limit", "max_steps"):
        v = getattr(cfg, flag)
        if v is not None and v > 0:
            parts.append(f"{flag.replace('_', '')}{v}")
    return "-".join(str(p) for p in parts)


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
    from deftlab.config import from_dict
    from deftlab.settings import results_dir
    from deftlab.train.pipeline import FinetuneConfig, run_finetune

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    params = params_from_args(args)
    cfg = from_dict(FinetuneConfig, dict(params)).resolve()
    run_dir = Path(args.run_dir) if args.run_dir else results_dir() / "finetune" / default_run_name(cfg)
    print(f"run dir {run_dir}")
    metrics = run_finetune(params, run_dir, progress=not args.no_progress, wandb_mode=args.wandb)
    print(format_summary(metrics))
    print(f"recorded {run_dir / 'record.json'} (per-item predictions under {run_dir / 'eval'})")
    (run_dir / "command.json").write_text(json.dumps({"params": params}, indent=2))
    return 0
