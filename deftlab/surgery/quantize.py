"""4-bit NF4 storage (bitsandbytes `Linear4bit`) for dense linears and for the factors of `LowRankLinear`.

QLoRA recipe (Dettmers et al.): NF4, blocksize 64, double-quantised absmax, compute in bf16 on CUDA; on CPU we
compute in fp32. For decomposed models the factors W_u, W_v (the `u_proj`/`v_proj` children) are quantised, not a
dense product — "decompose in full precision, then quantise" as PiSSA/LoftQ recommend.

bitsandbytes 0.50 quantises and runs 4-bit matmuls on CPU, with two CPU defects handled here:
- its native CPU dequantise kernel indexes the absmax per row, so when a row's length is not a multiple of the
  blocksize (NF4 blocks run over the flattened tensor) many values come back scaled by a neighbouring block's
  absmax (found here: a 576×480 factor, or any width ≡ 16/32/48 mod 64, dequantises with max errors of ~50 % of
  the largest weight). Those shapes are routed to bitsandbytes' own pure-torch dequantise, which is exact; the
  fix is installed only where a probe shows the defect (`_repair_cpu_dequantize`).
- one quirk is switched off on every module we build:
in eval/no-grad mode on AVX512-BF16 CPUs, `Linear4bit.forward` repacks the weight for a CPU kernel; that path
asserts out_features % 32 == 0 (factor ranks rarely are) and, once repacked, input gradients stop flowing in later
training steps (both verified with bnb 0.50.2). We set `support_avx512bf16_for_cpu = False`, so train and eval
use the same dequantise-then-matmul path.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache

import torch
from torch import nn

from deftlab.errors import DeftlabError
from deftlab.surgery.lowrank import LowRankLinear
from deftlab.surgery.replace import get_parent

DEFAULT_SKIP = ("lm_head",)


def default_compute_dtype(device: torch.device | str) -> torch.dtype:
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def _dequantize_error(device_type: str, shape: tuple[int, int]) -> float:
    import bitsandbytes.functional as bnbF

    w = torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(device_type)
    q, state = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    return float((bnbF.dequantize_4bit(q, state) - w).abs().max() / w.abs().max())


@lru_cache(maxsize=None)
def _repair_cpu_dequantize() -> bool:
    """Route bitsandbytes' CPU NF4 dequantise of rows that are not whole blocks to its pure-torch path, if the
    native kernel gets them wrong (see the module docstring). Returns whether the repair was installed."""
    import warnings

    # NF4's largest rounding error is ~0.16 of the block absmax; the defect gives ~0.5
    if _dequantize_error("cpu", (64, 96)) < 0.25:
        return False
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code

    native = torch.library.get_kernel("bitsandbytes::dequantize_4bit", "CPU")
    keys = torch._C.DispatchKeySet("CPU")

    def dequantize_4bit(A, absmax, blocksize, quant_type, shape, dtype):
        if shape[-1] % blocksize == 0:
            return native.call_boxed(keys, A, absmax, blocksize, quant_type, shape, dtype)
        A = A if A.dtype == torch.uint8 else A.view(torch.uint8)
        return _dequantize_4bit_compute(A.reshape(-1), absmax.float(), _get_4bit_code(quant_type, A.device),
                                        blocksize, shape, dtype)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "overriding a previously registered kernel": intended
        torch.library.register_kernel("bitsandbytes::dequantize_4bit", "cpu")(dequantize_4bit)
    return True


@lru_cache(maxsize=None)
def _probe(device_type: str) -> str | None:
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbF

        if device_type == "cpu":
            _repair_cpu_dequantize()
            if _dequantize_error("cpu", (64, 96)) > 0.25:
                return "NF4 dequantisation is wrong for rows that are not whole blocks"

        w = torch.randn(32, 64, device=device_type)
        q, state = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4")
        back = bnbF.dequantize_4bit(q, state)
        if back.shape != w.shape or not torch.isfinite(back).all():
            return "dequantised weights are wrong"
        _ = bnb.nn.Linear4bit  # noqa: F841
        return None
    except Exception as e:  # any failure means "no 4-bit here"; report it
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def check_4bit_support(device: torch.device | str = "cpu") -> None:
    """Raise a DeftlabError if bitsandbytes cannot quantise to NF4 on `device`."""
    device_type = torch.device(device).type
    problem = _probe(device_type)
    if problem is not None:
        import importlib.metadata as md

        try:
            version = md.version("bitsandbytes")
        except md.PackageNotFoundError:
            version = "(not installed)"
        raise DeftlabError(
            f"bitsandbytes {version} cannot quantise to 4-bit on {device_type} ({problem})",
            "run on a CUDA GPU, upgrade bitsandbytes, or use adapter kind 'lora' instead of 'qlora'",
        )


def is_4bit(module: nn.Module) -> bool:
    try:
        import bitsandbytes as bnb
    except ImportError:
        return False
    return isinstance(module, bnb.nn.Linear4bit)


def to_linear4bit(
    linear: nn.Linear,
    *,
    compute_dtype: torch.dtype | None = None,
    compress_statistics: bool = True,
    blocksize: int = 64,
) -> nn.Module:
    """An NF4 `bnb.nn.Linear4bit` holding `linear`'s weight (quantised on the weight's device) and bias."""
    import bitsandbytes as bnb

    weight = linear.weight
    if weight.device.type == "meta":
        raise DeftlabError("cannot quantise a weight on the meta device", "load the weights before quantising")
    check_4bit_support(weight.device)
    compute_dtype = compute_dtype or default_compute_dtype(weight.device)
    q = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=compute_dtype,
        compress_statistics=compress_statistics,
        quant_type="nf4",
        device="meta",
    )
    q.weight = bnb.nn.Params4bit(
        weight.detach().contiguous(),
        requires_grad=False,
        blocksize=blocksize,
        compress_statistics=compress_statistics,
        quant_type="nf4",
        module=q,
    ).to(weight.device)  # Params4bit.to() on a real device performs the quantisation
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    if weight.device.type == "cpu":
        q.support_avx512bf16_for_cpu = False  # see module docstring
    return q


def quantize_lowrank(
    model: nn.Module,
    *,
    compute_dtype: torch.dtype | None = None,
    compress_statistics: bool = True,
) -> list[str]:
    """Quantise the factors (u_proj, v_proj) of every `LowRankLinear` in place; returns the module names."""
    done = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, LowRankLinear) or module.rank == 0:
            continue  # a rank-0 factor (all components in the LoRA) has nothing to quantise
        for child in ("v_proj", "u_proj"):
            linear = getattr(module, child)
            if not is_4bit(linear):
                setattr(
                    module,
                    child,
                    to_linear4bit(linear, compute_dtype=compute_dtype, compress_statistics=compress_statistics),
                )
        done.append(name)
    return done


def _skipped(name: str, skip: Iterable[str]) -> bool:
    return any(name == s or name.endswith("." + s) for s in skip)


def quantize_dense_linears(
    model: nn.Module,
    skip: Iterable[str] = DEFAULT_SKIP,
    *,
    compute_dtype: torch.dtype | None = None,
    compress_statistics: bool = True,
) -> list[str]:
    """Replace every plain `nn.Linear` (not the factors inside a `LowRankLinear`, not `skip`) by NF4 Linear4bit.

    Sets `model.is_loaded_in_4bit = True`, the flag HF sets for bnb-4bit models; PEFT reads it to wrap
    Linear4bit targets with its bnb-aware LoRA layer (correct dequantise/requantise merges).
    """
    skip = tuple(skip)
    inside_lowrank = {
        f"{n}.{c}" for n, m in model.named_modules() if isinstance(m, LowRankLinear) for c in ("u_proj", "v_proj")
    }
    done = []
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or name in inside_lowrank or _skipped(name, skip):
            continue
        if "lora_" in name:
            raise DeftlabError(f"'{name}' is a LoRA layer", "quantise the base model before attaching adapters")
        parent, attr = get_parent(model, name)
        setattr(
            parent, attr, to_linear4bit(module, compute_dtype=compute_dtype, compress_statistics=compress_statistics)
        )
        done.append(name)
    if done:
        model.is_loaded_in_4bit = True
    return done


def nf4_finalizer(skip: Iterable[str] = DEFAULT_SKIP, **kw):
    """For `load_decomposed(finalize=)`: each linear (dense, or a factor) is stored in NF4 as soon as it is loaded,
    as `quantize_for_qlora` stores them afterwards; `skip` (the LM head) and empty rank-0 factors stay as they are."""
    skip = tuple(skip)

    def finalize(name: str, linear: nn.Module) -> nn.Module | None:
        if _skipped(name, skip) or linear.weight.numel() == 0:
            return None
        return to_linear4bit(linear, **kw)

    return finalize


def quantize_for_qlora(model: nn.Module, skip: Iterable[str] = DEFAULT_SKIP, **kw) -> list[str]:
    """QLoRA base: 4-bit factors for decomposed layers and 4-bit weights for dense linears (except `skip`)."""
    names = quantize_lowrank(model, **kw)
    names += quantize_dense_linears(model, skip, **kw)
    if names:
        model.is_loaded_in_4bit = True
    return names
