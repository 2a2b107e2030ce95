"""Calibration pass with statistics collection vs the same forward pass without hooks (SmolLM2-135M).

Goal: ratio <= 1.25. The calibration pass runs the backbone only (no LM head, see collect_statistics), so "the
same forward pass" is the backbone's; the whole model's forward is timed too, for what a user saves.
Also prints the Gram's multiply-adds per token against the backbone's linear layers': with both at the same
GEMM efficiency, that share bounds how close to 1.0 the ratio can get.
Prints the ratios measured in this run (alternating order, best of `--repeats`).
Usage: python benchmarks/bench_calibration.py [--n 32] [--repeats 2] [--model smollm2-135m]
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n", type=int, default=32, help="calibration examples")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()

    from deftlab.data.calibration import calibration_texts
    from deftlab.decompose.calibration import calibration_body, collect_statistics, token_batches
    from deftlab.decompose.gram import block_bounds
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

    stats = None

    def hooked():
        nonlocal stats
        stats = collect_statistics(lm.model, batches, progress=False)

    runs = {"backbone": forward(body), "model": forward(lm.model), "hooked": hooked}
    runs["backbone"]()  # warm-up
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(args.repeats):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)

    def upper_gram_macs(d: int) -> int:
        bounds = block_bounds(d)
        return sum((hi - lo) * (d - lo) for lo, hi in zip(bounds[:-1], bounds[1:]))

    gram_macs = sum(upper_gram_macs(g.shape[0]) for g in stats.grams.values())
    linear_macs = sum(m.in_features * m.out_features for m in linears.values())
    ratio = best["hooked"] / best["backbone"]
    print(f"model {lm.spec.name}, {len(texts)} {task} examples, {tokens} tokens, {torch.get_num_threads()} threads,"
          f" best of {args.repeats}")
    for name, what in (("model", "whole model forward, no hooks"), ("backbone", "backbone forward, no hooks"),
                       ("hooked", "calibration (backbone + statistics)")):
        print(f"{what:38s} {best[name]:7.2f} s  ({tokens / best[name]:.0f} tokens/s)")
    print(f"Gram multiply-adds per token: {gram_macs / 1e6:.1f} M = {gram_macs / linear_macs:.0%} of the target "
          f"linears' {linear_macs / 1e6:.1f} M")
    print(f"calibration / whole-model forward {best['hooked'] / best['model']:.3f}")
    print(f"ratio (calibration / the same backbone forward) {ratio:.3f}  "
          f"(goal <= 1.25: {'PASS' if ratio <= 1.25 else 'FAIL'})")


if __name__ == "__main__":
    main()
