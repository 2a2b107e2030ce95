"""Bottleneck adapters of LLM-Adapters (Hu et al. 2023): series and parallel, wrapped around a module by name.

    adapter(h) = s · W_up act(W_down h)          W_down: d → b, W_up: b → d_out (no biases)
    series:    y = f(x) + adapter(f(x))          (LLM-Adapters' "output_adapter": after the module)
    parallel:  y = f(x) + adapter(x)             (LLM-Adapters' "parallel_adapter": beside the module)

f is the wrapped module: by default each decoder layer's MLP block (target "mlp"), so a series adapter sits on
the MLP output exactly like LLM-Adapters' output adapter on LLaMA's down_proj. Conventions, with LLM-Adapters'
(peft/src/peft/tuners/bottleneck.py) where they differ:

- no biases, no dropout: its defaults (bias "none", adapter_dropout 0).
- W_up = 0 and W_down as nn.Linear's default (kaiming-uniform, a=√5): its "mam_adapter" init, so the model is
  unchanged at step 0. Its default "bert" init draws both from N(0, 0.02) and moves the model at step 0.
- adapter weights are float32 when the wrapped module is fp16/bf16 (as PEFT keeps adapters), cast back on output.
- its input-side "mh_adapter" (LLaMA series on gate/up_proj) is not implemented.
- placement: its LLaMA parallel command wraps up_proj and down_proj separately, 2b(d+d_ff) weights per layer
  (its 3.54% of LLaMA-7B); bottleneck_targets (up_proj, down_proj) does that. The default "mlp" puts one
  parallel adapter beside the whole MLP (2bd per layer, like the series adapter's 0.99%).

The wrapped module keeps its own parameters (under `<name>.base_layer.`), so dense, rank-reduced or factored
(`LowRankLinear`) MLPs all work; nothing of HF's modeling code is replaced but the module itself.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from deftlab.adapters.config import AdapterConfig
from deftlab.errors import DeftlabError
from deftlab.surgery.lowrank import LowRankLinear

ACTIVATIONS: dict[str, type[nn.Module]] = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


class BottleneckAdapter(nn.Module):
    """`base_layer` plus a series or parallel bottleneck adapter (see the module docstring)."""

    def __init__(self, base_layer: nn.Module, in_features: int, out_features: int, *, kind: str,
                 bottleneck_size: int, scaling: float = 1.0, non_linearity: str = "tanh"):
        super().__init__()
        if kind not in ("series", "parallel"):
            raise DeftlabError(f"unknown bottleneck adapter kind '{kind}'", "use 'series' or 'parallel'")
        if non_linearity not in ACTIVATIONS:
            raise DeftlabError(f"unknown non-linearity '{non_linearity}'", f"use one of {', '.join(ACTIVATIONS)}")
        ref = next((p for p in base_layer.parameters() if p.is_floating_point()), None)
        device = ref.device if ref is not None else None
        dtype = torch.float32 if ref is None or ref.dtype in (torch.float16, torch.bfloat16) else ref.dtype
        self.base_layer = base_layer
        self.kind = kind
        self.scaling = float(scaling)
        self.non_linearity = non_linearity
        d_in = out_features if kind == "series" else in_features
        self.adapter_down = nn.Linear(d_in, bottleneck_size, bias=False, device=device, dtype=dtype)
        self.adapter_act = ACTIVATIONS[non_linearity]()
        self.adapter_up = nn.Linear(bottleneck_size, out_features, bias=False, device=device, dtype=dtype)
        self.reset_adapter()

    @torch.no_grad()
    def reset_adapter(self) -> None:
        nn.init.kaiming_uniform_(self.adapter_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.adapter_up.weight)

    def adapter(self, h: torch.Tensor) -> torch.Tensor:
        """s · W_up act(W_down h), in the adapter's dtype."""
        h = h.to(self.adapter_down.weight.dtype)
        return self.scaling * self.adapter_up(self.adapter_act(self.adapter_down(h)))

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        return out + self.adapter(out if self.kind == "series" else x).to(out.dtype)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, scaling={self.scaling:g}"


def module_features(module: nn.Module) -> tuple[int, int]:
    """(in, out) width of a linear (dense, 4-bit, LowRankLinear) or of a hidden→hidden block such as LlamaMLP."""
    if isinstance(getattr(module, "in_features", None), int) and isinstance(getattr(module, "out_features", None),
                                                                           int):
        return module.in_features, module.out_features
    hidden = getattr(module, "hidden_size", None) or getattr(getattr(module, "config", None), "hidden_size", None)
    if isinstance(hidden, int):
        return hidden, hidden
    raise DeftlabError(f"cannot tell the width of a {type(module).__name__}",
                       "target linears or blocks with a hidden_size (e.g. mlp, down_proj)")


def bottleneck_target_names(model: nn.Module, targets: tuple[str, ...]) -> list[str]:
    """Exact names of the modules whose name is, or ends in '.' + , one of `targets` (LowRankLinear factors never
    match, so target 'v_proj' does not pick `q_proj.v_proj`)."""
    factors = {f"{n}.{c}" for n, m in model.named_modules() if isinstance(m, LowRankLinear)
               for c in ("u_proj", "v_proj")}
    names = [n for n, _ in model.named_modules() if n and n not in factors
             and any(n == t or n.endswith("." + t) for t in targets)]
    if not names:
        raise DeftlabError(f"no module matches bottleneck_targets {list(targets)}", "check module names, e.g. mlp")
    nested = [(a, b) for a in names for b in names if b.startswith(a + ".")]
    if nested:
        raise DeftlabError(f"bottleneck targets overlap: '{nested[0][1]}' lies inside '{nested[0][0]}'",
                           "target either the block (mlp) or its projections, not both")
    return names


def attach_bottleneck(model: nn.Module, cfg: AdapterConfig) -> nn.Module:
    """Freeze `model` and wrap each target module in place with a `BottleneckAdapter`; returns `model`.

    Only the adapters' W_down / W_up train. kind and settings come from `cfg` (kind 'series' or 'parallel').
    """
    if not cfg.uses_bottleneck:
        raise DeftlabError(f"attach_bottleneck needs kind 'series' or 'parallel', got '{cfg.kind}'",
                           "use deftlab.adapters.attach for other kinds")
    cfg.validate()
    names = bottleneck_target_names(model, cfg.bottleneck_targets)
    if any(isinstance(m, BottleneckAdapter) for m in model.modules()):
        raise DeftlabError("the model already has bottleneck adapters", "attach to a freshly built model")
    model.requires_grad_(False)
    for name in names:
        module = model.get_submodule(name)
        d_in, d_out = module_features(module)
        adapter = BottleneckAdapter(module, d_in, d_out, kind=cfg.kind, bottleneck_size=cfg.bottleneck_size,
                                    scaling=cfg.adapter_scaling, non_linearity=cfg.non_linearity)
        model.set_submodule(name, adapter)
    return model
