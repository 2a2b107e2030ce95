"""Which linear layers are decomposed: q, k, v, o, gate, up, down of every block by default."""

from __future__ import annotations

import re

import torch

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_LAYER = re.compile(r"\.layers\.(\d+)\.")


def layer_index(name: str) -> int:
    m = _LAYER.search("." + name)
    return int(m.group(1)) if m else -1


def target_linears(model: torch.nn.Module, targets=DEFAULT_TARGETS) -> dict[str, torch.nn.Linear]:
    """name → nn.Linear for every linear inside a decoder block whose last name part is in `targets`."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets and layer_index(name) >= 0:
            out[name] = mod
    return out
