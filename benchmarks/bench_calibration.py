"""Calibration pass with statistics collection vs the same forward pass without hooks (SmolLM2-135M).

Goal: ratio <= 1.25. Prints the ratio measured in this run (alternating order, best of `--repeats`).
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
    from deftlab.decompose.calibration import collect_statistics, token_batches
    from deftlab.eval.corpora import alpaca_text
    from deftlab.models import load_model
    from deftlab.settings import data_dir

    lm = load_model(args.model)
    task = "arith" if data_dir() else "generated"
    texts = calibration_texts(task, n=args.n, seed=42, formatter=alpaca_text)
    batches = list(token_batches(lm.tokenizer, texts, batch_size=args.batch_size, max_length=512))
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)

    @torch.inference_mode()
    def plain():
        for b in batches:
            lm.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)

    def hooked():
        collect_statistics(lm.model, batches, progress=False)

    plain()  # warm-up
    best = {"plain": float("inf"), "hooked": float("inf")}
    for _ in range(args.repeats):
        for name, fn in (("plain", plain), ("hooked", hooked)):
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    ratio = best["hooked"] / best["plain"]
    print(f"model {lm.spec.name}, {len(texts)} {task} examples, {tokens} tokens, {torch.get_num_threads()} threads")
    print(f"forward without hooks   {best['plain']:7.2f} s  ({tokens / best['plain']:.0f} tokens/s)")
    print(f"forward with statistics {best['hooked']:7.2f} s  ({tokens / best['hooked']:.0f} tokens/s)")
    print(f"ratio {ratio:.3f}  (goal <= 1.25: {'PASS' if ratio <= 1.25 else 'FAIL'})")


if __name__ == "__main__":
    main()
