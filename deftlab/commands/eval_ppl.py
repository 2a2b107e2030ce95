"""deftlab eval-ppl: perplexity of a (dense) model on a named corpus."""

from __future__ import annotations

import json

from deftlab.cli import add_common_model_args
from deftlab.eval.corpora import CORPORA


def add_ppl_args(p) -> None:
    p.add_argument("--seqlen", type=int, default=2048, help="window length in tokens (default 2048)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--max-tokens", type=int, default=None,
                   help="evaluate only this many leading tokens (a fixed prefix; reported as such)")


def add_parser(sub, name):
    p = sub.add_parser(name, help="perplexity on wikitext2 / c4 / arith / generated",
                       description="Perplexity over non-overlapping windows (NLL averaged over all tokens).")
    add_common_model_args(p)
    p.add_argument("--dataset", default=None, choices=CORPORA, action="append", dest="datasets",
                   help="corpus (repeatable; default wikitext2)")
    add_ppl_args(p)
    p.add_argument("--json", action="store_true", help="print results as JSON")
    return p


def run(args) -> int:
    from deftlab.eval.corpora import corpus_text
    from deftlab.eval.perplexity import perplexity, tokenize_corpus
    from deftlab.models import load_model

    datasets = args.datasets or ["wikitext2"]
    lm = load_model(args.model, dtype=args.dtype, device=args.device)
    print(f"model {lm.spec.name}: {lm.num_params:,} parameters")
    out = {}
    for ds in datasets:
        ids = tokenize_corpus(lm.tokenizer, corpus_text(ds, args.data_dir))
        res = perplexity(lm.model, ids, seqlen=args.seqlen, batch_size=args.batch_size, max_tokens=args.max_tokens,
                         desc=f"ppl {ds}")
        out[ds] = res.to_dict()
        scope = f"first {res.windows * res.seqlen:,} of {res.total_tokens:,} tokens" if res.prefix else \
            f"all {res.total_tokens:,} tokens"
        print(f"{ds:10s} ppl {res.ppl:.3f}  ({scope}, {res.windows} x {res.seqlen}, {res.seconds:.0f}s)")
    if args.json:
        print(json.dumps(out, indent=2))
    return 0
