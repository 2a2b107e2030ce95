"""Whitened SVD (SVD-LLM Theorem 1), Cholesky regularisation and the DeFT LoRA split, on small random matrices."""

from __future__ import annotations

import pytest
import torch

from deftlab.decompose import whiten
from deftlab.decompose.whiten import (
    Decomposition,
    cholesky_factor,
    outlier_ratio,
    reconstruction_error,
    split_for_lora,
    truncated_factors,
    whitened_svd,
)
from deftlab.errors import CacheCorruptError, DeftlabError

OUT, IN, TOKENS = 24, 40, 300


def problem(seed: int = 0, tokens: int = TOKENS):
    """W (24×40) and strongly correlated inputs X (tokens×40), float64."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(OUT, IN, generator=g, dtype=torch.float64)
    mix = torch.randn(IN, IN, generator=g, dtype=torch.float64) * torch.logspace(0, -2, IN, dtype=torch.float64)
    X = torch.randn(tokens, IN, generator=g, dtype=torch.float64) @ mix.T + 0.5
    return W, X


def output_loss(W, W_approx, X) -> float:
    """‖W Xᵀ − W' Xᵀ‖_F² computed directly from the tokens (independent of reconstruction_error)."""
    return float(((W.double() - W_approx.double()) @ X.T).pow(2).sum())


@pytest.mark.parametrize("seed", [0, 1])
def test_theorem1_loss_equals_tail_energy(seed):
    W, X = problem(seed)
    dec = whitened_svd(W, X.T @ X, dtype=torch.float64)
    assert dec.whitened and dec.jitter == 0.0 and dec.full_rank == OUT and dec.shape == (OUT, IN)
    assert bool((dec.sigma[1:] <= dec.sigma[:-1]).all())
    for theta in (1, 5, 12, 23):
        B, A = truncated_factors(dec, theta)
        assert B.shape == (OUT, theta) and A.shape == (theta, IN)
        tail = float((dec.sigma[theta:] ** 2).sum())
        loss = output_loss(W, B @ A, X)
        assert abs(loss - tail) / tail < 1e-6, (theta, loss, tail)
        assert abs(reconstruction_error(W, B @ A, X.T @ X) - tail) / tail < 1e-6


def test_full_rank_reconstructs_w_and_float32_storage_is_close():
    W, X = problem(2)
    dec64 = whitened_svd(W, X.T @ X, dtype=torch.float64)
    B, A = truncated_factors(dec64, OUT)
    assert torch.allclose(B @ A, W, atol=1e-9)
    dec32 = whitened_svd(W, X.T @ X)
    assert dec32.U.dtype == torch.float32 and dec32.Vt_Sinv.dtype == torch.float32
    assert dec32.sigma.dtype == torch.float64
    B, A = truncated_factors(dec32, 8)
    tail = float((dec32.sigma[8:] ** 2).sum())
    assert abs(output_loss(W, B @ A, X) - tail) / tail < 1e-3


def test_whitened_truncation_beats_plain_svd_on_the_output_loss():
    W, X = problem(3)
    white = whitened_svd(W, X.T @ X, dtype=torch.float64)
    plain = whitened_svd(W, None, dtype=torch.float64)
    assert not plain.whitened
    for theta in (2, 6, 12):
        lw = output_loss(W, torch.matmul(*truncated_factors(white, theta)), X)
        lp = output_loss(W, torch.matmul(*truncated_factors(plain, theta)), X)
        assert lw < 0.9 * lp, (theta, lw, lp)
        # plain SVD is the optimum of the weight-space loss instead (Eckart–Young)
        assert abs(reconstruction_error(W, torch.matmul(*truncated_factors(plain, theta)), None)
                   - float((plain.sigma[theta:] ** 2).sum())) < 1e-9


def test_positive_definite_gram_needs_no_jitter():
    _, X = problem(4)
    G = X.T @ X
    S, jitter = cholesky_factor(G)
    assert jitter == 0.0 and S.dtype == torch.float64
    assert torch.allclose(S, torch.tril(S)) and torch.allclose(S @ S.T, G, rtol=1e-10, atol=1e-8)


def test_rank_deficient_gram_gets_scale_aware_jitter():
    W, X = problem(5, tokens=10)  # 10 tokens for 40 inputs: G has rank 10
    G = X.T @ X
    S, jitter = cholesky_factor(G)
    assert jitter > 0
    d = G.shape[0]
    assert torch.allclose(S @ S.T, G + jitter * torch.eye(d, dtype=G.dtype), rtol=1e-8, atol=1e-8 * jitter)
    assert jitter < 1e-3 * float(torch.diagonal(G).mean())  # small against the Gram's scale
    # the regulariser scales with G (an absolute 1e-6 would not): same relative jitter for 2²⁰·G
    _, jitter_big = cholesky_factor(G * 2.0**20)
    assert jitter_big == jitter * 2.0**20
    dec = whitened_svd(W, G, dtype=torch.float64)
    assert dec.jitter == jitter and torch.isfinite(dec.U).all() and torch.isfinite(dec.Vt_Sinv).all()
    # Theorem 1 then holds for the regularised Gram
    B, A = truncated_factors(dec, 6)
    tail = float((dec.sigma[6:] ** 2).sum())
    assert reconstruction_error(W, B @ A, G + jitter * torch.eye(d, dtype=G.dtype)) == pytest.approx(tail, rel=1e-6)


