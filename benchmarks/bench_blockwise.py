"""Peak memory of calibration: block by block from the checkpoint vs today's whole-model pass.

Whole-model: the model loaded from its safetensors checkpoint, then `collect_statistics` (every Gram resident).
Block by block: a meta skeleton, `collect_statistics_blockwise(reader=...)` with each block's Grams written to
disk as they finish (the "stored for reuse" mode), so one block, one block's Grams and the hidden states are
resident. Each case runs in a fresh process; the peak RSS above a warm baseline is reported, and the ratio.

Models: SmolLM2-135M's converted checkpoint (real weights), and synthetic LLaMAs 1024 wide with 8 and 16 blocks
(random weights, saved once to a temporary directory): the block-by-block peak must not grow with depth.

    python benchmarks/bench_blockwise.py [--n 64] [--seq 256]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if (ROOT / "deftlab").is_dir():
    sys.path.insert(0, str(ROOT))


def _synthetic(out: Path, layers: int) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    d = out / f"synthetic-1024x{layers}"
    if not (d / "config.json").is_file():
        torch.manual_seed(0)
        cfg = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=layers, num_attention_heads=16,
                          num_key_value_heads=16, vocab_size=32000, max_position_embeddings=2048)
        LlamaForCausalLM(cfg).save_pretrained(d, safe_serialization=True)
    return d


def measure(ckpt: str, mode: str, n: int, seq: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from deftlab.decompose.blockwise import ShardReader, collect_statistics_blockwise, skeleton_from_checkpoint
    from deftlab.decompose.calibration import collect_statistics
    from deftlab.models.tiny import tiny_llama
    from deftlab.train.memory import RssSampler, current_rss, release_free_memory

    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(3, 30000, (4, seq), generator=g),
                "attention_mask": torch.ones(4, seq, dtype=torch.long)} for _ in range(n // 4)]
    warm = tiny_llama(num_hidden_layers=1)  # imports, kernels and thread pools, before the baseline
    small = [{"input_ids": torch.randint(3, 128, (4, 16), generator=g)}]
    collect_statistics(warm, small, progress=False)
    collect_statistics_blockwise(warm, small, progress=False)
    del warm
    release_free_memory()
    base = current_rss()
    with tempfile.TemporaryDirectory() as tmp, RssSampler() as rss:
        if mode == "whole":
            model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
            stats = collect_statistics(model, batches, progress=False)
        else:
            def store(i, block_stats):  # each block's Grams go to disk as soon as they are finished
                block_stats.save(Path(tmp) / f"block{i}")

            stats = collect_statistics_blockwise(skeleton_from_checkpoint(ckpt), batches,
                                                 reader=ShardReader(ckpt), on_block=store, keep_grams=False,
                                                 progress=False)
    return {"peak": rss.peak - base, "tokens": stats.tokens}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=64, help="calibration sequences (default 64)")
    ap.add_argument("--seq", type=int, default=256, help="tokens per sequence (default 256)")
    ap.add_argument("--case", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.case:
        print(json.dumps(measure(args.case[0], args.case[1], args.n, args.seq)))
        return 0
    from deftlab.models.loading import ensure_checkpoint
    from deftlab.models.registry import get_spec

    tmp = Path(tempfile.gettempdir()) / "deftlab-bench-blockwise"
    cases = [("SmolLM2-135M (30 blocks)", str(ensure_checkpoint(get_spec("smollm2-135m")))),
             ("synthetic 1024 wide, 8 blocks", str(_synthetic(tmp, 8))),
             ("synthetic 1024 wide, 16 blocks", str(_synthetic(tmp, 16)))]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    print(f"calibration: {args.n} sequences × {args.seq} tokens, batch 4; peak RSS above a warm baseline")
    print(f"{'model':32s} {'whole MiB':>10s} {'blocks MiB':>11s} {'ratio':>6s}")
    for label, ckpt in cases:
        peaks = {}
        for mode in ("whole", "blockwise"):
            out = subprocess.run([sys.executable, __file__, "--n", str(args.n), "--seq", str(args.seq), "--case",
                                  ckpt, mode], capture_output=True, text=True, check=True, env=env)
            peaks[mode] = json.loads(out.stdout.strip().splitlines()[-1])["peak"]
        print(f"{label:32s} {peaks['whole'] / 2 ** 20:10.1f} {peaks['blockwise'] / 2 ** 20:11.1f} "
              f"{peaks['blockwise'] / peaks['whole']:6.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
