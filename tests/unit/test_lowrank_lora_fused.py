"""The fused DeFT + LoRA forward/backward ([W_u | s·B]([W_v; A] x)) against the unfused computation."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig
from peft.tuners.lora.layer import Linear as PeftLoraLinear

from deftlab.adapters import AdapterConfig, attach
from deftlab.adapters.lowrank_lora import LowRankLoraLinear
from deftlab.models.registry import get_spec
from deftlab.surgery.lowrank import LowRankLinear
from deftlab.surgery.synthetic import synthetic_model

IN, OUT, K, R, ALPHA = 24, 20, 7, 4, 16.0


def layer(dropout=0.0, bias=True, rank=K, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = LowRankLinear.from_factors(torch.randn(OUT, rank, generator=g, dtype=dtype),
                                      torch.randn(rank, IN, generator=g, dtype=dtype),
                                      torch.randn(OUT, generator=g, dtype=dtype) if bias else None,
                                      requires_grad=False)
    cfg = LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=dropout, init_lora_weights=False)
    lay = LowRankLoraLinear(base, "default", config=cfg, r=R, lora_alpha=ALPHA, lora_dropout=dropout)
    with torch.no_grad():  # B ≠ 0, so a wrong B, A or scaling shows in every output
        lay.lora_A["default"].weight.copy_(torch.randn(R, IN, generator=g, dtype=dtype))
        lay.lora_B["default"].weight.copy_(torch.randn(OUT, R, generator=g, dtype=dtype))
    return lay.to(dtype).train()


def run(lay, x, fused, seed=1):
    """Output and gradients of x, A, B for loss = Σ y·w (w fixed random), on the fused or the plain path."""
    LowRankLoraLinear.fused = fused
    try:
        x = x.detach().clone().requires_grad_(True)
        torch.manual_seed(seed)  # the same dropout mask on both paths
        y = lay(x)
        w = torch.randn(y.shape, generator=torch.Generator().manual_seed(2), dtype=y.dtype)
        (y * w).sum().backward()
        A, B = lay.lora_A["default"].weight, lay.lora_B["default"].weight
        out = y.detach(), x.grad, A.grad.clone(), B.grad.clone()
        A.grad = B.grad = None
        return out
    finally:
        LowRankLoraLinear.fused = True


def explicit(lay, x):
    """y = W_u W_v x + b + s B A x, written out (dropout 0)."""
    base = lay.get_base_layer()
    y = x @ base.v_proj.weight.T @ base.u_proj.weight.T
    if base.u_proj.bias is not None:
        y = y + base.u_proj.bias
    return y + lay.scaling["default"] * (x @ lay.lora_A["default"].weight.T @ lay.lora_B["default"].weight.T)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rank", [K, 0])
def test_fused_matches_plain_and_explicit_forward_and_backward(bias, rank):
    lay = layer(bias=bias, rank=rank)
    x = torch.randn(3, 5, IN, dtype=torch.float64)
    assert lay._fusable(x, (), {}) == "default"
    fused, plain = run(lay, x, True), run(lay, x, False)
    torch.testing.assert_close(fused[0], explicit(lay, x), rtol=1e-12, atol=1e-12)
    for f, p in zip(fused, plain):  # output, dx, dA, dB
        torch.testing.assert_close(f, p, rtol=1e-12, atol=1e-12)


def _flops(lay, x, fused):
    from torch.utils.flop_counter import FlopCounterMode

    LowRankLoraLinear.fused = fused
    try:
        with FlopCounterMode(display=False) as fc:
            lay(x.detach().clone().requires_grad_(True)).sum().backward()
    finally:
        LowRankLoraLinear.fused = True
    return fc.get_total_flops()


def test_fused_does_the_unfused_work_and_never_runs_the_plain_forward(monkeypatch):
    lay, n = layer(), 6
    x = torch.randn(n, IN, dtype=torch.float64)
    plain = _flops(lay, x, False)
    # forward: [W_v; A] x and [W_u | s·B] h; backward: dh, dB, dA, dx; no gradients for the frozen factors
    macs = n * (K + R) * IN + n * (K + R) * OUT + n * OUT * (K + R) + OUT * n * R + R * n * IN + n * (K + R) * IN
    assert plain == 2 * macs
    monkeypatch.setattr(PeftLoraLinear, "forward", lambda *a, **k: pytest.fail("plain path taken"))
    assert _flops(lay, x, True) == 2 * macs


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_fused_with_dropout_matches_plain(dtype, tol):
    lay = layer(dropout=0.5, dtype=dtype)
    x = torch.randn(4, 9, IN, dtype=dtype)
    assert lay._fusable(x, (), {}) == "default"
    for f, p in zip(run(lay, x, True), run(lay, x, False)):
        torch.testing.assert_close(f, p, rtol=tol, atol=tol)
    # eval mode: dropout returns x itself, and the first product is fused too
    lay.eval()
    with torch.no_grad():
        torch.testing.assert_close(lay(x), explicit(lay, x), rtol=tol, atol=tol)


def test_frozen_b_and_input_without_grad():
    lay = layer()
    lay.lora_B["default"].weight.requires_grad_(False)
    x = torch.randn(5, IN, dtype=torch.float64)  # e.g. the first layer after frozen embeddings
    lay(x).sum().backward()
    assert lay.lora_B["default"].weight.grad is None and lay.lora_A["default"].weight.grad is not None


def test_fallbacks_take_the_plain_path():
    lay = layer()
    x = torch.randn(5, IN, dtype=torch.float64)
    with torch.no_grad():
        y = lay(x)
        lay.merge()
        assert lay._fusable(x, (), {}) is None
        torch.testing.assert_close(lay(x), y, rtol=1e-10, atol=1e-10)
        lay.unmerge()
        assert lay._fusable(x, (), {}) == "default"
        with _disabled(lay):
            assert lay._fusable(x, (), {}) is None
            torch.testing.assert_close(lay(x), lay.get_base_layer()(x))
    assert lay._fusable(x.float(), (), {}) is None  # mixed dtypes: PEFT casts
    lay.get_base_layer().u_proj.weight.requires_grad_(True)  # trainable factors need their own gradients
    assert lay._fusable(x, (), {}) is None
    lay.get_base_layer().u_proj.weight.requires_grad_(False)
    LowRankLoraLinear.fused = False
    try:
        assert lay._fusable(x, (), {}) is None
    finally:
        LowRankLoraLinear.fused = True


class _disabled:
    def __init__(self, lay):
        self.lay = lay

    def __enter__(self):
        self.lay.enable_adapters(False)

    def __exit__(self, *exc):
        self.lay.enable_adapters(True)


def test_4bit_factors_fall_back_to_the_plain_path():
    from deftlab.surgery.quantize import to_linear4bit

    lay = layer(dtype=torch.float32)
    base = lay.get_base_layer()
    base.u_proj, base.v_proj = to_linear4bit(base.u_proj), to_linear4bit(base.v_proj)
    x = torch.randn(5, IN)
    assert lay._fusable(x, (), {}) is None
    lay(x.requires_grad_(True)).sum().backward()
    assert lay.lora_A["default"].weight.grad is not None


def _model(dropout):
    model = synthetic_model(get_spec("tiny").arch, keep_linears=0.5, seed=0)
    pm = attach(model, AdapterConfig(kind="lora", init="vanilla", r=R, alpha=ALPHA, dropout=dropout,
                                     target_modules=("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj",
                                                     "down_proj")))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return pm.train()


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_whole_model_training_gradients_match_plain_path(dropout):
    pm = _model(dropout)
    layers = [m for m in pm.modules() if isinstance(m, LowRankLoraLinear)]
    assert layers
    ids = torch.randint(3, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    res = {}
    for fused in (True, False):
        LowRankLoraLinear.fused = fused
        try:
            torch.manual_seed(1)
            out = pm(input_ids=ids, labels=ids)
            out.loss.backward()
        finally:
            LowRankLoraLinear.fused = True
        res[fused] = out.logits.detach(), {n: p.grad for n, p in pm.named_parameters() if p.grad is not None}
        pm.zero_grad(set_to_none=True)
    torch.testing.assert_close(res[True][0], res[False][0], rtol=1e-5, atol=1e-5)
    assert res[True][1].keys() == res[False][1].keys() and len(res[True][1]) == 2 * 6 * 2  # A, B × 6 × 2 layers
    for n, g in res[True][1].items():
        ref = res[False][1][n]
        assert ((g - ref).norm() / ref.norm()).item() < 1e-5, n
