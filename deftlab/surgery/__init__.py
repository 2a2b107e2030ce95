"""Model surgery: low-rank modules, in-place replacement by name, DeFT tails folded back, 4-bit storage, selective
loading from safetensors, parameter counts. Saving/loading a decomposed model with its adapter: deftlab.adapters."""

from deftlab.surgery.lowrank import LowRankLinear
from deftlab.surgery.params import count_params
from deftlab.surgery.quantize import (
    check_4bit_support,
    quantize_dense_linears,
    quantize_for_qlora,
    quantize_lowrank,
)
from deftlab.surgery.replace import (
    LoadReport,
    LoraTail,
    build_decomposed_model,
    load_decomposed,
    plan_module,
    replace_linears,
)

__all__ = [
    "LoadReport",
    "LoraTail",
    "LowRankLinear",
    "build_decomposed_model",
    "check_4bit_support",
    "count_params",
    "load_decomposed",
    "plan_module",
    "quantize_dense_linears",
    "quantize_for_qlora",
    "quantize_lowrank",
    "replace_linears",
]
