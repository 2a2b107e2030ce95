"""deftlab demo: the main job on the embedded default, small enough for a 2-core CPU.

Loads SmolLM2-135M (converting the embedded GGUF once), prints its size and perplexity, then decomposes it with
DeFT at 85% of the parameters (task-calibrated whitened SVD + greedy search) and prints the perplexity after.
"""

from __future__ import annotations

from deftlab.cli import add_common_model_args


def add_parser(sub, name):
    p = sub.add_parser(name, help="run the main job on the embedded default model",
                       description="Model, parameter count and perplexity; then DeFT decomposition at 85%%.")
    add_common_model_args(p)
    p.add_argument("--max-tokens", type=int, default=8192, help="perplexity prefix in tokens (default 8192)")
    p.add_argument("--keep", type=float, default=0.85, help="fraction of decoder parameters kept (default 0.85)")
    p.add_argument("--calib-n", type=int, default=64, help="calibration examples (paper: 256; demo: 64)")
    p.add_argument("--skip-decompose", action="store_true", help="only the dense model")
    return p


def run(args) -> int:
    from deftlab import settings
    from deftlab.eval.corpora import corpus_text
    from deftlab.eval.perplexity import perplexity, tokenize_corpus
    from deftlab.models import load_model

    data_dir = settings.data_dir(args.data_dir)
    corpora = ["wikitext2", "arith"] if data_dir and data_dir.is_dir() else ["generated"]
    lm = load_model(args.model, dtype=args.dtype, device=args.device)
    print(f"model   {lm.spec.name} ({lm.spec.description})")
    print(f"params  {lm.num_params:,}")
    ids = {c: tokenize_corpus(lm.tokenizer, corpus_text(c, args.data_dir)) for c in corpora}
    dense = {}
    for c in corpora:
        r = perplexity(lm.model, ids[c], max_tokens=args.max_tokens, desc=f"ppl {c}")
        dense[c] = r.ppl
        print(f"ppl     {c:10s} {r.ppl:8.3f}   (first {r.windows * r.seqlen:,} of {r.total_tokens:,} tokens)")
    if args.skip_decompose:
        return 0
    from deftlab.decompose.pipeline import CompressConfig, compress_model

    cfg = CompressConfig(model=args.model, calib="arith" if "arith" in corpora else "generated",
                         calib_n=args.calib_n, allocator="deft", keep=args.keep, svd="whitened")
    model, report = compress_model(cfg, loaded=lm, data_dir=args.data_dir)
    a = report["allocation"]
    print(f"DeFT    keep {a.keep_fraction:.3f} of decoder-linear params (ERR {a.err:.3f}); "
          f"model params {report['params_after']:,} (from {lm.num_params:,})")
    for c in corpora:
        r = perplexity(model, ids[c], max_tokens=args.max_tokens, desc=f"ppl {c} (DeFT)")
        print(f"ppl     {c:10s} {r.ppl:8.3f}   after DeFT {args.keep:.0%}  (dense {dense[c]:.3f})")
    return 0
