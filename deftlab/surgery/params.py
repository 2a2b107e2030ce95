"""Exact parameter accounting: the papers' "#Params" (after decomposition) and "#Trainable".

Conventions (state them next to any number we report):
- Every parameter is counted once, so a tied LM head adds nothing (HF `num_parameters` does the same).
- A bitsandbytes 4-bit weight (`Params4bit`) counts as its *logical* element count (the shape it was quantised
  from, out×in), not its packed uint8 storage (out·in/2 bytes) and not its quantisation constants; so the count
  is the same before and after quantisation. Memory is a separate measurement.
- `decoder_linear` is the DeFT/SVD-LLM/WeLore denominator: the q,k,v,o,gate,up,down projections only (dense or
  factored), no embeddings, norms, LM head, LoRA or bottleneck adapters.
"""

from __future__ import annotations

import math

from torch import nn

from deftlab.surgery.lowrank import LowRankLinear

KINDS = ("embedding", "lm_head", "norm", "dense_linear", "lowrank_factor", "lora", "adapter", "other")


def logical_numel(param: nn.Parameter) -> int:
    """Element count of the tensor a parameter represents (unpacked for bitsandbytes 4-bit)."""
    if type(param).__name__ == "Params4bit" and getattr(param, "bnb_quantized", False):
        return math.prod(param.quant_state.shape)
    return param.numel()


def _kind(module_name: str, module: nn.Module, param_name: str, lowrank_prefixes: tuple[str, ...]) -> str:
    full = f"{module_name}.{param_name}" if module_name else param_name
    if "lora_" in full:
        return "lora"
    if module_name.rsplit(".", 1)[-1].startswith("adapter_"):  # bottleneck adapters' W_down/W_up: not decoder linears
        return "adapter"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if module_name == "lm_head" or module_name.endswith(".lm_head"):
        return "lm_head"
    if any(module_name.startswith(p) for p in lowrank_prefixes):
        return "lowrank_factor"
    if isinstance(module, nn.Linear):  # includes bnb Linear4bit
        return "dense_linear"
    if "norm" in type(module).__name__.lower():
        return "norm"
    return "other"


def count_params(model: nn.Module) -> dict:
    """{'total', 'trainable', 'decoder_linear', 'by_kind': {kind: {'total', 'trainable'}}} — exact integers."""
    lowrank_prefixes = tuple(f"{n}." for n, m in model.named_modules() if isinstance(m, LowRankLinear))
    by_kind = {k: {"total": 0, "trainable": 0} for k in KINDS}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            n = logical_numel(param)
            kind = _kind(module_name, module, param_name, lowrank_prefixes)
            by_kind[kind]["total"] += n
            if param.requires_grad:
                by_kind[kind]["trainable"] += n
    total = sum(v["total"] for v in by_kind.values())
    trainable = sum(v["trainable"] for v in by_kind.values())
    decoder = by_kind["dense_linear"]["total"] + by_kind["lowrank_factor"]["total"]
    return {"total": total, "trainable": trainable, "decoder_linear": decoder, "by_kind": by_kind}
