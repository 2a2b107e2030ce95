"""A decoder-only model's shapes from its HF config.json fields: the linears of one block, which of them share an
input (one Gram each), and the parameter counts of every part. No weights and no torch.

Families: LLaMA-style (llama, mistral, qwen2, qwen3: gated MLP, RMSNorm, no biases except Qwen2's q/k/v) and OPT
(fc1/fc2 MLP, LayerNorm with bias, learned positions, biases everywhere).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from deftlab.errors import DeftlabError

LLAMA_TYPES = ("llama", "mistral", "qwen2", "qwen3")
OPT_TYPES = ("opt",)


@dataclass(frozen=True)
class Linear:
    name: str          # the module name's last part, e.g. "q_proj"
    out_features: int  # m
    in_features: int   # n
    group: str         # linears with the same group read the same input (one Gram)
    bias: bool = False

    @property
    def params(self) -> int:
        return self.out_features * self.in_features + (self.out_features if self.bias else 0)


@dataclass(frozen=True)
class Architecture:
    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    qkv_bias: bool = False
    qk_norm: bool = False          # Qwen3: RMSNorm over each head of q and k
    positions: int = 0             # OPT's learned position table (max_position_embeddings + 2 rows)
    embed_dim: int | None = None   # OPT's word_embed_proj_dim when it differs from hidden

    @property
    def family(self) -> str:
        return "opt" if self.model_type in OPT_TYPES else "llama"

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    def block_linears(self) -> tuple[Linear, ...]:
        d, f = self.hidden, self.intermediate
        if self.family == "opt":
            return (Linear("q_proj", d, d, "attn_in", True), Linear("k_proj", d, d, "attn_in", True),
                    Linear("v_proj", d, d, "attn_in", True), Linear("out_proj", d, d, "o_in", True),
                    Linear("fc1", f, d, "mlp_in", True), Linear("fc2", d, f, "down_in", True))
        b = self.qkv_bias
        return (Linear("q_proj", self.q_width, d, "attn_in", b), Linear("k_proj", self.kv_width, d, "attn_in", b),
                Linear("v_proj", self.kv_width, d, "attn_in", b), Linear("o_proj", d, self.q_width, "o_in"),
                Linear("gate_proj", f, d, "mlp_in"), Linear("up_proj", f, d, "mlp_in"),
                Linear("down_proj", d, f, "down_in"))

    def gram_widths(self) -> dict[str, int]:
        """Input width of each Gram of one block (group -> n)."""
        return {lin.group: lin.in_features for lin in self.block_linears()}

    def block_linear_params(self) -> int:
        return sum(lin.params for lin in self.block_linears())

    def block_other_params(self) -> int:
        """Norms of one block (OPT: LayerNorm weight and bias)."""
        if self.family == "opt":
            return 2 * 2 * self.hidden
        return 2 * self.hidden + (2 * self.head_dim if self.qk_norm else 0)

    def embed_params(self) -> int:
        """Token embeddings, and OPT's position table and input/output projections."""
        if self.family == "opt":
            e = self.embed_dim or self.hidden
            proj = 2 * e * self.hidden if e != self.hidden else 0
            return self.vocab * e + self.positions * self.hidden + proj
        return self.vocab * self.hidden

    def head_params(self) -> int:
        """The LM head's own weights (0 when tied to the embeddings)."""
        return 0 if self.tied else self.vocab * (self.embed_dim or self.hidden)

    def final_norm_params(self) -> int:
        return 2 * self.hidden if self.family == "opt" else self.hidden

    def linear_params(self) -> int:
        """All decoder linears: what DeFT and WeLore decompose."""
        return self.layers * self.block_linear_params()

    def total_params(self) -> int:
        return (self.embed_params() + self.head_params() + self.final_norm_params()
                + self.layers * (self.block_linear_params() + self.block_other_params()))


def _need(config: Mapping[str, Any], key: str, where: str) -> Any:
    if config.get(key) is None:
        raise DeftlabError(f"{where}: config has no '{key}'", "pass the model's HF config.json (or a config name)")
    return config[key]


def from_hf_config(config: Mapping[str, Any], where: str = "config") -> Architecture:
    """The shapes of a config.json dict (HF field names and defaults)."""
    model_type = config.get("model_type")
    d = int(_need(config, "hidden_size", where))
    layers = int(_need(config, "num_hidden_layers", where))
    heads = int(_need(config, "num_attention_heads", where))
    vocab = int(_need(config, "vocab_size", where))
    if model_type in OPT_TYPES:
        proj = config.get("word_embed_proj_dim")
        return Architecture(model_type, d, int(_need(config, "ffn_dim", where)), layers, heads, heads, d // heads,
                            vocab, tied=bool(config.get("tie_word_embeddings", True)),
                            positions=int(config.get("max_position_embeddings", 2048)) + 2,
                            embed_dim=int(proj) if proj and int(proj) != d else None)
    if model_type not in LLAMA_TYPES:
        raise DeftlabError(f"{where}: model_type {model_type!r} is not one the planner knows",
                           f"use one of {', '.join(LLAMA_TYPES + OPT_TYPES)}")
    return Architecture(model_type, d, int(_need(config, "intermediate_size", where)), layers, heads,
                        int(config.get("num_key_value_heads") or heads),
                        int(config.get("head_dim") or d // heads), vocab,
                        tied=bool(config.get("tie_word_embeddings", False)),
                        qkv_bias=model_type == "qwen2", qk_norm=model_type == "qwen3")


def arch_fields(model: str) -> tuple[dict[str, Any], str]:
    """(HF config.json fields, where they came from) of a model config name with an `arch` block
    (configs/models), a directory holding config.json, or the path of a config.json."""
    path = Path(model)
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise DeftlabError(f"{path.parent} holds no config.json", "pass a model directory with its HF config.json")
    if path.is_file():
        try:
            return json.loads(path.read_text()), str(path)
        except json.JSONDecodeError as e:
            raise DeftlabError(f"{path} is not valid JSON ({e})", "pass the model's HF config.json") from None
    from deftlab.models.registry import get_spec

    spec = get_spec(model)
    if not spec.arch:
        raise DeftlabError(f"model config '{spec.name}' has no arch block",
                           f"add the HF config fields to configs/models/{spec.name}.yaml, or pass a config.json")
    return dict(spec.arch), f"configs/models/{spec.name}.yaml"


def load_architecture(model: str) -> Architecture:
    """The shapes of `model` (as `arch_fields` finds them)."""
    return from_hf_config(*arch_fields(model))
