"""deftlab delta: store a fine-tuned run's weight updates compactly (OSD and baselines), and apply them back.

    deftlab delta export RUN --codec osd --budget 2% [--out F]      (RUN: a finetune run's key or directory)
    deftlab delta apply DELTA_FILE [--model M] [--eval arith --limit 20]
"""

from __future__ import annotations

import json
from pathlib import Path

from deftlab.errors import DeftlabError


def add_parser(sub, name):
    p = sub.add_parser(name, help="export a fine-tuned run's updates ΔW under a byte budget, or apply them",
                       description="Compact storage of fine-tuned updates ΔW (OSD: sparsified low-rank factors, "
                                   "and the lowrank / sparse / truncsvd / magtruncsvd baselines).")
    actions = p.add_subparsers(dest="delta_action", metavar="ACTION")

    e = actions.add_parser("export", help="extract ΔW of a fine-tuning run, encode it, write one safetensors file")
    e.add_argument("run_dir", metavar="RUN", help="a recorded fine-tuning run: its key (or a prefix) or directory")
    e.add_argument("--results", default=None, help="results store for a key (default: $DEFTLAB_RESULTS, ./results)")
    e.add_argument("--codec", default="osd", help="osd | magtruncsvd | truncsvd | lowrank | sparse")
    e.add_argument("--budget", default="2%", help="per matrix: a fraction of the dense fp32 ΔW ('2%%', 0.02); "
                                                  "or a total byte count split in proportion to matrix sizes")
    e.add_argument("--out", default=None, help="output file (default <run_dir>/delta-<codec>-<budget>.safetensors)")
    e.add_argument("--value-dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    e.add_argument("--grad-at", default="base", choices=["base", "truncated", "finetuned", "none"],
                   help="where the osd codec's task gradient G is taken (default: the base model)")
    e.add_argument("--grad-batches", type=int, default=4, help="training batches for the gradient (osd)")
    e.add_argument("--grad-batch-size", type=int, default=4)
    e.add_argument("--cutoff-len", type=int, default=256)
    e.add_argument("--task", default=None, help="task for the gradient (default: the run's)")
    e.add_argument("--rank", type=int, default=None, help="codec option: base rank r (truncsvd/magtruncsvd/osd)")
    e.add_argument("--index", default=None, choices=["bitpacked", "int"], help="codec option: index encoding")
    e.add_argument("--device", default=None, help="device of the base model (default: the run's model's)")
    e.add_argument("--per-matrix", action="store_true", help="print every matrix's bytes and error")

    a = actions.add_parser("apply", help="add a stored ΔW file to its base model; optionally evaluate")
    a.add_argument("delta_file")
    a.add_argument("--model", default=None, help="base model (default: the one recorded in the file)")
    a.add_argument("--dtype", default=None)
    a.add_argument("--device", default="cpu")
    a.add_argument("--eval", default=None, metavar="TASK", help="evaluate the rebuilt model on TASK (e.g. arith)")
    a.add_argument("--eval-sets", default=None, help="comma list of eval sets (default: the task's)")
    a.add_argument("--limit", type=int, default=None, help="first N problems per eval set")
    a.add_argument("--batch-size", type=int, default=8)
    a.add_argument("--max-new-tokens", type=int, default=None)
    a.add_argument("--out", default=None, help="directory for predictions (default <delta file>.eval/)")
    a.add_argument("--per-matrix", action="store_true", help="print every matrix's bytes and error")
    a.add_argument("--no-check", action="store_true", help="skip the base-weights fingerprint check")
    return p


def _print_rows(rows: list[dict], limit: int | None = 12) -> None:
    shown = rows if limit is None else rows[:limit]
    print(f"{'module':52s} {'kind':13s} {'shape':>11s} {'bytes':>10s} {'budget':>10s} {'rel.err':>8s}")
    for r in shown:
        shape = "×".join(str(x) for x in r["shape"])
        budget = "-" if r.get("budget_bytes") is None else str(r["budget_bytes"])
        print(f"{r['name'][-52:]:52s} {r.get('kind', ''):13s} {shape:>11s} {r['nbytes']:>10d} {budget:>10s} "
              f"{r['rel_error']:8.4f}")
    if len(rows) > len(shown):
        print(f"... {len(rows) - len(shown)} more (--per-matrix shows all)")


