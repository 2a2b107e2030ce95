"""A model at a real architecture's shapes with random weights, built block by block straight into its final
storage (NF4 or the compute dtype): no checkpoint, no download, and never the dense model in memory.

For memory and speed measurements at paper scale (LLaMA-65B's shapes on one GPU; `tools/gpu_check.py`): the
skeleton is built on the meta device, then each target linear is created on the device (dense, or as DeFT's
`LowRankLinear` at the kept fraction) and quantised at once, so the peak is the finished model plus one dense
weight. DeFT's ranks here are uniform: every target keeps the same fraction of its parameters, k = ⌊f·mn/(m+n)⌋,
so the parameter count (what memory depends on) is the budget's, not a searched allocation.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from deftlab.decompose.targets import DEFAULT_TARGETS
from deftlab.surgery.lowrank import LowRankLinear
from deftlab.surgery.quantize import to_linear4bit
from deftlab.surgery.replace import get_parent

INIT_STD = 0.02  # HF's initializer_range default


def _random(shape, device, dtype, gen) -> torch.Tensor:
    return torch.empty(*shape, device=device, dtype=dtype).normal_(0.0, INIT_STD, generator=gen)


def _fill(module: nn.Module, device, dtype, gen) -> None:
    """Real tensors for a meta module's own parameters and buffers: norms' weights 1, biases 0, others random."""
    for name, p in list(module.named_parameters(recurse=False)):
        if name == "bias":
            t = torch.zeros(p.shape, device=device, dtype=dtype)
        elif p.ndim == 1:
            t = torch.ones(p.shape, device=device, dtype=dtype)
        else:
            t = _random(p.shape, device, dtype, gen)
        setattr(module, name, nn.Parameter(t, requires_grad=False))


def synthetic_model(arch: Mapping[str, Any], *, keep_linears: float | None = None, device="cpu",
                    dtype: torch.dtype = torch.float32, quantize: bool = False, seed: int = 0,
                    targets=DEFAULT_TARGETS) -> nn.Module:
    """The HF causal LM of `arch` (config.json fields, with model_type) with random frozen weights.

    keep_linears: DeFT's kept fraction of every target linear's parameters (None: dense). quantize: NF4
    (bitsandbytes) for every target linear or factor, as QLoRA stores them; the embeddings, norms and LM head stay
    in `dtype`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(arch)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, mod in list(model.named_modules()):
        last = name.rsplit(".", 1)[-1]
        if isinstance(mod, nn.Linear) and last in targets and ".layers." in f".{name}.":
            m, n, bias = mod.out_features, mod.in_features, mod.bias is not None
            k = None if keep_linears is None else int(keep_linears * m * n / (m + n))
            if k is None or k >= min(m, n):  # dense (also where the factors would not save anything)
                new: nn.Module = nn.Linear(n, m, bias=bias, device=device, dtype=dtype)
                new.weight = nn.Parameter(_random((m, n), device, dtype, gen), requires_grad=False)
                if quantize:
                    new = to_linear4bit(new)
            else:
                new = LowRankLinear(n, m, k, bias=bias, device=device, dtype=dtype)
                new.v_proj.weight = nn.Parameter(_random((k, n), device, dtype, gen), requires_grad=False)
                new.u_proj.weight = nn.Parameter(_random((m, k), device, dtype, gen), requires_grad=False)
                if quantize:
                    new.v_proj, new.u_proj = to_linear4bit(new.v_proj), to_linear4bit(new.u_proj)
            if bias:
                target = new.u_proj if isinstance(new, LowRankLinear) else new
                target.bias = nn.Parameter(torch.zeros(m, device=device, dtype=dtype), requires_grad=False)
            parent, attr = get_parent(model, name)
            setattr(parent, attr, new)
        elif "rotary" in last:
            parent, attr = get_parent(model, name)
            with torch.device(device):
                setattr(parent, attr, type(mod)(config=config))
    for mod in model.modules():  # everything still on meta: embeddings, norms, LM head, other linears
        if any(p.is_meta for p in mod.parameters(recurse=False)):
            _fill(mod, device, dtype, gen)
    if config.tie_word_embeddings:
        model.tie_weights()
    if quantize:
        model.is_loaded_in_4bit = True  # as HF marks bnb-4bit models; PEFT wraps Linear4bit targets accordingly
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"synthetic_model left tensors on meta: {left[:3]}")
    return model.eval()
