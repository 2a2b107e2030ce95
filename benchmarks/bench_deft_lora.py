"""DeFT + LoRA vs dense LoRA training throughput beside the FLOP bound (SmolLM2-135M shapes, random weights).

Both models are built at SmolLM2-135M's shapes by `deftlab.surgery.synthetic.synthetic_model` (speed depends on
shapes only): dense, and DeFT-decomposed at `--keep` (uniform ranks: every target linear keeps the same fraction
of its parameters, the budget's parameter count). fp32 LoRA r 32, alpha 16 on q,k,v,gate,up,down (DeFT's
targets). One step = forward, deftlab's masked LM loss, backward, AdamW step, on batch × seq random tokens.

The FLOP bound is dense step multiply-adds / DeFT step multiply-adds, counted by torch's FlopCounterMode over one
forward + backward of each model on the unfused path (every matmul and attention product, LM head included; the
frozen weights get no weight gradients; elementwise ops, loss and optimizer not counted). Three variants are
timed alternately, one step each per round (rotating order), medians over `--rounds`
(and per-round ratios): dense LoRA, DeFT + LoRA on PEFT's plain
path (`LowRankLoraLinear.fused = False`, the code before the fused layer) and DeFT + LoRA fused.

    python benchmarks/bench_deft_lora.py [--keep 0.55] [--keep-of linears] [--batch 4] [--seq 128]
                                         [--dropout 0.0] [--rounds 7]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if (ROOT / "deftlab").is_dir():
    sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--keep", type=float, default=0.55)
    ap.add_argument("--keep-of", default="linears", choices=("linears", "model"))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from deftlab.adapters.attach import attach
    from deftlab.adapters.config import AdapterConfig
    from deftlab.adapters.lowrank_lora import LowRankLoraLinear
    from deftlab.models.registry import get_spec
    from deftlab.planner.architecture import from_hf_config
    from deftlab.planner.memory import DEFT_TARGETS, kept_linear_fraction
    from deftlab.surgery.synthetic import synthetic_model
    from deftlab.train.module import masked_lm_loss

    arch_fields = dict(get_spec(args.model).arch)
    kept = kept_linear_fraction(from_hf_config(arch_fields), args.keep, args.keep_of)
    acfg = AdapterConfig(kind="lora", init="vanilla", r=32, alpha=16, dropout=args.dropout,
                         target_modules=DEFT_TARGETS)

    def build(keep):
        model = attach(synthetic_model(arch_fields, keep_linears=keep, seed=0), acfg)
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        return model, opt

    dense, deft = build(None), build(kept)
    ids = torch.randint(3, arch_fields["vocab_size"], (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)

    def fwd_bwd(model):
        loss, _ = masked_lm_loss(model(input_ids=ids, attention_mask=mask, use_cache=False).logits, ids)
        loss.backward()

    def flops(model) -> int:
        LowRankLoraLinear.fused = False
        with FlopCounterMode(display=False) as fc:
            fwd_bwd(model)
        model.zero_grad(set_to_none=True)
        return fc.get_total_flops()

    def step(model, opt):
        fwd_bwd(model)
        opt.step()
        opt.zero_grad(set_to_none=True)

    f_dense, f_deft = flops(dense[0]), flops(deft[0])
    variants = {"dense LoRA": (dense, None), "DeFT + LoRA, plain": (deft, False), "DeFT + LoRA, fused": (deft, True)}
    times: dict[str, list[float]] = {k: [] for k in variants}
    names = list(variants)
    for r in range(args.rounds + 1):  # round 0 warms up; the order rotates, so no variant always follows another
        for name in names[r % 3:] + names[: r % 3]:
            (model, opt), fused = variants[name]
            if fused is not None:
                LowRankLoraLinear.fused = fused
            t0 = time.perf_counter()
            step(model, opt)
            if r:
                times[name].append(time.perf_counter() - t0)
    LowRankLoraLinear.fused = True

    tokens = args.batch * args.seq
    med = {k: statistics.median(v) for k, v in times.items()}
    bound = f_dense / f_deft
    print(f"{args.model} shapes, DeFT keep {args.keep} of the {args.keep_of} (decoder linears keep {kept:.3f}), "
          f"fp32 LoRA r 32 dropout {args.dropout}, batch {args.batch} x seq {args.seq}, "
          f"{torch.get_num_threads()} threads, median of {args.rounds} alternating rounds")
    print(f"multiply-adds per step (forward + backward): dense LoRA {f_dense / 2e9:.1f} G, "
          f"DeFT + LoRA {f_deft / 2e9:.1f} G -> FLOP bound {bound:.3f}x")
    for name, t in med.items():
        print(f"{name:22s} {t:6.3f} s/step  {tokens / t:7.1f} tokens/s  "
              f"({f_dense / 2 / t / 1e9 if name.startswith('dense') else f_deft / 2 / t / 1e9:.1f} G MAC/s)")
    for name in ("DeFT + LoRA, plain", "DeFT + LoRA, fused"):
        # per-round ratios: a neighbour's load shifts whole rounds, and a ratio within a round cancels most of it
        speedup = statistics.median(d / t for d, t in zip(times["dense LoRA"], times[name]))
        print(f"{name} / dense LoRA tokens/s {speedup:.3f}x (median of per-round ratios; of medians "
              f"{med['dense LoRA'] / med[name]:.3f}x) = {speedup / bound:.3f} of the bound "
              f"(goal >= 0.9: {'PASS' if speedup / bound >= 0.9 else 'FAIL'})")
    for name, t in times.items():
        print(f"  {name} per round: " + " ".join(f"{x:.2f}" for x in t))
    fp = statistics.median(p / f for p, f in zip(times["DeFT + LoRA, plain"], times["DeFT + LoRA, fused"]))
    print(f"fused / plain DeFT + LoRA tokens/s {fp:.3f}x")


if __name__ == "__main__":
    main()
