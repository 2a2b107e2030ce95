"""deftlab plan MODEL: the peak memory of each phase of a run (calibration, decomposition, fine-tuning with and
without gradient checkpointing) predicted from the model's config.json alone, whether it fits a device, and the
largest batch that does. No weights are read (deftlab.planner)."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, replace

from deftlab.errors import DeftlabError

UNITS = {"": 1, "b": 1, "k": 10 ** 3, "kb": 10 ** 3, "kib": 2 ** 10, "m": 10 ** 6, "mb": 10 ** 6, "mib": 2 ** 20,
         "g": 2 ** 30, "gb": 10 ** 9, "gib": 2 ** 30, "t": 2 ** 40, "tb": 10 ** 12, "tib": 2 ** 40}


def parse_size(text: str) -> float:
    """'24GiB', '24GB' (10⁹), '24G' (GiB), '80000MiB' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in UNITS:
        raise DeftlabError(f"--device-mem {text!r} is not a size", "write it like 24GiB, 24GB or 80000MiB")
    return float(m.group(1)) * UNITS[m.group(2).lower()]


def add_parser(sub, name):
    p = sub.add_parser(name, help="predict each phase's peak memory from a model's config.json",
                       description="Predict the peak memory of calibration, decomposition and fine-tuning from the "
                                   "model's shapes alone (a config name with an arch block, a model directory or "
                                   "a config.json), say whether it fits --device-mem and the largest batch that does.")
    p.add_argument("model", help="config name (e.g. llama-65b), model directory or config.json")
    p.add_argument("--keep", type=float, default=None, help="DeFT budget: fraction kept (default: dense)")
    p.add_argument("--keep-of", choices=("model", "linears"), default="model",
                   help="what --keep is a fraction of (default: the whole model, as the DeFT paper counts)")
    p.add_argument("--adapter", choices=("qlora", "lora", "full"), default="qlora")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=256, help="tokens per training sequence (default 256)")
    p.add_argument("--lora-r", type=int, default=32)
    p.add_argument("--compute", choices=("bf16", "fp16", "fp32"), default="bf16",
                   help="compute dtype (default bf16; CPU runs use fp32)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--adapter-dtype", choices=("fp32", "bf16"), default="fp32",
                   help="LoRA weights' dtype (deftlab/PEFT: fp32; QLoRA's own script: bf16)")
    p.add_argument("--optimizer", choices=("adamw", "paged_adamw", "adamw_8bit", "paged_adamw_8bit"),
                   default="adamw", help="as `deftlab finetune --optimizer`; paged states are counted off the device")
    p.add_argument("--device-mem", default=None, help="device memory to fit, e.g. 24GiB, 24GB, 80000MiB")
    p.add_argument("--calib-n", type=int, default=256, help="calibration sequences (default 256)")
    p.add_argument("--calib-batch", type=int, default=4, help="calibration batch (default 4)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    return p


def _gib(x: float) -> str:
    return f"{x / 2 ** 30:9.2f}"


def run(args) -> int:
    from deftlab.planner.architecture import load_architecture
    from deftlab.planner.memory import (TrainSetup, calibration_phase, decomposition_phase, finetune_phase,
                                        kept_linear_fraction, largest_batch)

    arch = load_architecture(args.model)
    setup = TrainSetup(args.adapter, args.batch_size, args.seq_len, keep=args.keep, keep_of=args.keep_of,
                       lora_r=args.lora_r, compute=args.compute, device=args.device, adapter_dtype=args.adapter_dtype,
                       optimizer=args.optimizer)
    setup.validate()
    device_bytes = parse_size(args.device_mem) if args.device_mem else None
    calib = dict(n_samples=args.calib_n, seq_len=args.seq_len, batch_size=args.calib_batch, dtype=args.compute)
    phases = [calibration_phase(arch, **calib), calibration_phase(arch, block_sequential=True, **calib),
              decomposition_phase(arch, dtype=args.compute),
              decomposition_phase(arch, block_sequential=True, dtype=args.compute)]
    if args.keep is None:
        phases = []  # a dense run has no calibration or decomposition
    tunes = []
    for ckpt in (False, True):
        ph = finetune_phase(arch, replace(setup, grad_ckpt=ckpt))
        ph.name += " (gradient checkpointing)" if ckpt else " (no checkpointing)"
        tunes.append((ckpt, ph))
    phases += [ph for _, ph in tunes]
    fits = {ckpt: (largest_batch(arch, replace(setup, grad_ckpt=ckpt), device_bytes) if device_bytes else None)
            for ckpt, _ in tunes}
    if args.json:
        print(json.dumps({"model": args.model, "architecture": asdict(arch), "setup": asdict(setup),
                          "params_total": arch.total_params(), "params_linears": arch.linear_params(),
                          "phases": [{"name": p.name, "total_bytes": p.total, "parts": p.parts} for p in phases],
                          "device_bytes": device_bytes,
                          "largest_batch": {("checkpointing" if k else "no_checkpointing"): v
                                            for k, v in fits.items()}}, indent=2))
        return 0
    what = f"{args.adapter.upper() if args.adapter == 'qlora' else args.adapter}"
    if args.keep is not None:
        lin = kept_linear_fraction(arch, args.keep, args.keep_of)
        what += f" + DeFT keeping {args.keep:g} of the {args.keep_of} (linears keep {lin:.3f})"
    print(f"deftlab plan {args.model}: {arch.total_params() / 1e9:.2f}B parameters; {what}; batch "
          f"{args.batch_size} × {args.seq_len} tokens; {args.compute} on {args.device}")
    print(f"{'phase / part':58s} {'GiB':>9s}")
    for ph in phases:
        print(f"{ph.name:58s} {_gib(ph.total)}")
        for k, v in ph.parts.items():
            print(f"  {k:56s} {_gib(v)}")
    if device_bytes:
        for ckpt, ph in tunes:
            b = fits[ckpt]
            how = "with gradient checkpointing" if ckpt else "without checkpointing"
            verdict = "fits" if ph.total <= device_bytes else "does not fit"
            print(f"fine-tuning {how}: {verdict} in {args.device_mem}; largest batch that fits: {b}")
    print("Not counted: the CUDA context and allocator fragmentation (torch's max_memory_allocated excludes both).")
    return 0