def test_nan_or_inf_input_raises():
    W, X = problem(6)
    G = X.T @ X
    bad = G.clone()
    bad[3, 5] = float("nan")
    with pytest.raises(DeftlabError, match="NaN"):
        cholesky_factor(bad)
    with pytest.raises(DeftlabError, match="NaN"):
        whitened_svd(W, bad)
    Wb = W.clone()
    Wb[0, 0] = float("inf")
    with pytest.raises(DeftlabError, match="NaN or Inf"):
        whitened_svd(Wb, G)
    with pytest.raises(DeftlabError, match="zero trace"):
        cholesky_factor(torch.zeros(IN, IN))
    with pytest.raises(DeftlabError, match="does not match"):
        whitened_svd(W, G[:10, :10])


@pytest.mark.parametrize("lora_rank,scaling", [(4, 2.0), (3, 0.25), (10, 1.0)])
def test_split_for_lora_reproduces_the_truncation(lora_rank, scaling):
    W, X = problem(7)
    dec = whitened_svd(W, X.T @ X)
    theta = 10
    B, A = truncated_factors(dec, theta)
    W_u, W_v, lB, lA = split_for_lora(dec, theta, lora_rank, scaling)
    k = theta - lora_rank
    assert W_u.shape == (OUT, k) and W_v.shape == (k, IN) and lB.shape == (OUT, lora_rank)
    assert lA.shape == (lora_rank, IN)
    merged = W_u.double() @ W_v.double() + scaling * (lB.double() @ lA.double())
    assert torch.allclose(merged, (B.double() @ A.double()), rtol=1e-5, atol=1e-5 * float(B.abs().max()))
    # the LoRA holds exactly the tail components θ−r..θ−1, divided by s
    tail = (dec.U[:, k:theta].double() * dec.sigma[k:theta]) @ dec.Vt_Sinv[k:theta].double()
    assert torch.allclose(scaling * lB.double() @ lA.double(), tail, atol=1e-5 * float(tail.abs().max() + 1))
    assert torch.allclose(lB.double().norm(dim=0) ** 2 * scaling,
                          dec.sigma[k:theta] * dec.U[:, k:theta].double().norm(dim=0) ** 2, rtol=1e-5)


def test_split_for_lora_rank_zero_and_validation():
    W, X = problem(8)
    dec = whitened_svd(W, X.T @ X)
    W_u, W_v, lB, lA = split_for_lora(dec, 7, 0, 2.0)
    assert lB.shape == (OUT, 0) and lA.shape == (0, IN)
    B, A = truncated_factors(dec, 7)
    assert torch.equal(W_u, B) and torch.equal(W_v, A)
    with pytest.raises(DeftlabError, match="lora_rank"):
        split_for_lora(dec, 5, 6, 1.0)
    with pytest.raises(DeftlabError, match="outside"):
        split_for_lora(dec, OUT + 1, 0, 1.0)
    with pytest.raises(DeftlabError, match="scaling"):
        split_for_lora(dec, 5, 2, 0.0)
    with pytest.raises(DeftlabError, match="outside"):
        truncated_factors(dec, -1)


def test_svd_counter_counts_every_svd():
    W, X = problem(9)
    whiten.svd_counter.reset()
    whitened_svd(W, X.T @ X)
    whitened_svd(W, None)
    assert whiten.svd_counter.count == 2
    whiten.svd_counter.reset()
    assert whiten.svd_counter.count == 0


def test_tensors_round_trip_through_safetensors(tmp_path):
    from safetensors.torch import load_file, save_file

    W, X = problem(10, tokens=12)
    dec = whitened_svd(W, X.T @ X)
    tensors, meta = dec.to_tensors()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "d.safetensors"))
    back = Decomposition.from_tensors(load_file(str(tmp_path / "d.safetensors")), meta)
    assert back.whitened and back.jitter == dec.jitter > 0
    assert torch.equal(back.U, dec.U) and torch.equal(back.sigma, dec.sigma) and torch.equal(back.Vt_Sinv, dec.Vt_Sinv)
    with pytest.raises(CacheCorruptError):
        Decomposition.from_tensors({"U": dec.U, "sigma": dec.sigma}, meta)
    with pytest.raises(CacheCorruptError):
        Decomposition.from_tensors({"U": dec.U, "sigma": dec.sigma[:-1], "Vt_Sinv": dec.Vt_Sinv}, meta)


def test_outlier_ratio_counts_entries_above_t_times_mean():
    a = torch.ones(10, 10)
    a[0, :3] = 100.0  # mean = (97 + 300)/100 = 3.97; 5·mean = 19.85 → exactly 3 outliers
    assert outlier_ratio(a) == pytest.approx(0.03)
    assert outlier_ratio(-a) == pytest.approx(0.03)  # absolute values
    assert outlier_ratio(a, threshold=30.0) == 0.0  # 30·3.97 > 100
    with pytest.raises(DeftlabError):
        outlier_ratio(torch.empty(0))
