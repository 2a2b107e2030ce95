"""`deftlab plan`'s fine-tuning peak against the peak RSS of real LoRA training steps on this CPU.

Models are built at real shapes with random weights (no download): SmolLM2-135M's shapes and a synthetic 1024-wide
LLaMA of 8 blocks. Each case is measured in a fresh process: RSS before the model exists is the baseline, the
peak RSS above it over the second training step (AdamW's states exist by then) is compared with the planner's
prediction for fp32 LoRA on CPU (r 32 on q,k,v,gate,up,down, dropout 0.05). Prints measured / predicted per case;
the goal is within 10%. glibc's dynamic mmap threshold keeps freed activation buffers in the heap, where RSS
still counts them; run with MALLOC_MMAP_THRESHOLD_=65536 (main() sets it for its subprocesses) so RSS follows live
memory.

    python benchmarks/bench_planner.py            # all cases
    python benchmarks/bench_planner.py --quick    # SmolLM2 shapes, batch 1 only
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if (ROOT / "deftlab").is_dir():
    sys.path.insert(0, str(ROOT))

SYNTHETIC = {"model_type": "llama", "hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 8,
             "num_attention_heads": 16, "num_key_value_heads": 16, "vocab_size": 32000, "tie_word_embeddings": False}


def _config(name: str) -> dict:
    if name == "synthetic-1024x8":
        return dict(SYNTHETIC)
    from deftlab.models.registry import get_spec

    return dict(get_spec(name).arch)


def measure(name: str, batch: int, seq: int, ckpt: bool) -> dict:
    """One case, in this process (run by main() in a fresh subprocess)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from deftlab.adapters.attach import attach
    from deftlab.adapters.config import AdapterConfig
    from deftlab.planner.architecture import from_hf_config
    from deftlab.planner.memory import DEFT_TARGETS, TrainSetup, finetune_phase
    from deftlab.train.memory import RssSampler, current_rss, release_free_memory

    def build(cfg: dict):
        cfg = dict(cfg)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg))
        peft = attach(model, AdapterConfig(kind="lora", init="vanilla", r=32, alpha=16, dropout=0.05,
                                           target_modules=DEFT_TARGETS))
        if ckpt:
            peft.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            peft.enable_input_require_grads()
        peft.train()
        return peft, torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=1e-4)

    torch.manual_seed(0)
    cfg = _config(name)
    ids = torch.randint(3, 1000, (batch, seq))
    # the baseline comes after one step of a 2-layer, 64-wide model of the same type: every module imported and
    # every kernel's thread pool started, so what remains above it is the model's and the step's own memory
    small = {**cfg, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 4, "vocab_size": 1000, "head_dim": 16}
    tiny, opt = build(small)
    tiny(input_ids=ids[:, :8], labels=ids[:, :8]).loss.backward()
    opt.step()
    del tiny, opt
    release_free_memory()
    base = current_rss()
    peft, opt = build(cfg)
    for step in range(2):
        release_free_memory()
        with RssSampler() as s:
            loss = peft(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            del loss
    arch = from_hf_config(_config(name))
    pred = finetune_phase(arch, TrainSetup("lora", batch, seq, compute="fp32", device="cpu", grad_ckpt=ckpt))
    return {"model": name, "batch": batch, "seq_len": seq, "grad_ckpt": ckpt, "measured": s.peak - base,
            "predicted": pred.total, "parts": pred.parts}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--case", nargs=4, metavar=("MODEL", "BATCH", "SEQ", "CKPT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.case:
        m, b, s, c = args.case
        print(json.dumps(measure(m, int(b), int(s), c == "1")))
        return 0
    cases = [("smollm2-135m", 1, 128, 0)]
    if not args.quick:
        cases += [("smollm2-135m", 4, 128, 0), ("smollm2-135m", 4, 128, 1), ("synthetic-1024x8", 1, 128, 0),
                  ("synthetic-1024x8", 4, 128, 0)]
    print(f"{'model':18s} {'batch':>5s} {'seq':>4s} {'ckpt':>4s} {'measured MiB':>13s} {'predicted MiB':>14s} "
          f"{'ratio':>6s}")
    for m, b, s, c in cases:
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
        out = subprocess.run([sys.executable, __file__, "--case", m, str(b), str(s), str(c)], capture_output=True,
                             text=True, check=True, env=env).stdout.strip().splitlines()[-1]
        r = json.loads(out)
        print(f"{m:18s} {b:5d} {s:4d} {c:4d} {r['measured'] / 2 ** 20:13.1f} {r['predicted'] / 2 ** 20:14.1f} "
              f"{r['measured'] / r['predicted']:6.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
