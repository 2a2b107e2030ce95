"""Paper-sized models with shapes only: the HF architecture of a model config's `arch` on the meta device.

Nothing is downloaded or allocated, so parameter counts (#Params, #Trainable of an adapter) and memory plans for
LLaMA-65B-sized models can be computed and tested offline on any machine.
"""

from __future__ import annotations

import torch
from torch import nn

from deftlab.errors import DeftlabError
from deftlab.models.registry import ModelSpec, get_spec


def meta_model(model: str | ModelSpec) -> nn.Module:
    """The model's HF `*ForCausalLM` built from `spec.arch` under torch.device("meta") (no weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = get_spec(model) if isinstance(model, str) else model
    if not spec.arch:
        raise DeftlabError(f"model config '{spec.name}' has no arch block",
                           f"add the HF config fields (model_type, hidden_size, ...) to configs/models/{spec.name}.yaml")
    arch = dict(spec.arch)
    config = AutoConfig.for_model(arch.pop("model_type"), **arch)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)
