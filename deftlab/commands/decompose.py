"""deftlab decompose: calibrate, decompose (cached), allocate ranks; per-matrix ranks and perplexity before/after.

Two runs of kind "compress" through the results store: the dense reference (allocator none) and the decomposed
model; both are the runs `deftlab run` would make from the same params, and are reused when recorded.
"""

from __future__ import annotations

import csv

from deftlab.commands._args import (
    add_blockwise_flag, add_common_model_args, add_store_args, csv_list, param_flag, params_of, record_run,
)
from deftlab.config import ConfigError, flat_fields
from deftlab.recipes.compress import CompressConfig, decompose_shard, launch_shard
from deftlab.store import ResultsStore

CC = CompressConfig
PARAMS = tuple(flat_fields(CompressConfig))
MODEL_PARAMS = ("model", "dtype", "device", "data_dir", "ppl", "ppl_max_tokens", "ppl_seqlen", "ppl_batch_size")


def add_ppl_flags(p) -> None:
    param_flag(p, CC, "ppl_seqlen", type=int, help="window length in tokens")
    param_flag(p, CC, "ppl_batch_size", type=int, help="windows per forward pass")
    param_flag(p, CC, "ppl_max_tokens", type=int, help="evaluate only this many leading tokens (a fixed prefix)")


def add_parser(sub, name):
    p = sub.add_parser(name, help="decompose a model and allocate ranks (DeFT / WeLore / OWL / uniform)",
                       description="Calibrate on task data, whitened (or plain) SVD of every target linear "
                                   "(cached), allocate ranks under a budget, report ranks and perplexity "
                                   "before/after. Exactly one of --keep / --err. Recorded in the results store.")
    add_common_model_args(p)
    param_flag(p, CC, "calib", help="calibration task: arith | xsum | math | c4 | wikitext2 | generated")
    param_flag(p, CC, "calib_n", type=int, help="calibration examples (DeFT's value)")
    param_flag(p, CC, "calib_seed", type=int)
    param_flag(p, CC, "allocator", choices=["deft", "welore", "owl", "uniform", "svdllm", "asvd", "wanda"])
    param_flag(p, CC, "keep", type=float, help="fraction of decoder-linear parameters preserved")
    param_flag(p, CC, "keep_of", choices=["linears", "model"],
               help="what --keep is a fraction of: the decoder linears or the whole model (the DeFT paper's)")
    param_flag(p, CC, "welore_min_ratio", type=float, help="WeLore: N-LRC floor, pruned/full (fine-tuning: 0.4999)")
    param_flag(p, CC, "welore_factor", choices=["break-even", "lrc"],
               help="WeLore: which reduced matrices become two matrices (lrc: only LRCs, the paper's rule)")
    param_flag(p, CC, "err", type=float, help="effective rank reduction ratio (WeLore ERR)")
    param_flag(p, CC, "eta", type=float, help="importance weight η (DeFT; 0 ignores α)")
    param_flag(p, CC, "group", type=int, help="rank cut size G (DeFT)")
    param_flag(p, CC, "svd", choices=["whitened", "plain", "asvd"])
    add_blockwise_flag(p)
    p.add_argument("--shard", default=None, metavar="I/N|auto",
                   help="only fill part I of N of the decomposition cache and stop (N processes or machines share "
                        "one cache; then run without --shard); auto: this process's part of a torchrun launch")
    param_flag(p, CC, "ppl", type=csv_list, help="comma list of corpora; 'calib' = the calibration task's text")
    add_ppl_flags(p)
    add_store_args(p)
    return p


def parse_shard(value: str) -> tuple[int, int]:
    """'I/N' (0 ≤ I < N), or 'auto': the (rank, world size) of a torchrun launch."""
    if value == "auto":
        shard = launch_shard()
        if shard is None:
            raise ConfigError("--shard auto outside a torchrun launch of several processes",
                              "run under torchrun --nproc_per_node N, or pass --shard I/N")
        return shard
    try:
        i, n = (int(v) for v in value.split("/"))
    except ValueError:
        i, n = -1, 0
    if not 0 <= i < n:
        raise ConfigError(f"--shard {value!r} is not I/N with 0 <= I < N", "e.g. --shard 0/4 ... --shard 3/4")
    return i, n


def run(args) -> int:
    params = params_of(args, PARAMS)
    if args.shard is not None:
        shard = parse_shard(args.shard)
        where, names = decompose_shard(CompressConfig.from_params(params).resolve(), shard)
        print(f"shard {shard[0]}/{shard[1]}: {len(names)} matrices decomposed into {where}; when every shard has "
              "finished, run the same command without --shard to allocate, evaluate and record")
        return 0
    if "ppl" in params:
        calib = params.get("calib", CompressConfig().decomposition.calib)
        params["ppl"] = list(dict.fromkeys(calib if c == "calib" else c for c in params["ppl"]))
    dense = record_run("compress", {**{k: v for k, v in params.items() if k in MODEL_PARAMS},
                                    "allocator": "none"}, args)
    rec = record_run("compress", params, args)
    m, before = rec["metrics"], dense["metrics"]
    run_dir = ResultsStore(args.results).run_dir("compress", rec["key"])
    with open(run_dir / "allocation.csv") as f:
        rows = list(csv.DictReader(f))
    print(f"{'name':42s} {'rank':>6s} {'full':>6s} {'factored':>8s}")
    for r in rows[:24]:
        print(f"{r['name']:42s} {r['rank']:>6s} {r.get('full_rank', ''):>6s} {r.get('factored', ''):>8s}")
    if len(rows) > 24:
        print(f"... {len(rows) - 24} more in {run_dir / 'allocation.csv'}")
    cfg = rec["config"]["decomposition"]
    print(f"\n{cfg['allocator']} ({cfg['svd']} SVD): kept {m['keep_fraction']:.4f} of decoder-linear params "
          f"({m['params_decoder_kept']:,} of {m['params_decoder_dense']:,}), ERR {m['err']:.4f}; "
          f"model {m['params_dense_total']:,} -> {m['params_total']:,} params")
    for c in rec["config"]["perplexity"]["ppl"]:
        print(f"ppl {c:10s} before {before[f'ppl_{c}']:9.3f}   after {m[f'ppl_{c}']:9.3f}")
    return 0
