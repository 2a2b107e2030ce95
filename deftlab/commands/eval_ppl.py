"""deftlab eval-ppl: perplexity of a (dense) model on named corpora: a "compress" run with allocator none."""

from __future__ import annotations

import json

from deftlab.commands._args import add_common_model_args, add_store_args, params_of, record_run
from deftlab.commands.decompose import MODEL_PARAMS, add_ppl_flags
from deftlab.eval.corpora import CORPORA


def add_parser(sub, name):
    p = sub.add_parser(name, help="perplexity on wikitext2 / c4 / arith / generated",
                       description="Perplexity over non-overlapping windows (NLL averaged over all tokens), "
                                   "recorded in the results store.")
    add_common_model_args(p)
    p.add_argument("--dataset", default=None, choices=CORPORA, action="append", dest="ppl",
                   help="corpus (repeatable; default wikitext2)")
    add_ppl_flags(p)
    add_store_args(p)
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    return p


def run(args) -> int:
    params = {**params_of(args, MODEL_PARAMS), "allocator": "none"}
    params.setdefault("ppl", ["wikitext2"])
    rec = record_run("compress", params, args)
    m = rec["metrics"]
    print(f"model {rec['config']['model']['model']}: {m['params_total']:,} parameters")
    for ds in params["ppl"]:
        scope = f"first {m[f'ppl_{ds}_tokens']:,} tokens" if m.get(f"ppl_{ds}_prefix") else \
            f"all {m[f'ppl_{ds}_tokens']:,} tokens"
        print(f"{ds:10s} ppl {m[f'ppl_{ds}']:.3f}  ({scope})")
    if args.json:
        print(json.dumps(m, indent=2))
    return 0
