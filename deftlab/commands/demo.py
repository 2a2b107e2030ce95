"""deftlab demo: the main job on the embedded default, small enough for a 2-core CPU.

Loads SmolLM2-135M (converting the embedded GGUF once), prints its size and perplexity, then runs the paper's
comparison at a small budget: LoRA on the dense model vs DeFT (task-calibrated whitened SVD + greedy search, 85%
of the decoder-linear parameters kept) + LoRA initialised from the spectrum's tail. Each is fine-tuned briefly on
arithmetic (the generated problems when no data directory is set) and evaluated on the first few problems of
some test sets; the table compares accuracy, #params, #trainable and throughput. With so few problems the
accuracies mostly show that the pipeline runs; `deftlab run table1` is the real experiment.

Every step is a run in the results store (the dense perplexity a "compress" run with allocator none, the two
fine-tunes "finetune" runs), the same runs `deftlab run` makes from the same params: a second `make demo` reuses
them (the decomposition is cached as well) and prints the same table in seconds; an interrupted demo resumes.
--force runs them again (the earlier records are kept aside).
"""

from __future__ import annotations

import os
import time

from deftlab import settings
from deftlab.commands._args import add_common_model_args, add_store_args, csv_list, record_run
from deftlab.errors import DeftlabError


def add_parser(sub, name):
    p = sub.add_parser(name, help="run the main job on the embedded default model",
                       description="Model, parameter count and perplexity; then dense LoRA vs DeFT (85%%) + LoRA: "
                                   "a short fine-tune each, evaluation on a few problems, and a comparison table.")
    add_common_model_args(p)
    # the demo's own budget (smaller than the configs' defaults, which are the papers')
    p.add_argument("--max-tokens", type=int, default=4096, help="perplexity prefix in tokens (default 4096)")
    p.add_argument("--keep", type=float, default=0.85, help="fraction of decoder parameters kept (default 0.85)")
    p.add_argument("--calib-n", type=int, default=64, help="calibration examples (paper: 256; demo: 64)")
    p.add_argument("--skip-decompose", action="store_true", help="only the dense model's size and perplexity")
    p.add_argument("--skip-finetune", action="store_true",
                   help="decompose and report perplexity only (no fine-tuning or evaluation)")
    g = p.add_argument_group("fine-tuning budget (shrink or enlarge the demo)")
    g.add_argument("--profile", default="cpu-small", help="training profile the budget overrides (default cpu-small)")
    g.add_argument("--train-limit", type=int, default=48, help="training examples (default 48, one epoch)")
    g.add_argument("--batch-size", type=int, default=8, help="effective batch size (default 8)")
    g.add_argument("--eval-limit", type=int, default=8, help="problems per test set (default 8)")
    g.add_argument("--eval-sets", type=csv_list, default=None,
                   help="comma list (default AddSub,SingleEq with data, 'generated' without)")
    g.add_argument("--max-new-tokens", type=int, default=96, help="generation limit (default 96)")
    g.add_argument("--lora-r", type=int, default=None, help="LoRA rank (default: the profile's, 32)")
    g.add_argument("--threads", default="auto",
                   help="torch CPU threads; auto (default): 1 when the load average exceeds the core count (OpenMP "
                        "threads that wait on each other slow down several-fold on a shared machine), else torch's")
    add_store_args(p)
    return p


def _threads(value: str) -> int | None:
    if value != "auto":
        try:
            return max(1, int(value))
        except ValueError:
            raise DeftlabError(f"--threads {value!r} is not a number", "use e.g. --threads 1, or auto") from None
    try:
        busy = os.getloadavg()[0] > (os.cpu_count() or 1)
    except OSError:
        busy = False
    return 1 if busy else None


