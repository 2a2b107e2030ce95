"""LoftQ initialisation as pure functions: dense (LoftQ Algorithm 1) and on DeFT's factored layers."""

import torch

from deftlab.adapters.loftq import loftq_dense, loftq_factored, nf4_roundtrip


def _w(m, n, seed):
    return torch.randn(m, n, generator=torch.Generator().manual_seed(seed))


def test_nf4_roundtrip_is_idempotent_and_lossy():
    W = _w(64, 96, 0)
    Q = nf4_roundtrip(W)
    assert Q.shape == W.shape and not torch.equal(Q, W)
    assert torch.equal(nf4_roundtrip(Q), Q)  # re-quantising NF4 values with fp32 absmax is exact


def test_loftq_dense_lowers_the_error_of_plain_quantisation():
    W = _w(64, 96, 1)
    plain = (W - nf4_roundtrip(W)).norm()
    errs = []
    for iters in (1, 3):
        Q, B, A = loftq_dense(W, 8, scaling=4.0, iters=iters)
        assert B.shape == (64, 8) and A.shape == (8, 96)
        assert torch.equal(nf4_roundtrip(Q), Q)
        errs.append((W - Q - 4.0 * B @ A).norm())
    assert errs[0] < 0.95 * plain
    assert errs[1] <= errs[0] * 1.001  # more alternations do not undo the gain
    Q0, B0, A0 = loftq_dense(W, 0)
    assert torch.equal(Q0, nf4_roundtrip(W)) and B0.numel() == 0 and A0.numel() == 0


def test_loftq_factored_without_quantisation_error_is_deft_tail_init():
    Wu, Wv = _w(48, 10, 2), _w(10, 40, 3)
    tB, tA = _w(48, 3, 4), _w(3, 40, 5)
    s = 4.0
    Qu, Qv, B, A = loftq_factored(Wu, Wv, 3, tail=(tB, tA), scaling=s, quantize=lambda w: w.clone())
    assert torch.equal(Qu, Wu) and torch.equal(Qv, Wv)
    torch.testing.assert_close(s * B @ A, s * tB @ tA, atol=1e-4, rtol=1e-4)


def test_loftq_factored_lora_absorbs_tail_and_quantisation_error():
    Wu, Wv = _w(48, 10, 6), _w(10, 40, 7)
    tB, tA = 0.1 * _w(48, 2, 8), 0.1 * _w(2, 40, 9)
    s, r = 2.0, 6
    target = Wu @ Wv + s * tB @ tA
    Qu, Qv, B, A = loftq_factored(Wu, Wv, r, tail=(tB, tA), scaling=s)
    assert torch.equal(nf4_roundtrip(Qu), Qu) and torch.equal(nf4_roundtrip(Qv), Qv)
    without = (target - Qu @ Qv).norm()
    assert (target - Qu @ Qv - s * B @ A).norm() < 0.8 * without


def test_nf4_is_accurate_for_rows_that_are_not_whole_blocks():
    """bitsandbytes 0.50's native CPU dequantise mis-scales such rows (a factor of rank 480, 96, ...); deftlab
    routes them to bitsandbytes' exact pure-torch path. NF4's rounding error is at most ~0.16 of the absmax."""
    for shape in [(64, 96), (576, 480), (192, 176), (576, 576), (10, 40)]:
        W = _w(*shape, seed=shape[1])
        err = ((nf4_roundtrip(W) - W).abs().max() / W.abs().max()).item()
        assert err < 0.2, (shape, err)
