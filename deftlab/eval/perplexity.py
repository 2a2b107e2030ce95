"""Perplexity over fixed-length, non-overlapping windows (SVD-LLM / OWL / ASVD convention).

The text is tokenised once, cut into windows of `seqlen` tokens; NLL is averaged over every predicted token.
A non-finite loss raises instead of being dropped (SVD-LLM silently drops such batches, which biases PPL).
`max_tokens` evaluates a fixed prefix, which small presets use and report.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from deftlab.errors import DeftlabError


@dataclass
class PerplexityResult:
    ppl: float
    nll: float
    tokens: int  # predicted tokens
    windows: int
    seqlen: int
    total_tokens: int  # tokens in the whole text
    prefix: bool  # True when only a prefix (max_tokens) was evaluated
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def tokenize_corpus(tokenizer, text: str) -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    return ids[0] if ids.dim() == 2 else ids


@torch.inference_mode()
def perplexity(model, input_ids: torch.Tensor, *, seqlen: int = 2048, batch_size: int = 1,
               max_tokens: int | None = None, progress: bool = True, desc: str = "perplexity") -> PerplexityResult:
    """PPL of `model` on a 1-D token tensor."""
    t0 = time.time()
    total = int(input_ids.numel())
    usable = total if max_tokens is None else min(total, max_tokens)
    n_windows = usable // seqlen
    if n_windows == 0:
        seqlen, n_windows = usable, 1  # short text: one window
    if seqlen < 2:
        raise DeftlabError("text too short for perplexity (fewer than 2 tokens)")
    windows = input_ids[: n_windows * seqlen].view(n_windows, seqlen)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll_sum, count = 0.0, 0
    bar = tqdm(range(0, n_windows, batch_size), desc=desc, disable=not progress, unit="win")
    for start in bar:
        batch = windows[start : start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits
        shift = logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(shift.reshape(-1, shift.size(-1)), batch[:, 1:].reshape(-1),
                                                 reduction="sum")
        if not torch.isfinite(loss):
            raise DeftlabError(f"non-finite loss in perplexity window {start}",
                               "the model produces NaN/Inf (check the decomposition or dtype)")
        nll_sum += loss.item()
        count += batch[:, 1:].numel()
        bar.set_postfix(ppl=f"{math.exp(nll_sum / count):.3f}")
    if was_training:
        model.train()
    nll = nll_sum / count
    return PerplexityResult(ppl=math.exp(nll), nll=nll, tokens=count, windows=n_windows, seqlen=seqlen,
                            total_tokens=total, prefix=n_windows * seqlen < total, seconds=time.time() - t0)