def _table(rows: list[dict], sets: list[str]) -> str:
    cols = [("method", "method", "{}")] + [(f"acc_{s.lower()}", s, "{:.1%}") for s in sets] + [
        ("avg", "avg", "{:.1%}"), ("params", "#params", "{:,}"), ("trainable", "#trainable", "{:,}"),
        ("train_tokens_per_s", "train tok/s", "{:.0f}"), ("gen_tokens_per_s", "gen tok/s", "{:.0f}"),
        ("peak_mem_mb", "peak RSS MB", "{:.0f}")]
    cells = [[label for _, label, _ in cols]]
    for r in rows:
        cells.append([fmt.format(r[k]) if r.get(k) is not None else "—" for k, _, fmt in cols])
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run(args) -> int:
    import torch

    t_start = time.perf_counter()
    threads = _threads(args.threads)
    if threads:
        torch.set_num_threads(threads)
    print(f"threads {torch.get_num_threads()} (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    data_dir = settings.data_dir(args.data_dir)
    have_data = bool(data_dir and data_dir.is_dir())
    corpora = ["wikitext2", "arith"] if have_data else ["generated"]
    model = {k: getattr(args, k) for k in ("model", "dtype", "device") if getattr(args, k) is not None}
    if args.data_dir:
        model["data_dir"] = str(args.data_dir)
    ppl = {"ppl": corpora, "ppl_max_tokens": args.max_tokens}
    dense_rec = record_run("compress", {**model, **ppl, "allocator": "none"}, args)
    dense = dense_rec["metrics"]
    print(f"model   {dense_rec['config']['model']['model']}")
    print(f"params  {dense['params_total']:,}")
    for c in corpora:
        print(f"ppl     {c:10s} {dense[f'ppl_{c}']:8.3f}   (first {dense[f'ppl_{c}_tokens']:,} tokens)")
    if args.skip_decompose:
        return 0
    task = "arith" if have_data else "generated"
    decomposition = {"keep": args.keep, "calib": task, "calib_n": args.calib_n}
    if args.skip_finetune:
        m = record_run("compress", {**model, **ppl, "allocator": "deft", **decomposition}, args)["metrics"]
        print(f"DeFT    keep {m['keep_fraction']:.3f} of decoder-linear params (ERR {m['err']:.3f}); "
              f"model params {m['params_total']:,} (from {m['params_dense_total']:,})")
        for c in corpora:
            print(f"ppl     {c:10s} {m[f'ppl_{c}']:8.3f}   after DeFT {args.keep:.0%}  (dense {dense[f'ppl_{c}']:.3f})")
        return 0

    sets = args.eval_sets or (["AddSub", "SingleEq"] if have_data else ["generated"])
    common = dict(model, task=task, adapter="lora", profile=args.profile, train_limit=args.train_limit,
                  batch_size=args.batch_size, micro_batch_size=min(4, args.batch_size), epochs=1,
                  eval_sets=sets, eval_limit=args.eval_limit, max_new_tokens=args.max_new_tokens)
    if args.lora_r:
        common["lora_r"] = args.lora_r
    runs = [
        ("DeFT + LoRA", dict(common, method="deft", **decomposition, **ppl)),
        ("LoRA (dense)", dict(common, method="dense")),
    ]
    rows = []
    for label, params in runs:
        print(f"\n== {label}")
        t0 = time.perf_counter()
        m = record_run("finetune", params, args)["metrics"]
        gen = [v for k, v in m.items() if k.startswith("gen_tokens_per_s_")]
        rows.append(dict(m, method=label, gen_tokens_per_s=sum(gen) / len(gen) if gen else None))
        print(f"   done in {time.perf_counter() - t0:.0f} s")
        if params["method"] == "deft":
            print(f"DeFT    keep {m['keep_fraction']:.3f} of decoder-linear params (ERR {m['err']:.3f}); "
                  f"model params {m['params']:,} (from {m['params_dense']:,})")
            for c in corpora:
                print(f"ppl     {c:10s} {m[f'ppl_{c}']:8.3f}   after DeFT {args.keep:.0%}, before fine-tuning  "
                      f"(dense {dense[f'ppl_{c}']:.3f})")
    print(f"\n{task}: {args.train_limit} training examples, 1 epoch; first {args.eval_limit} problems of "
          f"{', '.join(sets)}; greedy, {args.max_new_tokens} new tokens at most")
    print(_table(rows, sets))
    print("#params: the evaluated (merged) model; #trainable: LoRA parameters during fine-tuning. "
          "With this few problems the accuracies are noise; see `deftlab run table1`.")
    print(f"demo wall time {time.perf_counter() - t_start:.0f} s")
    return 0
