"""Attach a fine-tuning method to a dense or decomposed model, and merge it back for evaluation.

| kind     | trainable                                  | base storage                                        |
|----------|--------------------------------------------|-----------------------------------------------------|
| none     | nothing                                    | as given                                            |
| lora     | LoRA A/B (PEFT)                            | as given (dense and/or LowRankLinear factors)       |
| qlora    | LoRA A/B (PEFT)                            | NF4: dense linears and LowRankLinear factors         |
| loftq    | LoRA A/B, LoftQ init (PEFT's on CUDA)      | NF4: dense linears and LowRankLinear factors         |
| dora     | LoRA A/B and magnitudes (PEFT's DoRA)      | as given (dense linears only)                       |
| full     | every parameter (factors included)         | as given (must not be 4-bit)                        |
| lrc      | u_proj/v_proj of LRC matrices (WeLore)     | as given; N-LRC, embeddings, norms, head frozen     |
| series   | W_down/W_up of adapters after the MLPs     | as given (dense, factored or reduced)               |
| parallel | W_down/W_up of adapters beside the MLPs    | as given (dense, factored or reduced)               |

LoRA targets are resolved to exact module names and passed to PEFT as one anchored regex: a factor child
`self_attn.q_proj.v_proj` ends in `.v_proj`, so PEFT's suffix matching would otherwise adapt it.
LoftQ: PEFT's init where PEFT can run it (dense model, CUDA/XPU); otherwise deftlab.adapters.loftq (the same
algorithm on any device, and LoftQ + DeFT on factored layers, with DeFT's tails folded into the LoRA's target).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from deftlab.adapters.bottleneck import attach_bottleneck
from deftlab.adapters.config import AdapterConfig
from deftlab.errors import DeftlabError
from deftlab.surgery.lowrank import LowRankLinear, linear_weight
from deftlab.surgery.quantize import DEFAULT_SKIP, check_4bit_support, is_4bit, quantize_for_qlora, to_linear4bit
from deftlab.surgery.replace import AllocationLike, LoraTail, get_parent

ADAPTER_NAME = "default"


def _factor_children(model: nn.Module) -> set[str]:
    return {f"{n}.{c}" for n, m in model.named_modules() if isinstance(m, LowRankLinear) for c in ("u_proj", "v_proj")}


def lora_target_names(model: nn.Module, target_modules: tuple[str, ...]) -> list[str]:
    """Exact names of the linears (dense, 4-bit or LowRankLinear) whose name ends in one of `target_modules`."""
    children = _factor_children(model)
    names = [
        name
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, LowRankLinear))
        and name not in children
        and any(name == t or name.endswith("." + t) for t in target_modules)
    ]
    if not names:
        raise DeftlabError(f"no linear module matches target_modules {list(target_modules)}", "check module names")
    return names


def _has_lowrank(model: nn.Module) -> bool:
    return any(isinstance(m, LowRankLinear) for m in model.modules())


def _lora_config(model: nn.Module, cfg: AdapterConfig, targets: list[str], **extra: Any):
    from peft import LoraConfig

    from deftlab.adapters.lowrank_lora import LowRankLoraLinear

    lora_config = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules="^(?:" + "|".join(re.escape(t) for t in targets) + ")$",
        bias="none",
        task_type="CAUSAL_LM" if hasattr(model, "generate") else None,
        **extra,
    )
    if _has_lowrank(model):
        lora_config._register_custom_module({LowRankLinear: LowRankLoraLinear})
    return lora_config


def attach(
    model: nn.Module,
    cfg: AdapterConfig,
    *,
    deft_tails: Mapping[str, LoraTail] | None = None,
    allocation: AllocationLike | None = None,
) -> nn.Module:
    """Set up `model` for fine-tuning with `cfg`; returns a `peft.PeftModel` for LoRA kinds, else `model`
    (series/parallel: modified in place, each target wrapped in a `BottleneckAdapter`).

    deft_tails: from `build_decomposed_model(..., init="deft", lora_rank=cfg.r, lora_alpha=cfg.alpha)`; copied
    into lora_A/lora_B so that at step 0 the model computes exactly its rank-θ reconstruction.
    allocation: needed for kind "lrc" (which matrices are LRC).
    """
    if not isinstance(cfg, AdapterConfig):
        raise DeftlabError(f"attach needs an AdapterConfig, got {type(cfg).__name__}", "use AdapterConfig.from_dict")
    cfg.validate()
    tails = dict(deft_tails or {})
    if tails and not (cfg.uses_lora and cfg.init == "deft"):
        raise DeftlabError(
            f"deft_tails given for kind '{cfg.kind}' with init '{cfg.init}': the tail components would be lost",
            "use kind lora/qlora with init 'deft', or rebuild the model with lora_rank=0 / init='vanilla'",
        )
    if cfg.kind == "none":
        model.requires_grad_(False)
        return model
    if cfg.kind == "full":
        quantized = [n for n, m in model.named_modules() if is_4bit(m)]
        if quantized:
            raise DeftlabError(f"full fine-tuning of 4-bit weights ({quantized[0]}, ...)", "use kind 'qlora'")
        model.requires_grad_(True)
        return model
    if cfg.kind == "lrc":
        return _attach_lrc(model, cfg, allocation)
    if cfg.uses_bottleneck:
        return attach_bottleneck(model, cfg)
    if cfg.kind == "loftq":
        if _has_lowrank(model) or not _loftq_device_available():
            return _attach_loftq_deftlab(model, cfg, tails)
        return _attach_loftq(model, cfg)

    if cfg.init == "deft" and not tails and _has_lowrank(model):
        raise DeftlabError(
            "init 'deft' on a decomposed model needs deft_tails",
            "pass the tails from build_decomposed_model(init='deft', lora_rank=r) or set init 'vanilla'",
        )
    if cfg.kind == "dora" and _has_lowrank(model):
        raise DeftlabError("DoRA on a decomposed model: PEFT's DoRA layer needs the dense weight's column norms",
                           "use method dense with adapter dora (the DoRA baseline), or adapter lora")
    if cfg.kind == "qlora":
        check_4bit_support(next(model.parameters()).device)
        quantize_for_qlora(model, skip=DEFAULT_SKIP)
    targets = lora_target_names(model, cfg.target_modules)
    missing = sorted(set(tails) - set(targets))
    if missing:
        raise DeftlabError(
            f"DeFT tails for modules the adapter does not target: {missing[:3]}",
            "add them to target_modules (their frozen part lacks the tail components)",
        )
    from peft import get_peft_model

    extra = {"use_dora": True} if cfg.kind == "dora" else {}
    peft_model = get_peft_model(model, _lora_config(model, cfg, targets, **extra))
    if tails:
        copy_tails(peft_model, tails)
    return peft_model


@torch.no_grad()
def copy_tails(peft_model: nn.Module, tails: Mapping[str, LoraTail], adapter: str = ADAPTER_NAME) -> None:
    """DeFT init: lora_A[:r'] = A_tail, lora_B[:, :r'] = B_tail (r' = tail rank ≤ r; the rest keeps B = 0)."""
    base = peft_model.get_base_model()
    for name, tail in tails.items():
        layer = base.get_submodule(name)
        scaling = layer.scaling[adapter]
        if not math.isclose(scaling, tail.scaling, rel_tol=1e-6):
            raise DeftlabError(
                f"'{name}': tails were built for LoRA scaling {tail.scaling:g}, the adapter uses {scaling:g}",
                "build the model with the adapter's r and alpha",
            )
        A, B = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        k = tail.rank
        if k > A.shape[0] or tail.A.shape[1] != A.shape[1] or tail.B.shape[0] != B.shape[0]:
            raise DeftlabError(f"'{name}': tail of rank {k} does not fit a rank-{A.shape[0]} LoRA", "rebuild the model")
        A[:k].copy_(tail.A)
        B.zero_()
        B[:, :k].copy_(tail.B)


def _attach_lrc(model: nn.Module, cfg: AdapterConfig, allocation: AllocationLike | None) -> nn.Module:
    if allocation is None or not isinstance(getattr(allocation, "lrc", None), Mapping):
        raise DeftlabError("kind 'lrc' needs the allocation (which matrices are LRC)", "pass allocation=...")
    lrc = [name for name, flag in allocation.lrc.items() if flag]
    if not lrc:
        raise DeftlabError("the allocation marks no matrix as LRC", "lower WeLore's min_ratio or use another kind")
    model.requires_grad_(False)
    for name in lrc:
        parent, attr = get_parent(model, name)
        module = getattr(parent, attr)
        if not isinstance(module, LowRankLinear):
            raise DeftlabError(f"LRC matrix '{name}' is not decomposed", "build the model with factored=True for LRCs")
        if is_4bit(module.u_proj) or is_4bit(module.v_proj):
            raise DeftlabError(f"LRC factors of '{name}' are 4-bit", "train LRC factors in full precision")
        module.requires_grad_(True)
    if cfg.train_norms:
        for m in model.modules():
            if "norm" in type(m).__name__.lower():
                m.requires_grad_(True)
    return model


def _loftq_device_available() -> bool:
    # peft 0.21's loftq_init computes on "xpu" if available, else "cuda" (peft/utils/loftq_utils.py)
    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


def _attach_loftq_deftlab(model: nn.Module, cfg: AdapterConfig, tails: Mapping[str, LoraTail]) -> nn.Module:
    """LoftQ init from deftlab.adapters.loftq: targets get NF4 bases (dense or factored) and LoRA fits of their
    quantisation residual (plus DeFT's tail); every other linear is quantised as in QLoRA."""
    from peft import get_peft_model

    from deftlab.adapters.loftq import loftq_dense, loftq_factored

    check_4bit_support(next(model.parameters()).device)
    targets = lora_target_names(model, cfg.target_modules)
    missing = sorted(set(tails) - set(targets))
    if missing:
        raise DeftlabError(f"DeFT tails for modules the adapter does not target: {missing[:3]}",
                           "add them to target_modules (their frozen part lacks the tail components)")
    inits: dict[str, LoraTail] = {}
    with torch.no_grad():
        for name in targets:
            module, tail = model.get_submodule(name), tails.get(name)
            if isinstance(module, LowRankLinear):
                Qu, Qv, B, A = loftq_factored(module.u_proj.weight, module.v_proj.weight, cfg.r,
                                              tail=(tail.B, tail.A) if tail else None, scaling=cfg.scaling)
                module.u_proj.weight.copy_(Qu)
                module.v_proj.weight.copy_(Qv)
            else:
                # a matrix DeFT kept dense still hands its tail to the LoRA: the target is weight + s·B·A
                target = module.weight if tail is None else module.weight + cfg.scaling * (tail.B @ tail.A)
                Q, B, A = loftq_dense(target, cfg.r, scaling=cfg.scaling, iters=cfg.loftq_iter)
                module.weight.copy_(Q)
            inits[name] = LoraTail(B=B, A=A, scaling=cfg.scaling)
    # fp32 absmax (no double quantisation): re-quantising the NF4 values LoftQ chose stores exactly them
    quantize_for_qlora(model, skip=DEFAULT_SKIP, compress_statistics=False)
    extra = {"use_dora": True} if cfg.kind == "dora" else {}
    peft_model = get_peft_model(model, _lora_config(model, cfg, targets, **extra))
    copy_tails(peft_model, inits)
    return peft_model


def _attach_loftq(model: nn.Module, cfg: AdapterConfig) -> nn.Module:
    """PEFT's LoftQ init (dense model, CUDA/XPU)."""
    from peft import LoftQConfig, get_peft_model

    check_4bit_support("cuda" if torch.cuda.is_available() else "cpu")
    targets = lora_target_names(model, cfg.target_modules)
    lora_config = _lora_config(
        model,
        cfg,
        targets,
        init_lora_weights="loftq",
        loftq_config=LoftQConfig(loftq_bits=4, loftq_iter=cfg.loftq_iter),
    )
    peft_model = get_peft_model(model, lora_config)
    base = peft_model.get_base_model()
    root = math.sqrt(cfg.scaling)
    with torch.no_grad():
        for name in targets:
            layer = base.get_submodule(name)
            # PEFT's LoftQ sets B A = rank-r SVD of (W − Q(W)) but the forward adds s·B A: rescale so that
            # Q(W) + s·B A ≈ W for any α/r (PiSSA/CorDA convention).
            layer.lora_A[ADAPTER_NAME].weight.div_(root)
            layer.lora_B[ADAPTER_NAME].weight.div_(root)
            # the base now holds dequantised NF4 values; NF4 with fp32 absmax (no double quant) is idempotent,
            # so re-quantising stores exactly the Q(W) LoftQ used
            layer.base_layer = to_linear4bit(layer.base_layer, compress_statistics=False)
    skip = set(DEFAULT_SKIP)
    for name, module in list(base.named_modules()):
        if type(module) is nn.Linear and "lora_" not in name and not name.endswith("base_layer"):
            if not any(name == s or name.endswith("." + s) for s in skip):
                parent, attr = get_parent(base, name)
                setattr(parent, attr, to_linear4bit(module))
    base.is_loaded_in_4bit = True
    return peft_model


def load_adapter(model: nn.Module, path: str, *, is_trainable: bool = False, adapter_name: str = ADAPTER_NAME):
    """`PeftModel.from_pretrained` that re-registers the LowRankLinear LoRA mapping (PEFT does not save it)."""
    from peft import LoraConfig, PeftModel

    from deftlab.adapters.lowrank_lora import LowRankLoraLinear

    config = LoraConfig.from_pretrained(path)
    if _has_lowrank(model):
        config._register_custom_module({LowRankLinear: LowRankLoraLinear})
    return PeftModel.from_pretrained(model, path, adapter_name=adapter_name, is_trainable=is_trainable, config=config)


# ----------------------------------------------------------------------------------------------------------------
# merging for evaluation


@torch.no_grad()
def merge_for_eval(model: nn.Module) -> nn.Module:
    """Fold every active LoRA into its base and return the plain (unwrapped) model.

    - LowRankLinear: concatenation, W_u' = [W_u, s·B], W_v' = [W_v; A] (the rank stays θ under DeFT init).
    - dense nn.Linear: W + s·B A.
    - 4-bit Linear4bit: dequantised to a float nn.Linear holding Q(W) + s·B A, so merged outputs equal the
      unmerged ones (re-quantising the sum, as PEFT's merge does, would add new rounding error). Memory grows
      back to float for these layers; evaluation is the only intended use.
    """
    from peft.tuners.lora.layer import LoraLayer

    from deftlab.adapters.lowrank_lora import LowRankLoraLinear

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for name, module in list(base.named_modules()):
        if not isinstance(module, LoraLayer):
            continue
        inner = module.get_base_layer()
        adapters = [a for a in module.active_adapters if a in module.lora_A and a not in module.merged_adapters]
        if isinstance(module, LowRankLoraLinear):
            module.merge(adapter_names=adapters)
            merged = module.get_base_layer()
            for name_c in ("u_proj", "v_proj"):  # merged factors are float already; drop stale grads flags
                getattr(merged, name_c).requires_grad_(False)
        elif isinstance(inner, nn.Linear):
            if module.merged_adapters and is_4bit(inner):
                raise DeftlabError(f"'{name}' was merged into 4-bit weights already", "unmerge it first")
            weight = linear_weight(inner).clone()
            if not weight.is_floating_point():
                raise DeftlabError(f"cannot merge into '{name}' of dtype {weight.dtype}", "use a float base")
            for a in adapters:
                weight += module.get_delta_weight(a).to(weight.dtype)
            merged = nn.Linear(inner.in_features, inner.out_features, bias=inner.bias is not None, device="meta")
            merged.weight = nn.Parameter(weight, requires_grad=False)
            if inner.bias is not None:
                merged.bias = nn.Parameter(inner.bias.detach().to(weight.dtype), requires_grad=False)
        else:
            raise DeftlabError(f"cannot merge LoRA into a {type(inner).__name__} ('{name}')", "merge it with PEFT")
        parent, attr = get_parent(base, name)
        setattr(parent, attr, merged)
    if not any(is_4bit(m) for m in base.modules()) and getattr(base, "is_loaded_in_4bit", False):
        base.is_loaded_in_4bit = False
    return base
