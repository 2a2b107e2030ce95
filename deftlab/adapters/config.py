"""`AdapterConfig`: which fine-tuning method runs on a (dense or decomposed) model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from deftlab.config import ConfigError, from_dict

AdapterKind = Literal["none", "lora", "qlora", "loftq", "full", "lrc"]
LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_KINDS = ("lora", "qlora", "loftq")


@dataclass
class AdapterConfig:
    """kind: none (frozen) | lora | qlora (NF4 base + LoRA) | loftq (LoftQ init; PEFT's on CUDA)
    | full (everything trainable) | lrc (WeLore: only the factors of low-rank components train).

    r, alpha: LoRA rank and alpha; scaling s = alpha / r (PEFT, no rslora). dropout: LoRA dropout.
    target_modules: module-name suffixes to adapt (matched to exact names; factor children never match).
    init: "deft" copies the decomposition tail into the LoRA (needs tails from build_decomposed_model);
    "vanilla" freezes all θ components and uses PEFT's init (kaiming A, B = 0).
    train_norms (lrc only): WeLore's fine-tuning scripts leave RMSNorm weights trainable; we freeze them by
    default so "#Trainable" is exactly the LRC factors. Set True to follow WeLore's code.
    loftq_iter: alternating quantise/SVD iterations for kind loftq.
    """

    kind: AdapterKind
    r: int = 32
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] = LLAMA_PROJECTIONS
    init: Literal["deft", "vanilla"] = "deft"
    train_norms: bool = False
    loftq_iter: int = 1

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    @property
    def uses_lora(self) -> bool:
        return self.kind in LORA_KINDS

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

    @classmethod
    def from_dict(cls, data: dict) -> "AdapterConfig":
        return from_dict(cls, data)
