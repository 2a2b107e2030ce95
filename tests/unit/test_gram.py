"""Block-triangular Gram accumulation and the triangular product used by the whitened SVD."""

import pytest
import torch

from deftlab.decompose import gram as gram_ops
from deftlab.decompose.whiten import matmul_lower


@pytest.mark.parametrize("d,blocks", [(1, None), (97, None), (300, None), (300, 3), (1536, None), (50, 7)])
def test_block_gram_equals_the_full_product(d, blocks):
    torch.manual_seed(d)
    x = torch.randn(64, d)
    g = gram_ops.gram(x, blocks)
    ref = x.double().T @ x.double()
    assert torch.equal(g, g.T)  # exactly symmetric
    assert ((g - ref).norm() / ref.norm()).item() < 1e-6


def test_accumulating_batches_equals_the_gram_of_their_concatenation():
    torch.manual_seed(0)
    d = 384
    bounds = gram_ops.block_bounds(d)
    assert len(bounds) - 1 == 3 and bounds[0] == 0 and bounds[-1] == d
    acc = torch.zeros(d, d, dtype=torch.float64)
    xs = [torch.randn(n, d) for n in (5, 40, 17)]
    for x in xs:
        gram_ops.add_upper_gram(acc, x, bounds)
    # before finalize only the block upper triangle holds data
    assert acc[bounds[1]:, : bounds[1]].abs().sum() == 0
    g = gram_ops.finalize(acc, bounds)
    cat = torch.cat(xs).double()
    ref = cat.T @ cat
    assert ((g - ref).norm() / ref.norm()).item() < 1e-6


def test_block_bounds_cover_the_columns_once():
    for d in (1, 127, 128, 1000, 5000):
        b = gram_ops.block_bounds(d)
        assert b[0] == 0 and b[-1] == d and all(lo < hi for lo, hi in zip(b[:-1], b[1:]))
        assert len(b) - 1 <= 8


@pytest.mark.parametrize("m,n,blocks", [(7, 300, None), (300, 129, 4), (64, 64, 64)])
def test_matmul_lower_equals_dense_product(m, n, blocks):
    torch.manual_seed(m + n)
    W = torch.randn(m, n, dtype=torch.float64)
    S = torch.linalg.cholesky(_spd(n))
    assert torch.allclose(matmul_lower(W, S, blocks), W @ S, rtol=1e-12, atol=1e-12)


def _spd(n):
    a = torch.randn(2 * n, n, dtype=torch.float64)
    return a.T @ a