def _print_summary(s: dict) -> None:
    budget = s.get("budget_bytes")
    frac = s.get("bytes_fraction")
    print(f"codec {s['codec']} at budget {s['budget']}: {s['n_matrices']} matrices, {s['nbytes']:,} bytes stored"
          + (f" of a {budget:,}-byte budget" if budget is not None else "")
          + (f" ({100 * frac:.3g}% of the dense fp32 updates, {s['dense_nbytes']:,} bytes)" if frac else ""))
    print(f"relative error ‖ΔW − ΔŴ‖/‖ΔW‖: global {s['rel_error']:.4f}, per-matrix mean {s['rel_error_mean']:.4f}, "
          f"max {s['rel_error_max']:.4f}")


def _export(args) -> int:
    from deftlab.recipes.osd import export_run
    from deftlab.store import ResultsStore

    run_dir = ResultsStore(args.results).locate(args.run_dir)
    opts = {k: v for k, v in (("rank", args.rank), ("index", args.index)) if v is not None}
    report = export_run(run_dir, args.codec, args.budget, args.out, grad_at=args.grad_at,
                        grad_batches=args.grad_batches, grad_batch_size=args.grad_batch_size,
                        cutoff_len=args.cutoff_len, task=args.task, value_dtype=args.value_dtype,
                        device=args.device, codec_options=opts)
    _print_rows(report.stats.rows, None if args.per_matrix else 12)
    _print_summary(report.stats.summary())
    if report.extras:
        print(f"also stored uncompressed: {len(report.extras)} non-matrix parameters ({report.extra_nbytes:,} "
              f"bytes, outside the budget) in {report.path.name.removesuffix('.safetensors')}.extras.safetensors")
    print(f"saved {report.path}")
    return 0


def _apply(args) -> int:
    from deftlab.delta.extract import apply_stored
    from deftlab.delta.storage import load_delta
    from deftlab.models import load_model

    encoded, meta = load_delta(args.delta_file)
    model_name = args.model or meta.get("base_model")
    if not model_name:
        raise DeftlabError(f"{args.delta_file} records no base model", "pass --model")
    summary = meta.get("summary") or {}
    errs = meta.get("rel_error") or {}
    kinds = meta.get("kinds") or {}
    rows = [{"name": n, "kind": kinds.get(n, ""), "shape": list(e.shape), "nbytes": e.nbytes,
             "budget_bytes": e.meta.get("budget_bytes"), "rel_error": float(errs.get(n, float("nan")))}
            for n, e in encoded.items()]
    print(f"{args.delta_file}: run {meta.get('run_id', '?')}, base {meta.get('base_model', '?')}")
    _print_rows(rows, None if args.per_matrix else 12)
    if summary:
        _print_summary(summary)
    lm = load_model(model_name, dtype=args.dtype, device=args.device)
    model, _ = apply_stored(lm, args.delta_file, check_fingerprint=not args.no_check)
    print(f"applied {len(encoded)} updates to {model_name}"
          + (f" and the parameters in {meta['extras_file']}" if meta.get("extras_file") else ""))
    if args.eval:
        from deftlab.eval.generate import evaluate_sets
        from deftlab.tasks import get_task

        task = get_task(args.eval)
        sets = [s.strip() for s in args.eval_sets.split(",") if s.strip()] if args.eval_sets else None
        out = Path(args.out) if args.out else Path(str(args.delta_file) + ".eval")
        results = evaluate_sets(model, lm.tokenizer, task, out, eval_sets=sets, limit=args.limit,
                                batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, progress=False)
        for name, m in results.items():
            value = m.get("accuracy", m.get("perplexity"))
            print(f"{task.name}/{name}: {json.dumps(value)} (n={m.get('n')})")
        print(f"predictions in {out}")
    return 0


def run(args) -> int:
    action = getattr(args, "delta_action", None)
    if action == "export":
        return _export(args)
    if action == "apply":
        return _apply(args)
    raise DeftlabError("deftlab delta needs an action", "use 'deftlab delta export ...' or 'deftlab delta apply ...'")
