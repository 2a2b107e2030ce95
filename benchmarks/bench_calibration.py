"""Calibration pass with statistics collection vs the same forward pass without hooks, vs an SVD-LLM-style
hook, and vs the arithmetic floor (SmolLM2-135M).

On the same batches, each round times (rotating order; best and per-round-ratio medians over `--repeats`):
- backbone: the bare backbone forward (collect_statistics runs the backbone only, no LM head);
- model: the whole model's forward, no hooks (what a user saves by skipping the head);
- svdllm: the backbone with SVD-LLM's hook (`profle_svdllm` in SVDLLM.py) on every target linear (all seven per
  block): the full fp32 XᵀX of the linear's input, as SVD-LLM computes it (one product per sequence, a batched
  matmul, summed over the batch) and accumulated in fp32; no padding mask (SVD-LLM's fixed-length samples need
  none). The goal is measured against this one;
- svdllm-2d: the same full fp32 Grams as one 2-D product over the batch's tokens (faster than SVD-LLM's own);
- deftlab: `collect_statistics` (shared Grams, padding excluded, α outlier counts, fp64 accumulation).

floor = backbone × (1 + G / F), where G = the multiply-adds of deftlab's own Gram products (one Gram per distinct
input: q/k/v share one, gate/up one, o and down one each; the block upper triangle that gram.py multiplies, over
the non-padding tokens) and F = the backbone forward's multiply-adds (torch FlopCounterMode: every linear and the
attention products, padded positions included). So the floor assumes the Gram products run at the forward's own
average rate and everything else (α, masking, fp64 accumulation, hooks) costs nothing.
Goals: deftlab / svdllm <= 0.6, deftlab / floor <= 1.15 (and the older deftlab / backbone <= 1.25).
Usage: python benchmarks/bench_calibration.py [--n 32] [--repeats 3] [--model smollm2-135m]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if (ROOT / "deftlab").is_dir():
    sys.path.insert(0, str(ROOT))


def main(extra: dict | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n", type=int, default=32, help="calibration examples")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()

    from deftlab.data.calibration import calibration_texts
    from deftlab.decompose.calibration import calibration_body, collect_statistics, token_batches
    from torch.utils.flop_counter import FlopCounterMode

    from deftlab.decompose import gram as gram_ops
    from deftlab.decompose.targets import target_linears
    from deftlab.eval.corpora import alpaca_text
    from deftlab.models import load_model
    from deftlab.settings import data_dir

    lm = load_model(args.model)
    task = "arith" if data_dir() else "generated"
    texts = calibration_texts(task, n=args.n, seed=42, formatter=alpaca_text)
    batches = list(token_batches(lm.tokenizer, texts, batch_size=args.batch_size, max_length=512))
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)

    linears = target_linears(lm.model)
    body = calibration_body(lm.model, linears.values())

    def forward(module):
        @torch.inference_mode()
        def run():
            for b in batches:
                module(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)
        return run

    def svdllm_style(per_sample: bool):
        def run():
            acc: dict[str, torch.Tensor] = {}

            def hook(name):
                def fn(module, args, out):
                    inp = args[0].detach().float()
                    if per_sample:  # SVD-LLM's own: one XᵀX per sequence (bmm), summed over the batch
                        adds = torch.matmul(inp.transpose(1, 2), inp).sum(dim=0)
                    else:
                        inp = inp.reshape(-1, inp.shape[-1])
                        adds = inp.T @ inp
                    if name in acc:
                        acc[name] += adds
                    else:
                        acc[name] = adds
                return fn

            handles = [m.register_forward_hook(hook(n)) for n, m in linears.items()]
            try:
                forward(body)()
            finally:
                for h in handles:
                    h.remove()
        return run

    stats = None

    def deftlab():
        nonlocal stats
        stats = collect_statistics(lm.model, batches, progress=False)

    runs = {"backbone": forward(body), "model": forward(lm.model), "svdllm": svdllm_style(True),
            "svdllm-2d": svdllm_style(False), "deftlab": deftlab}
    for name, fn in (extra or {}).items():  # e.g. an earlier collect_statistics, for before/after in one run
        runs[name] = lambda fn=fn: fn(lm.model, batches)
    runs["backbone"]()  # warm-up
    times: dict[str, list[float]] = {k: [] for k in runs}
    names = list(runs)
    for r in range(args.repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            t0 = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - t0)
    best = {k: min(v) for k, v in times.items()}

    with FlopCounterMode(display=False) as fc:
        forward(body)()
    forward_macs = fc.get_total_flops() / 2
    gram_macs = sum(tokens * gram_ops.upper_gram_macs(g.shape[0]) for g in stats.grams.values())
    floor = best["backbone"] * (1 + gram_macs / forward_macs)
    linear_macs = sum(m.in_features * m.out_features for m in linears.values())
    full_gram_macs = sum(m.in_features ** 2 for m in linears.values())

    def ratio(a: str, b: str) -> float:  # median of per-round ratios: a neighbour's load shifts whole rounds
        return statistics.median(x / y for x, y in zip(times[a], times[b]))

    print(f"model {lm.spec.name}, {len(texts)} {task} examples, {tokens} tokens in {len(batches)} batches "
          f"(padded {sum(b['input_ids'].numel() for b in batches)}), {torch.get_num_threads()} threads, "
          f"{args.repeats} rounds")
    for name, what in (("model", "whole model forward, no hooks"), ("backbone", "backbone forward, no hooks"),
                       ("svdllm", "SVD-LLM hook (per-sequence XtX, summed)"),
                       ("svdllm-2d", "SVD-LLM-style hook, one 2-D XtX"),
                       ("deftlab", "deftlab collect_statistics")) + tuple((n, n) for n in (extra or {})):
        print(f"{what:38s} best {best[name]:7.2f} s  median {statistics.median(times[name]):7.2f} s  "
              f"({tokens / best[name]:.0f} tokens/s)")
    print(f"backbone forward multiply-adds {forward_macs / 1e9:.1f} G ({forward_macs / tokens / 1e6:.1f} M per "
          f"valid token; linears alone {linear_macs / 1e6:.1f} M)")
    print(f"deftlab Gram multiply-adds {gram_macs / 1e9:.1f} G ({gram_macs / tokens / 1e6:.1f} M per token = "
          f"{gram_macs / forward_macs:.1%} of the forward's); SVD-LLM-style full Grams {full_gram_macs / 1e6:.1f} M "
          f"per token")
    print(f"floor = backbone x (1 + {gram_macs / forward_macs:.3f}) = {floor:.2f} s")
    r_hook, r_bb = ratio("deftlab", "svdllm"), ratio("deftlab", "backbone")
    r_floor = statistics.median(t / (b * (1 + gram_macs / forward_macs))
                                for t, b in zip(times["deftlab"], times["backbone"]))
    print(f"deftlab / whole-model forward {ratio('deftlab', 'model'):.3f}")
    print(f"deftlab / backbone forward {r_bb:.3f}  (best/best {best['deftlab'] / best['backbone']:.3f}; "
          f"goal <= 1.25: {'PASS' if r_bb <= 1.25 else 'FAIL'})")
    print(f"deftlab / SVD-LLM hook {r_hook:.3f}  (best/best {best['deftlab'] / best['svdllm']:.3f}; "
          f"goal <= 0.6: {'PASS' if r_hook <= 0.6 else 'FAIL'})")
    print(f"deftlab / SVD-LLM-style 2-D hook {ratio('deftlab', 'svdllm-2d'):.3f}  "
          f"(best/best {best['deftlab'] / best['svdllm-2d']:.3f})")
    for name in extra or {}:
        r_name = statistics.median(t / (b * (1 + gram_macs / forward_macs))
                                   for t, b in zip(times[name], times["backbone"]))
        print(f"deftlab / {name} {ratio('deftlab', name):.3f}; {name} / SVD-LLM hook {ratio(name, 'svdllm'):.3f}; "
              f"{name} / floor {r_name:.3f}")
    print(f"deftlab / floor {r_floor:.3f}  (best/best {best['deftlab'] / floor:.3f}; "
          f"goal <= 1.15: {'PASS' if r_floor <= 1.15 else 'FAIL'})")
    print("(ratios: median of per-round ratios within this run)")


if __name__ == "__main__":
    main()
