"""#Params and #Trainable of DeFT's backbones from shapes alone (meta device), against the paper's Table 1.

The paper prints #Trainable for LoRA/QLoRA at r = 32 (App. C) without naming the target modules; the paper
profile's q,k,v,gate,up,down is the set that reproduces every printed count. Printed precision: #Params to
0.01B, #Trainable to 1M. The paper truncates some counts (LLaMA-65B: 357.83M printed as 357M), so a count
matches when it is within one unit of the printed last digit.
"""

import pytest

from deftlab.adapters.attach import attach
from deftlab.adapters.config import AdapterConfig
from deftlab.models.meta import meta_model
from deftlab.train.profiles import load_profile

# DeFT Table 1 (../shared/papers/deft.txt), #Params (B) and #Trainable (M) of the QLoRA rows
PAPER = [
    ("llama-7b", 6.74, 72),      # Table 1, LLaMA-7B QLoRA
    ("llama2-13b", 13.02, 112),  # Table 1, LLaMA-2 13B QLoRA
    ("llama-65b", 65.29, 357),   # Table 1, LLaMA-65B QLoRA
    ("qwen2.5-7b", 7.62, 74),    # Table 1, Qwen-2.5 7B QLoRA (row printed under the shifted label; App. Table 14)
]


@pytest.mark.parametrize("model,params_b,trainable_m", PAPER)
def test_paper_profile_lora_reproduces_the_printed_trainable_count(model, params_b, trainable_m):
    m = meta_model(model)
    total = sum(p.numel() for p in m.parameters())
    assert abs(total / 1e9 - params_b) < 0.01, f"{model}: {total / 1e9:.3f}B vs printed {params_b}B"
    prof = load_profile("paper")
    assert prof.lora_r == 32
    peft = attach(m, AdapterConfig(kind="lora", init="vanilla", **prof.adapter_kwargs()))
    trainable = sum(p.numel() for p in peft.parameters() if p.requires_grad)
    assert abs(trainable / 1e6 - trainable_m) < 1, f"{model}: {trainable / 1e6:.2f}M vs printed {trainable_m}M"


def test_the_old_targets_miss_the_printed_count():
    """q,k,v,up,down (LLM-Adapters' list) gives 56.1M for LLaMA-7B, not 72M: the check above can fail."""
    kw = {**load_profile("paper").adapter_kwargs(), "target_modules": ("q_proj", "k_proj", "v_proj", "up_proj",
                                                                         "down_proj")}
    peft = attach(meta_model("llama-7b"), AdapterConfig(kind="lora", init="vanilla", **kw))
    trainable = sum(p.numel() for p in peft.parameters() if p.requires_grad)
    assert round(trainable / 1e6, 1) == 56.1
