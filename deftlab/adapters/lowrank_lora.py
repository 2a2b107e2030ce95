"""PEFT LoRA on a `LowRankLinear`: one rank-r update of the whole decomposed map.

    y = u_proj(v_proj(x)) + s · B (A dropout(x)),   ΔW = s·B A  (out × in),  s = α / r.

This is a PEFT `LoraLayer` (a subclass of PEFT's own LoRA `Linear`), plugged in with PEFT's experimental
`LoraConfig._register_custom_module({LowRankLinear: LowRankLoraLinear})`, so `get_peft_model`, adapter
saving/loading, `merge_and_unload`, `disable_adapter()` and multi-adapter switching all work. The forward,
dropout, scaling, init and `get_delta_weight` are PEFT's; we override only what needs the base weight:

- in/out features, device and dtype come from the factors (a `LowRankLinear` has no `.weight`),
- merge is concatenation, which keeps the module low-rank: W_u' = [W_u, s·B], W_v' = [W_v; A]. With DeFT init
  this is again the θ kept components (θ−r frozen + r trained). 4-bit factors are dequantised to merge;
  unmerge restores the original factor modules exactly.

Weight-based inits (pissa, corda, olora, loftq, ...), DoRA and other variants, fan_in_fan_out and lora_bias are
rejected: they need a dense base weight. The mapping is not saved in adapter_config.json, so use
`deftlab.adapters.load_adapter` (it registers it again) rather than bare `PeftModel.from_pretrained`.
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from torch import nn

from deftlab.errors import DeftlabError
from deftlab.surgery.lowrank import LowRankLinear
from deftlab.surgery.quantize import is_4bit

_SUPPORTED_INITS = (True, False, "gaussian")


class LowRankLoraLinear(PeftLoraLinear):
    def __init__(self, base_layer: nn.Module, adapter_name: str, config: Any, r: int = 0, lora_alpha: int = 1,
                 **kwargs: Any) -> None:
        if config.init_lora_weights not in _SUPPORTED_INITS:
            raise DeftlabError(
                f"LoRA init '{config.init_lora_weights}' needs a dense weight; LowRankLinear has factors",
                "use init_lora_weights=True (deftlab's DeFT init copies the tails afterwards)",
            )
        if config.use_dora or config.fan_in_fan_out or config.lora_bias:
            raise DeftlabError(
                "DoRA, fan_in_fan_out and lora_bias are not supported on LowRankLinear",
                "use plain LoRA on decomposed layers",
            )
        super().__init__(base_layer, adapter_name, config=config, r=r, lora_alpha=lora_alpha, **kwargs)

    @property
    def lora_variants(self) -> dict:
        return {(): None}

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        if not isinstance(module, LowRankLinear):
            raise DeftlabError(f"LowRankLoraLinear wraps a {type(module).__name__}", "target LowRankLinear modules")
        return module.in_features, module.out_features

    def _get_base_layer_device_and_dtype(self, base_layer: nn.Module) -> tuple[torch.device, torch.dtype]:
        if isinstance(base_layer, LowRankLinear):
            child = base_layer.v_proj
            dtype = child.compute_dtype if is_4bit(child) else child.weight.dtype
            return child.weight.device, dtype
        return super()._get_base_layer_device_and_dtype(base_layer)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        from peft.tuners.tuners_utils import check_adapters_to_merge

        for adapter in check_adapters_to_merge(self, adapter_names):
            if adapter not in self.lora_A:
                continue
            base: LowRankLinear = self.get_base_layer()
            W_u, W_v = base.factors()
            dtype = W_u.dtype
            B = (self.lora_B[adapter].weight * self.scaling[adapter]).detach().to(dtype)
            A = self.lora_A[adapter].weight.detach().to(dtype)
            new_u = torch.cat([W_u, B], dim=1)
            new_v = torch.cat([W_v, A], dim=0)
            if safe_merge and not (torch.isfinite(new_u).all() and torch.isfinite(new_v).all()):
                raise DeftlabError(f"non-finite values merging adapter '{adapter}'", "check the trained adapter")
            bias = base.u_proj.bias
            merged = LowRankLinear.from_factors(
                new_u, new_v, None if bias is None else bias.detach().to(dtype), requires_grad=False
            )
            self._caches[f"premerge_{adapter}"] = (base.u_proj, base.v_proj)
            base.u_proj, base.v_proj = merged.u_proj, merged.v_proj
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        base: LowRankLinear = self.get_base_layer()
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            base.u_proj, base.v_proj = self._caches.pop(f"premerge_{adapter}")

    def __repr__(self) -> str:
        return "deftlab." + super().__repr__()
