"""Peak memory: build the decomposed model selectively from factors vs "load dense, then replace", in the
checkpoint's precision and in NF4 (QLoRA's storage: each linear quantised as soon as it is loaded vs quantised
after the dense load and the replacement).

A synthetic LLaMA (hidden 1024, 8 layers, 32k vocab, untied, bf16 checkpoint loaded as fp32) is saved once with
rank-40%-of-break-even factors; each mode then runs in a fresh subprocess and reports its peak RSS increase.
Usage: python benchmarks/bench_selective_loading.py [--hidden 1024] [--layers 8]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys
from dataclasses import dataclass
from pathlib import Path
import torch
from safetensors.torch import load_file
from deftlab.decompose.whiten import Decomposition
from deftlab.surgery import count_params, load_decomposed, quantize_for_qlora
from deftlab.surgery.quantize import nf4_finalizer

def rss_mb():
    return int([l for l in open("/proc/self/status") if l.startswith("VmRSS:")][0].split()[1]) / 1024

@dataclass
class Alloc:
    ranks: dict
    factored: dict
    lrc: dict

class LazyDecs(dict):
    def __init__(self, root, names):
        super().__init__(); self.root, self.names = Path(root), set(names)
    def __contains__(self, k):
        return k in self.names
    def __getitem__(self, k):
        t = load_file(str(self.root / f"{k}.safetensors"))
        return Decomposition(U=t["U"], sigma=t["S"], Vt_Sinv=t["V"])

d, mode = Path(sys.argv[1]), sys.argv[2]
ranks = json.loads((d / "alloc.json").read_text())
alloc = Alloc(ranks, {n: True for n in ranks}, {n: False for n in ranks})
from deftlab.train.memory import RssSampler, anon_rss
base = rss_mb()
anon_base = anon_rss()
nf4 = mode.endswith("nf4")
sampler = RssSampler(probe=anon_rss).__enter__()
model, _ = load_decomposed(d / "ckpt_bf16", alloc, LazyDecs(d / "decs", ranks), selective=mode.startswith("selective"),
                           dtype=torch.float32, finalize=nf4_finalizer() if nf4 and mode.startswith("selective") else None)
if nf4 and mode.startswith("dense"):
    quantize_for_qlora(model)
sampler.__exit__(None, None, None)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"mode": mode, "peak_increase_mb": round(peak - base), "params": count_params(model)["total"],
                  "anon_peak_increase_mb": round((sampler.peak - anon_base) / 2**20)}))
"""


def setup(d: Path, hidden: int, layers: int) -> None:
    import torch
    from safetensors.torch import save_file

    from deftlab.models.tiny import tiny_llama

    (d / "decs").mkdir(parents=True)
    m = tiny_llama(vocab_size=32000, hidden_size=hidden, intermediate_size=int(hidden * 2.75),
                   num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=16, tie_word_embeddings=False)
    m.to(torch.bfloat16).save_pretrained(d / "ckpt_bf16")
    m.float()
    ranks = {}
    for n, lin in m.named_modules():
        if isinstance(lin, torch.nn.Linear) and ".layers." in n:
            o, i = lin.weight.shape
            k = int(0.4 * o * i / (o + i))
            U, S, Vh = torch.linalg.svd(lin.weight.detach(), full_matrices=False)
            save_file({"U": U[:, :k].contiguous(), "S": S[:k].double(), "V": Vh[:k].contiguous()},
                      str(d / "decs" / f"{n}.safetensors"))
            ranks[n] = k
    (d / "alloc.json").write_text(json.dumps(ranks))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        setup(d, args.hidden, args.layers)
        res = {}
        for mode in ("selective", "dense", "selective-nf4", "dense-nf4"):
            out = subprocess.run([sys.executable, "-c", CHILD, str(d), mode], capture_output=True, text=True,
                                 check=True).stdout.strip().splitlines()[-1]
            res[mode] = json.loads(out)
    print(f"synthetic LLaMA hidden {args.hidden}, {args.layers} layers, bf16 checkpoint loaded as fp32; "
          f"{res['selective']['params']:,} params after decomposition")
    # anonymous memory is what the process needs; the whole RSS also counts the checkpoint's memory-mapped
    # pages while a file is open (page cache, reclaimable)
    for suffix, what in (("", "fp32"), ("-nf4", "NF4")):
        for key, kind in (("anon_peak_increase_mb", "anonymous"), ("peak_increase_mb", "whole RSS")):
            sel, dense = res["selective" + suffix][key], res["dense" + suffix][key]
            print(f"{what}, {kind} peak: selective +{sel} MB; load dense, then replace +{dense} MB; "
                  f"ratio {sel / dense:.2f}")


if __name__ == "__main__":
    main()
