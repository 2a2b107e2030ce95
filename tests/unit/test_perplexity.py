import math

import pytest
import torch

from deftlab.errors import DeftlabError
from deftlab.eval.perplexity import perplexity
from deftlab.models.tiny import tiny_llama


class ConstLogits(torch.nn.Module):
    """Uniform next-token distribution over V tokens: PPL must be exactly V."""

    def __init__(self, vocab, value=0.0):
        super().__init__()
        self.vocab, self.value = vocab, value
        self.p = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, use_cache=False):
        out = torch.full((*input_ids.shape, self.vocab), self.value) + 0 * self.p
        return type("O", (), {"logits": out})


def test_uniform_model_has_ppl_equal_vocab():
    ids = torch.randint(0, 50, (1000,))
    r = perplexity(ConstLogits(50), ids, seqlen=128, progress=False)
    assert r.ppl == pytest.approx(50, rel=1e-5)
    assert r.windows == 7 and r.tokens == 7 * 127 and r.prefix


def test_prefix_and_batching_agree():
    model = tiny_llama()
    ids = torch.randint(3, 128, (600,))
    a = perplexity(model, ids, seqlen=100, batch_size=1, progress=False)
    b = perplexity(model, ids, seqlen=100, batch_size=4, progress=False)
    assert a.ppl == pytest.approx(b.ppl, rel=1e-5)
    c = perplexity(model, ids, seqlen=100, max_tokens=200, progress=False)
    assert c.windows == 2 and c.prefix
    assert math.isfinite(c.ppl) and c.ppl != a.ppl


def test_nonfinite_loss_raises():
    with pytest.raises(DeftlabError, match="non-finite"):
        perplexity(ConstLogits(10, value=float("nan")), torch.randint(0, 10, (64,)), seqlen=32, progress=False)
