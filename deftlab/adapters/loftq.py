"""LoftQ initialisation (Li et al. 2023, Algorithm 1) for dense and for DeFT-factored weights. Pure functions.

LoftQ alternates T times: Q ← quant(W − s·BA); (B, A) ← best rank-r fit of (W − deq(Q)) / s, so that the
4-bit base plus the LoRA starts close to W instead of to Q(W). PEFT implements it for dense layers, but only on
CUDA/XPU (peft 0.21 `loftq_init` hard-codes the device) and not for factored layers; `attach` uses PEFT's when
it can and these functions otherwise (the same algorithm, with the NF4 round trip of bitsandbytes on any device).

LoftQ + DeFT (DeFT Table 6; deftlab's reading, the paper's text is not available here): the target is the rank-θ
model DeFT's init starts from, T = W_u W_v + s·B_tail A_tail. The frozen part stays DeFT's own top-k whitened
factors (k = θ − r), stored in NF4; the LoRA is the best rank-r fit of T − deq(Q_u)·deq(Q_v), i.e. the tail plus
the quantisation error. Refitting the frozen factors (LoftQ's later iterations) would need a plain SVD of T, which
discards the whitening, so only LoftQ's first step applies. Without quantisation error this is exactly DeFT's
tail initialisation.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from deftlab.errors import DeftlabError
from deftlab.linalg import thin_svd
from deftlab.surgery.quantize import check_4bit_support

Quantizer = Callable[[Tensor], Tensor]  # w -> deq(quant(w)), same shape and dtype


def nf4_roundtrip(w: Tensor, blocksize: int = 64) -> Tensor:
    """deq(NF4(w)) with bitsandbytes, fp32 absmax (no double quantisation: re-quantising the result is exact)."""
    import bitsandbytes.functional as bnbF

    check_4bit_support(w.device)  # also repairs bitsandbytes' CPU dequantise where needed
    q, state = bnbF.quantize_4bit(w.detach().float().contiguous(), blocksize=blocksize, quant_type="nf4",
                                  compress_statistics=False)
    return bnbF.dequantize_4bit(q, state).to(w.dtype).reshape(w.shape)


def _split(M: Tensor, rank: int, scaling: float = 1.0) -> tuple[Tensor, Tensor]:
    """(B, A) with s·B·A the best rank-`rank` approximation of M (Σ split evenly, PiSSA convention)."""
    U, S, Vh = thin_svd(M.double())
    root = (S[:rank] / scaling).sqrt()
    return (U[:, :rank] * root).to(M.dtype), (root[:, None] * Vh[:rank]).to(M.dtype)


def _check(r: int, scaling: float, iters: int) -> None:
    if r < 0 or iters < 1 or not scaling > 0:
        raise DeftlabError(f"LoftQ: rank {r}, scaling {scaling}, iterations {iters}",
                           "use rank >= 0, scaling > 0 and at least one iteration")


def loftq_dense(W: Tensor, r: int, *, scaling: float = 1.0, iters: int = 1,
                quantize: Quantizer = nf4_roundtrip) -> tuple[Tensor, Tensor, Tensor]:
    """(deq(Q), B, A) with deq(Q) + s·B·A ≈ W (LoftQ Algorithm 1)."""
    _check(r, scaling, iters)
    W = W.detach().float()
    B = W.new_zeros(W.shape[0], r)
    A = W.new_zeros(r, W.shape[1])
    for _ in range(iters):
        Q = quantize(W - scaling * (B @ A))
        B, A = _split(W - Q, r, scaling)
    return Q, B, A


def loftq_factored(W_u: Tensor, W_v: Tensor, r: int, *, tail: tuple[Tensor, Tensor] | None = None,
                   scaling: float = 1.0, quantize: Quantizer = nf4_roundtrip) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(deq(Q_u), deq(Q_v), B, A) with deq(Q_u)·deq(Q_v) + s·B·A ≈ T = W_u W_v + s·B_tail A_tail.

    W_u (out×k), W_v (k×in): DeFT's frozen factors; ``tail``: DeFT's (B_tail, A_tail), None for vanilla init.
    """
    _check(r, scaling, 1)
    W_u, W_v = W_u.detach().float(), W_v.detach().float()
    Qu, Qv = quantize(W_u), quantize(W_v)
    residual = W_u @ W_v - Qu @ Qv
    if tail is not None:
        residual = residual + scaling * (tail[0].float() @ tail[1].float())
    B, A = _split(residual, r, scaling)
    return Qu, Qv, B, A
