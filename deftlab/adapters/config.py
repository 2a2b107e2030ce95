"""`AdapterConfig`: which fine-tuning method runs on a (dense or decomposed) model."""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass, fields
from typing import Literal

from deftlab.config import ConfigError, from_dict

AdapterKind = Literal["none", "lora", "qlora", "loftq", "dora", "full", "lrc", "series", "parallel"]
LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_KINDS = ("lora", "qlora", "loftq", "dora")
BOTTLENECK_KINDS = ("series", "parallel")
NonLinearity = Literal["tanh", "relu", "gelu", "silu"]
BOTTLENECK_FIELDS = ("bottleneck_size", "adapter_scaling", "non_linearity", "bottleneck_targets")


@dataclass
class AdapterConfig:
    """kind: none (frozen) | lora | qlora (NF4 base + LoRA) | loftq (LoftQ init; PEFT's on CUDA)
    | dora (PEFT's DoRA: LoRA on the direction plus a trained magnitude per output; dense linears only)
    | full (everything trainable) | lrc (WeLore: only the factors of low-rank components train)
    | series / parallel (LLM-Adapters' bottleneck adapters, deftlab.adapters.bottleneck).

    r, alpha: LoRA rank and alpha; scaling s = alpha / r (PEFT, no rslora). dropout: LoRA dropout.
    target_modules: module-name suffixes to adapt (matched to exact names; factor children never match).
    init: "deft" copies the decomposition tail into the LoRA (needs tails from build_decomposed_model);
    "vanilla" freezes all θ components and uses PEFT's init (kaiming A, B = 0).
    train_norms (lrc only): WeLore's fine-tuning scripts leave RMSNorm weights trainable; we freeze them by
    default so "#Trainable" is exactly the LRC factors. Set True to follow WeLore's code.
    loftq_iter: alternating quantise/SVD iterations for kind loftq.
    bottleneck_size, adapter_scaling, non_linearity, bottleneck_targets (series/parallel only): the adapter's
    width, the scalar s on its output, its activation and the module-name suffixes it wraps. Defaults follow
    LLM-Adapters' BottleneckConfig (256, 1.0, tanh); target "mlp" wraps each decoder layer's MLP block.
    """

    kind: AdapterKind
    r: int = 32
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] = LLAMA_PROJECTIONS
    init: Literal["deft", "vanilla"] = "deft"
    train_norms: bool = False
    loftq_iter: int = 1
    bottleneck_size: int = 256
    adapter_scaling: float = 1.0
    non_linearity: NonLinearity = "tanh"
    bottleneck_targets: tuple[str, ...] = ("mlp",)

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    @property
    def uses_lora(self) -> bool:
        return self.kind in LORA_KINDS

    @property
    def uses_bottleneck(self) -> bool:
        return self.kind in BOTTLENECK_KINDS

    def validate(self) -> None:
        if self.uses_lora:
            if self.r < 1:
                raise ConfigError(f"AdapterConfig.r: {self.r} < 1", "use a positive LoRA rank")
            if self.alpha <= 0:
                raise ConfigError(f"AdapterConfig.alpha: {self.alpha} <= 0", "use a positive alpha")
            if not self.target_modules:
                raise ConfigError("AdapterConfig.target_modules is empty", "name at least one projection")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"AdapterConfig.dropout: {self.dropout} not in [0, 1)", "use e.g. 0.05")
        if self.loftq_iter < 1:
            raise ConfigError(f"AdapterConfig.loftq_iter: {self.loftq_iter} < 1", "use 1 or more")
        if self.train_norms and self.kind != "lrc":
            raise ConfigError("AdapterConfig.train_norms only applies to kind 'lrc'", "remove it or use kind 'lrc'")
        self._validate_bottleneck()

    def _validate_bottleneck(self) -> None:
        if not self.uses_bottleneck:
            changed = [f.name for f in fields(self) if f.name in BOTTLENECK_FIELDS
                       and _plain(getattr(self, f.name)) != _plain(f.default)]
            if changed:
                raise ConfigError(f"AdapterConfig.{changed[0]} only applies to kinds 'series'/'parallel' "
                                  f"(kind is '{self.kind}')", "remove it or use kind 'series' or 'parallel'")
            return
        if self.bottleneck_size < 1:
            raise ConfigError(f"AdapterConfig.bottleneck_size: {self.bottleneck_size} < 1",
                              "use a positive bottleneck width (LLM-Adapters: 256)")
        if not (math.isfinite(self.adapter_scaling) and self.adapter_scaling > 0):
            raise ConfigError(f"AdapterConfig.adapter_scaling: {self.adapter_scaling} is not a positive number",
                              "use e.g. 1.0 (LLM-Adapters' default)")
        if self.non_linearity not in typing.get_args(NonLinearity):
            raise ConfigError(f"AdapterConfig.non_linearity: unknown '{self.non_linearity}'",
                              f"use one of {', '.join(typing.get_args(NonLinearity))}")
        if not self.bottleneck_targets:
            raise ConfigError("AdapterConfig.bottleneck_targets is empty", "name at least one module, e.g. mlp")

    @classmethod
    def from_dict(cls, data: dict) -> "AdapterConfig":
        return from_dict(cls, data)


def _plain(value):
    return tuple(value) if isinstance(value, list) else value
