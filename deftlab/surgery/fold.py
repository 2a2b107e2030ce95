"""Fold DeFT tails back into frozen weights, for the matrices a LoRA does not target."""

from __future__ import annotations

import torch

from deftlab.errors import DeftlabError
from deftlab.surgery.lowrank import LowRankLinear
from deftlab.surgery.replace import get_parent, with_tail


@torch.no_grad()
def fold_tails(model: torch.nn.Module, tails: dict) -> list[str]:
    """Put DeFT tails back into the frozen weights of modules the LoRA does not target; returns their names.

    The decomposition hands every reduced matrix its r tail components for the LoRA, but the adapter may target
    only some projections (LLM-Adapters: q, k, v, up, down). Without this, the others would lose those
    components; folding keeps every matrix at exactly its allocated rank θ (frozen).
    """
    folded = []
    for name, tail in tails.items():
        parent, attr = get_parent(model, name)
        module = getattr(parent, attr)
        if isinstance(module, LowRankLinear):
            W_u, W_v = with_tail((module.u_proj.weight, module.v_proj.weight), tail)
            bias = module.u_proj.bias
            new = LowRankLinear.from_factors(W_u, W_v, bias, requires_grad=module.u_proj.weight.requires_grad)
            setattr(parent, attr, new)
        elif isinstance(module, torch.nn.Linear):
            module.weight.copy_(with_tail(module.weight, tail))
        else:
            raise DeftlabError(f"cannot fold a DeFT tail into '{name}' ({type(module).__name__})")
        folded.append(name)
    return folded
