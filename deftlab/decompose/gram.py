"""Input Gram XᵀX accumulated over batches with half the multiply-adds. Pure functions on tensors.

XᵀX is symmetric, so only the block upper triangle is computed: with the d columns cut into b blocks, column
block j needs X[:, j]ᵀ · X[:, j:] (one GEMM per block), (b + 1)/(2b) of the full product's work (56 % for b = 8).
torch has no SYRK; b GEMMs on wide slices keep BLAS efficient where b² small block products would not.
Each batch's product runs in float32 (fast on CPU, exact enough for a few thousand tokens) and is added into a
float64 accumulator; the lower triangle is filled in once, by ``finalize``.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Blocks narrower than this cost more in GEMM efficiency than they save in multiply-adds.
MIN_BLOCK = 128


def block_bounds(d: int, blocks: int | None = None) -> list[int]:
    """Column block boundaries [0, ..., d]: about d / MIN_BLOCK blocks, at most 8 (None), or ``blocks``."""
    if blocks is None:
        blocks = max(1, min(8, d // MIN_BLOCK))
    blocks = max(1, min(int(blocks), d))
    return [round(i * d / blocks) for i in range(blocks + 1)]


def upper_gram_macs(d: int, bounds: list[int] | None = None) -> int:
    """Multiply-adds per token of ``add_upper_gram`` on d columns (d² for the full product)."""
    bounds = block_bounds(d) if bounds is None else bounds
    return sum((hi - lo) * (d - lo) for lo, hi in zip(bounds[:-1], bounds[1:]))


def add_upper_gram(acc: Tensor, x: Tensor, bounds: list[int]) -> None:
    """acc[j, j:] += X[:, j]ᵀ X[:, j:] for every column block j (block upper triangle, in place).

    ``acc`` is (d × d) float64; ``x`` is (tokens × d) in any float dtype (multiplied in float32).
    """
    x = x.float()
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        acc[lo:hi, lo:] += (x[:, lo:hi].T @ x[:, lo:]).double()


def finalize(acc: Tensor, bounds: list[int]) -> Tensor:
    """Fill the block lower triangle from the upper one (in place) and return the exactly symmetric Gram
    (diagonal blocks are averaged with their transpose: BLAS need not round XᵀX symmetrically)."""
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        acc[hi:, lo:hi] = acc[lo:hi, hi:].T
        diag = acc[lo:hi, lo:hi]
        diag.copy_((diag + diag.T) / 2)
    return acc


def gram(x: Tensor, blocks: int | None = None) -> Tensor:
    """XᵀX in float64 via the block upper triangle (one batch; for tests and one-off use)."""
    d = x.shape[-1]
    bounds = block_bounds(d, blocks)
    acc = torch.zeros(d, d, dtype=torch.float64, device=x.device)
    add_upper_gram(acc, x.reshape(-1, d), bounds)
    return finalize(acc, bounds)
