"""CUDA checks, run by the GPU kit (tools/gpu_check.py: `pytest -m cuda`); skipped where there is no GPU."""

import pytest
import torch

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_bf16_forward_matches_fp32():
    from deftlab.models.tiny import tiny_llama

    m = tiny_llama().cuda()
    ids = torch.randint(3, 128, (2, 16), device="cuda")
    ref = m(input_ids=ids).logits.float()
    got = m.to(torch.bfloat16)(input_ids=ids).logits.float()
    assert (got - ref).abs().max() / ref.abs().max() < 0.05


def test_nf4_factors_on_cuda_reconstruct_the_product():
    from deftlab.surgery.lowrank import LowRankLinear
    from deftlab.surgery.quantize import is_4bit, quantize_lowrank

    torch.manual_seed(0)
    lr = LowRankLinear(256, 512, 64).cuda()
    x = torch.randn(8, 256, device="cuda")
    ref = lr(x)
    wrapper = torch.nn.Sequential(lr)
    quantize_lowrank(wrapper, compute_dtype=torch.bfloat16)
    assert is_4bit(lr.u_proj) and is_4bit(lr.v_proj)
    got = lr(x.bfloat16()).float()
    assert (got - ref).norm() / ref.norm() < 0.2  # NF4's rounding on both factors


def test_peft_loftq_initialises_on_cuda():
    from deftlab.adapters.attach import attach
    from deftlab.adapters.config import AdapterConfig
    from deftlab.models.tiny import tiny_llama

    m = tiny_llama(hidden_size=128, intermediate_size=256, num_attention_heads=4).cuda()
    peft = attach(m, AdapterConfig(kind="loftq", r=8, alpha=16, target_modules=("q_proj", "v_proj")))
    assert any("lora_A" in n and p.requires_grad for n, p in peft.named_parameters())


def test_memory_accounting_and_the_planners_nf4_weights():
    from deftlab.models.registry import get_spec
    from deftlab.planner.architecture import load_architecture
    from deftlab.planner.memory import TrainSetup, weight_bytes
    from deftlab.surgery.synthetic import synthetic_model

    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    block = torch.empty(2 ** 20, dtype=torch.float32, device="cuda")
    assert torch.cuda.memory_allocated() - before >= 4 * 2 ** 20
    del block
    before = torch.cuda.memory_allocated()
    model = synthetic_model(get_spec("smollm2-135m").arch, device="cuda", dtype=torch.bfloat16, quantize=True)
    got = torch.cuda.memory_allocated() - before
    want = sum(weight_bytes(load_architecture("smollm2-135m"), TrainSetup("qlora", 1, 1)).values())
    assert abs(got / want - 1) < 0.05, (got, want)
    del model
