"""deftlab decompose: calibrate, decompose (cached), allocate ranks, report per-matrix ranks and perplexity."""

from __future__ import annotations

import json
from pathlib import Path

from deftlab.cli import add_common_model_args
from deftlab.commands.eval_ppl import add_ppl_args


def add_parser(sub, name):
    p = sub.add_parser(name, help="decompose a model and allocate ranks (DeFT / WeLore / OWL / uniform)",
                       description="Calibrate on task data, whitened (or plain) SVD of every target linear "
                                   "(cached), allocate ranks under a budget, report ranks and perplexity "
                                   "before/after. Exactly one of --keep / --err.")
    add_common_model_args(p)
    p.add_argument("--calib", default="arith", help="calibration task: arith | xsum | math | c4 | wikitext2 | generated")
    p.add_argument("--calib-n", type=int, default=256, help="calibration examples (default 256, DeFT's value)")
    p.add_argument("--calib-seed", type=int, default=42)
    p.add_argument("--allocator", default="deft", choices=["deft", "welore", "owl", "uniform"])
    p.add_argument("--keep", type=float, default=None, help="fraction of decoder-linear parameters preserved")
    p.add_argument("--err", type=float, default=None, help="effective rank reduction ratio (WeLore ERR)")
    p.add_argument("--eta", type=float, default=1.0, help="importance weight η (DeFT; 0 ignores α)")
    p.add_argument("--group", type=int, default=32, help="rank cut size G (DeFT)")
    p.add_argument("--svd", default="whitened", choices=["whitened", "plain"])
    p.add_argument("--ppl", default="wikitext2,calib", help="comma list of corpora; 'calib' = the calibration "
                                                            "task's training text; '' to skip")
    add_ppl_args(p)
    p.set_defaults(max_tokens=8192)
    p.add_argument("--out", default=None, help="output directory for ranks.csv / summary.json "
                                              "(default results/decompose/<model>-<allocator>-...)")
    return p


def run(args) -> int:
    from deftlab.decompose.pipeline import CompressConfig, allocation_frame, compress_model
    from deftlab.eval.corpora import CORPORA, corpus_text
    from deftlab.eval.perplexity import perplexity, tokenize_corpus
    from deftlab.models import load_model
    from deftlab.settings import results_dir

    corpora = [c.strip() for c in args.ppl.split(",") if c.strip()]
    corpora = [(args.calib if c == "calib" else c) for c in corpora]
    corpora = [c for c in dict.fromkeys(corpora) if c in CORPORA]
    cfg = CompressConfig(model=args.model, calib=args.calib, calib_n=args.calib_n, calib_seed=args.calib_seed,
                         svd=args.svd, allocator=args.allocator, keep=args.keep, err=args.err, eta=args.eta,
                         group=args.group, dtype=args.dtype, device=args.device)
    cfg.validate()
    lm = load_model(args.model, dtype=args.dtype, device=args.device)
    ids = {c: tokenize_corpus(lm.tokenizer, corpus_text(c, args.data_dir)) for c in corpora}
    before = {c: perplexity(lm.model, ids[c], seqlen=args.seqlen, max_tokens=args.max_tokens,
                            desc=f"ppl {c} (dense)").ppl for c in corpora}
    model, report = compress_model(cfg, loaded=lm, data_dir=args.data_dir)
    after = {c: perplexity(model, ids[c], seqlen=args.seqlen, max_tokens=args.max_tokens,
                           desc=f"ppl {c} ({args.allocator})").ppl for c in corpora}
    alloc = report["allocation"]
    budget = f"keep{args.keep}" if args.keep is not None else f"err{args.err}"
    out = Path(args.out) if args.out else results_dir() / "decompose" / (
        f"{lm.spec.name}-{args.allocator}-{args.svd}-{budget}-eta{args.eta}-{args.calib}{args.calib_n}")
    out.mkdir(parents=True, exist_ok=True)
    df = allocation_frame(report)
    df.to_csv(out / "ranks.csv", index=False)
    cols = [c for c in ("name", "rank", "full_rank", "factored", "lrc", "alpha", "f_theta", "params_dense",
                        "params") if c in df.columns]
    with_pd_opts = df[cols].to_string(index=False, max_rows=24, float_format=lambda v: f"{v:.4f}")
    print(with_pd_opts)
    summary = {
        "model": lm.spec.name, "allocator": args.allocator, "svd": args.svd, "eta": args.eta,
        "target": {"keep": args.keep, "err": args.err},
        "keep_fraction": alloc.keep_fraction, "err": alloc.err,
        "decoder_params_before": alloc.params_dense, "decoder_params_after": alloc.params_kept,
        "model_params_before": report["params_before"], "model_params_after": report["params_after"],
        "ppl_before": before, "ppl_after": after, "ppl_max_tokens": args.max_tokens,
        "decomposition_cache": report["decomposition_dir"],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\n{args.allocator} ({args.svd} SVD): kept {alloc.keep_fraction:.4f} of decoder-linear params "
          f"({alloc.params_kept:,} of {alloc.params_dense:,}), ERR {alloc.err:.4f}; "
          f"model {report['params_before']:,} -> {report['params_after']:,} params")
    for c in corpora:
        print(f"ppl {c:10s} before {before[c]:9.3f}   after {after[c]:9.3f}")
    print(f"saved {out}/ranks.csv and summary.json")
    return 0
