"""PEFT LoRA on a `LowRankLinear`: one rank-r update of the whole decomposed map.

    y = u_proj(v_proj(x)) + s · B (A dropout(x)),   ΔW = s·B A  (out × in),  s = α / r.

This is a PEFT `LoraLayer` (a subclass of PEFT's own LoRA `Linear`), plugged in with PEFT's experimental
`LoraConfig._register_custom_module({LowRankLinear: LowRankLoraLinear})`, so `get_peft_model`, adapter
saving/loading, `merge_and_unload`, `disable_adapter()` and multi-adapter switching all work. Dropout, scaling,
init and `get_delta_weight` are PEFT's; we override only what needs the base weight, and the forward:

- in/out features, device and dtype come from the factors (a `LowRankLinear` has no `.weight`),
- forward: one active adapter on unquantised factors runs as one pair of products,
  y = [W_u | s·B] · ([W_v; A] · x) (`_FusedLowRankLora`: the first written block by block into one transposed
  buffer, the second one GEMM; no separate add/scale passes over the output, no weight gradients for the frozen
  factors, the same multiply-adds as the plain path). Dropout > 0 is supported (A reads dropout(x), PEFT's
  own module). Merged, disabled, mixed-batch, multi-adapter, 4-bit, autocast, mixed-dtype or trainable-factor
  cases take PEFT's plain forward.
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


class _FusedLowRankLora(torch.autograd.Function):
    """y = [W_u | s·B] · h + bias, h = [W_v x; A xd] (xd = dropout(x), or x itself).

    h is kept transposed, hT = [W_v; A] xᵀ ((k+r) × tokens): its two row blocks are contiguous, so both products
    write straight into it (no concatenated weight, no copy), and backward's dhT likewise. Only the second
    forward product concatenates its weight ([W_u | s·B], out × (k+r): cheaper than a second pass over the
    output whenever tokens > k + r). Only x, xd and hT (what the plain path saves too) are kept for backward:
    the concatenated weight is not, so training memory does not grow by a copy of the factors."""

    @staticmethod
    def forward(ctx, x, xd, w_v, w_u, bias, a, b, scaling: float):
        k, same = w_v.shape[0], xd is x
        x2 = x.reshape(-1, x.shape[-1])
        xd2 = x2 if same else xd.reshape(-1, xd.shape[-1])
        hT = x2.new_empty(k + a.shape[0], x2.shape[0])
        torch.mm(w_v, x2.T, out=hT[:k])
        torch.mm(a, xd2.T, out=hT[k:])
        wu = torch.cat([w_u, b * scaling], dim=1)
        y = hT.T @ wu.T if bias is None else torch.addmm(bias, hT.T, wu.T)
        ctx.same, ctx.scaling, ctx.shape = same, scaling, x.shape
        ctx.save_for_backward(x, None if same else xd, hT, w_v, w_u, a, b)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, g):
        x, xd, hT, w_v, w_u, a, b = ctx.saved_tensors
        s, k = ctx.scaling, w_v.shape[0]
        g2 = g.reshape(-1, g.shape[-1])
        xd2 = x.reshape(-1, x.shape[-1]) if ctx.same else xd.reshape(-1, xd.shape[-1])
        ghT = g2.new_empty(hT.shape)  # (dL/dh)ᵀ = [W_u | s·B]ᵀ gᵀ, block by block
        torch.mm(w_u.T, g2.T, out=ghT[:k])
        torch.mm(b.T, g2.T, out=ghT[k:]).mul_(s)
        gx = gxd = ga = gb = None
        if ctx.needs_input_grad[6]:
            gb = (g2.T @ hT[k:].T).mul_(s)
        if ctx.needs_input_grad[5]:
            ga = ghT[k:] @ xd2
        if ctx.same and ctx.needs_input_grad[0]:
            gx = (ghT.T @ torch.cat([w_v, a])).reshape(ctx.shape)
        elif not ctx.same:
            if ctx.needs_input_grad[0]:
                gx = (ghT[:k].T @ w_v).reshape(ctx.shape)
            if ctx.needs_input_grad[1]:
                gxd = (ghT[k:].T @ a).reshape(ctx.shape)
        return gx, gxd, None, None, None, ga, gb, None


class LowRankLoraLinear(PeftLoraLinear):
    fused = True  # False: PEFT's plain forward everywhere (benchmarks and tests compare the two)

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

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter = self._fusable(x, args, kwargs)
        if adapter is None:
            return super().forward(x, *args, **kwargs)
        base: LowRankLinear = self.get_base_layer()
        xd = self.lora_dropout[adapter](x)  # nn.Identity / eval-mode dropout return x itself
        return _FusedLowRankLora.apply(x, xd, base.v_proj.weight, base.u_proj.weight, base.u_proj.bias,
                                       self.lora_A[adapter].weight, self.lora_B[adapter].weight,
                                       float(self.scaling[adapter]))

    def _fusable(self, x: torch.Tensor, args: tuple, kwargs: dict) -> str | None:
        """The one active adapter when the fused forward computes exactly what PEFT's would, else None."""
        if not self.fused or args or kwargs or self.disable_adapters or self.merged or self.lora_variant:
            return None
        active = [a for a in self.active_adapters if a in self.lora_A]
        if len(active) != 1 or torch.is_autocast_enabled(x.device.type):
            return None
        base = self.get_base_layer()
        if not isinstance(base, LowRankLinear) or is_4bit(base.u_proj) or is_4bit(base.v_proj):
            return None
        frozen = [base.v_proj.weight, base.u_proj.weight] + ([] if base.u_proj.bias is None else [base.u_proj.bias])
        lora = [self.lora_A[active[0]].weight, self.lora_B[active[0]].weight]
        if any(t.requires_grad for t in frozen) or any(t.dtype != x.dtype or t.device != x.device
                                                       for t in frozen + lora):
            return None
        return active[0]

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
