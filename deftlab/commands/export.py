"""deftlab export RUN --format factored|merged DIR: a fine-tuned run as a standalone Hugging Face model directory."""

from __future__ import annotations


def add_parser(sub, name):
    p = sub.add_parser(name, help="export a fine-tuned run as a Hugging Face model (factored or merged)",
                       description="Write the model a finetune run evaluated (trained tensors, LoRA merged, NF4 "
                                   "dequantised) to DIR with its tokenizer and generation config. factored: the "
                                   "decomposed model at its own parameter count (load with trust_remote_code=True); "
                                   "merged: the base architecture with W_u·W_v multiplied back (no remote code). "
                                   "DIR/deftlab_export.json records the run, ranks, sizes and package versions.")
    p.add_argument("run", metavar="RUN", help="a recorded finetune run: its directory, key (or a prefix) or kind/key")
    p.add_argument("dir", metavar="DIR", help="output directory (must be new or empty, unless --force)")
    p.add_argument("--format", dest="fmt", required=True, choices=["factored", "merged"],
                   help="factored: low-rank layers kept (remote code); merged: plain base architecture")
    p.add_argument("--results", default=None, help="results store for a key (default: $DEFTLAB_RESULTS, ./results)")
    p.add_argument("--force", action="store_true", help="replace DIR if it is not empty")
    return p


def run(args) -> int:
    from deftlab.export import export_run

    rec = export_run(args.run, args.fmt, args.dir, results=args.results, overwrite=args.force)
    mib = rec["bytes"] / 2**20
    kept = (f" ({rec['factored_layers']} layers factored)" if rec["export_format"] == "factored" else
            f" ({rec['multiplied_back']} factored layers multiplied back)")
    print(f"{rec['run']} -> {args.dir}: {rec['export_format']}, {rec['params']:,} parameters{kept}")
    print(f"  {mib:.2f} MiB, dtype {rec['dtype']}, tokenizer: {rec['tokenizer']}"
          + (f"; {rec['note']}" if rec.get("note") else ""))
    print(f"  load: {rec['load'].replace('DIR', repr(str(args.dir)))}")
    return 0
