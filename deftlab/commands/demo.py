"""deftlab demo: the main job on the embedded default, small enough for a 2-core CPU.

Loads SmolLM2-135M (converting the embedded GGUF once), prints its size and perplexity, then runs the paper's
comparison at a small budget: LoRA on the dense model vs DeFT (task-calibrated whitened SVD + greedy search, 85%
of the decoder-linear parameters kept) + LoRA initialised from the spectrum's tail. Each is fine-tuned briefly on
arithmetic (the generated problems when no data directory is set) and evaluated on the first few problems of
some test sets; the table compares accuracy, #params, #trainable and throughput. With so few problems the
accuracies mostly show that the pipeline runs; `deftlab run table1` is the real experiment.

Both runs are recorded under results/demo/ and resumable: a second `make demo` reuses them (the decomposition is
cached as well), so it prints the same table in seconds. --fresh starts over.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from deftlab.cli import add_common_model_args


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def add_parser(sub, name):
    p = sub.add_parser(name, help="run the main job on the embedded default model",
                       description="Model, parameter count and perplexity; then dense LoRA vs DeFT (85%%) + LoRA: "
                                   "a short fine-tune each, evaluation on a few problems, and a comparison table.")
    add_common_model_args(p)
    p.add_argument("--max-tokens", type=int, default=4096, help="perplexity prefix in tokens (default 4096)")
    p.add_argument("--keep", type=float, default=0.85, help="fraction of decoder parameters kept (default 0.85)")
    p.add_argument("--calib-n", type=int, default=64, help="calibration examples (paper: 256; demo: 64)")
    p.add_argument("--skip-decompose", action="store_true", help="only the dense model's size and perplexity")
    p.add_argument("--skip-finetune", action="store_true",
                   help="decompose and report perplexity only (no fine-tuning or evaluation)")
    g = p.add_argument_group("fine-tuning budget (shrink or enlarge the demo)")
    g.add_argument("--preset", default="cpu-small", help="training preset the budget overrides (default cpu-small)")
    g.add_argument("--train-limit", type=int, default=48, help="training examples (default 48, one epoch)")
    g.add_argument("--batch-size", type=int, default=8, help="effective batch size (default 8)")
    g.add_argument("--eval-limit", type=int, default=8, help="problems per test set (default 8)")
    g.add_argument("--eval-sets", type=_csv, default=None,
                   help="comma list (default AddSub,SingleEq with data, 'generated' without)")
    g.add_argument("--max-new-tokens", type=int, default=96, help="generation limit (default 96)")
    g.add_argument("--lora-r", type=int, default=None, help="LoRA rank (default: the preset's, 32)")
    g.add_argument("--threads", default="auto",
                   help="torch CPU threads; auto (default): 1 when the load average exceeds the core count (OpenMP "
                        "threads that wait on each other slow down several-fold on a shared machine), else torch's")
    g.add_argument("--run-root", default=None, help="where the two runs are recorded (default results/demo)")
    g.add_argument("--fresh", action="store_true", help="delete the recorded demo runs first")
    return p


def _threads(value: str) -> int | None:
    if value != "auto":
        try:
            return max(1, int(value))
        except ValueError:
            from deftlab.errors import DeftlabError

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


def _perplexity_only(args, lm, ids, dense, corpora) -> int:
    from deftlab.decompose.pipeline import CompressConfig, compress_model
    from deftlab.eval.perplexity import perplexity

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


def run(args) -> int:
    import torch

    from deftlab import settings
    from deftlab.eval.corpora import corpus_text
    from deftlab.eval.perplexity import perplexity, tokenize_corpus
    from deftlab.models import load_model

    t_start = time.perf_counter()
    threads = _threads(args.threads)
    if threads:
        torch.set_num_threads(threads)
    print(f"threads {torch.get_num_threads()} (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    data_dir = settings.data_dir(args.data_dir)
    have_data = bool(data_dir and data_dir.is_dir())
    corpora = ["wikitext2", "arith"] if have_data else ["generated"]
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
    if args.skip_finetune:
        return _perplexity_only(args, lm, ids, dense, corpora)
    del lm, ids  # each run loads its own copy

    from deftlab.commands.finetune import default_run_name
    from deftlab.config import from_dict
    from deftlab.train.pipeline import FinetuneConfig, run_finetune

    task = "arith" if have_data else "generated"
    sets = args.eval_sets or (["AddSub", "SingleEq"] if have_data else ["generated"])
    common = dict(model=args.model, task=task, adapter="lora", preset=args.preset, train_limit=args.train_limit,
                  batch_size=args.batch_size, micro_batch_size=min(4, args.batch_size), epochs=1,
                  eval_sets=sets, eval_limit=args.eval_limit, max_new_tokens=args.max_new_tokens,
                  device=args.device)
    if args.lora_r:
        common["lora_r"] = args.lora_r
    if args.data_dir:
        common["data_dir"] = str(args.data_dir)
    if args.dtype:
        common["dtype"] = args.dtype
    runs = [
        ("DeFT + LoRA", dict(common, method="deft", keep=args.keep, calib=task, calib_n=args.calib_n, ppl=corpora,
                             ppl_max_tokens=args.max_tokens)),
        ("LoRA (dense)", dict(common, method="dense")),
    ]
    root = Path(args.run_root) if args.run_root else settings.results_dir() / "demo"
    rows = []
    for label, params in runs:
        run_dir = root / default_run_name(from_dict(FinetuneConfig, dict(params)).resolve())
        if args.fresh and run_dir.exists():
            shutil.rmtree(run_dir)
        print(f"\n== {label}: {run_dir}")
        t0 = time.perf_counter()
        m = run_finetune(params, run_dir)
        gen = [v for k, v in m.items() if k.startswith("gen_tokens_per_s_")]
        rows.append(dict(m, method=label, gen_tokens_per_s=sum(gen) / len(gen) if gen else None))
        print(f"   done in {time.perf_counter() - t0:.0f} s")
        if params["method"] == "deft":
            print(f"DeFT    keep {m['keep_fraction']:.3f} of decoder-linear params (ERR {m['err']:.3f}); "
                  f"model params {m['params']:,} (from {m['params_dense']:,})")
            for c in corpora:
                print(f"ppl     {c:10s} {m[f'ppl_{c}']:8.3f}   after DeFT {args.keep:.0%}, before fine-tuning  "
                      f"(dense {dense[c]:.3f})")
    print(f"\n{task}: {args.train_limit} training examples, 1 epoch; first {args.eval_limit} problems of "
          f"{', '.join(sets)}; greedy, {args.max_new_tokens} new tokens at most")
    print(_table(rows, sets))
    print("#params: the evaluated (merged) model; #trainable: LoRA parameters during fine-tuning. "
          "With this few problems the accuracies are noise; see `deftlab run table1`.")
    print(f"demo wall time {time.perf_counter() - t_start:.0f} s")
    return 0
