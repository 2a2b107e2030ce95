"""Perplexity over fixed-length, non-overlapping windows (SVD-LLM / OWL / ASVD convention).

The text is tokenised once, cut into windows of `seqlen` tokens; NLL is averaged over every predicted token.
A non-finite loss raises instead of being dropped (SVD-LLM silently drops such batches, which biases PPL).
`max_tokens` evaluates a fixed prefix, which small presets use and report.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from deftlab.errors import DeftlabError
from deftlab.eval.corpora import corpus_text
from deftlab.manifest import write_json_atomic


@dataclass(frozen=True)
class PerplexityConfig:
    """ppl: the corpora (deftlab.eval.corpora) whose perplexity a run reports as ppl_<corpus>; ppl_max_tokens:
    evaluate only that many leading tokens (None: all); ppl_seqlen: window length; ppl_batch_size: windows per
    forward pass."""

    ppl: tuple[str, ...] = ()
    ppl_max_tokens: int | None = 8192
    ppl_seqlen: int = 2048
    ppl_batch_size: int = 1

    def validate(self) -> None:
        for name in ("ppl_max_tokens", "ppl_seqlen", "ppl_batch_size"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise DeftlabError(f"{name} must be positive, got {v}", f"set {name} above 0, or leave it unset")


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


def corpus_perplexities(model, tokenizer, cfg: PerplexityConfig, *, data_dir=None, progress: bool = True,
                        record: Path | None = None, corpora=None) -> dict:
    """ppl_<corpus>, ppl_<corpus>_tokens, ppl_<corpus>_prefix for each of cfg.ppl (or `corpora`), measured with
    `text_perplexities` (so `record` makes a resumed run reuse what it measured)."""
    corpora = list(cfg.ppl if corpora is None else corpora)
    texts = {c: (lambda c=c: corpus_text(c, data_dir)) for c in corpora}
    return text_perplexities(model, tokenizer, cfg, texts, progress=progress, record=record)


def text_perplexities(model, tokenizer, cfg: PerplexityConfig, texts: dict[str, Callable[[], str]], *,
                      progress: bool = True, record: Path | None = None) -> dict:
    """ppl_<name>, ppl_<name>_tokens, ppl_<name>_prefix for each named text (a callable, built only if needed),
    windowed and capped as `cfg` says.

    With `record` (a JSON file in the run directory) texts already measured there are reused and new ones added,
    so a resumed run does not measure them again."""
    out: dict = {}
    if record is not None and record.is_file():
        try:
            out = json.loads(record.read_text())
        except json.JSONDecodeError:
            out = {}
    for name, make_text in texts.items():
        if f"ppl_{name}" in out:
            continue
        ids = tokenize_corpus(tokenizer, make_text())
        r = perplexity(model, ids, seqlen=cfg.ppl_seqlen, batch_size=cfg.ppl_batch_size,
                       max_tokens=cfg.ppl_max_tokens, progress=progress, desc=f"ppl {name}")
        out.update({f"ppl_{name}": r.ppl, f"ppl_{name}_tokens": r.tokens, f"ppl_{name}_prefix": r.prefix})
        if record is not None:
            write_json_atomic(record, out)
    wanted = {f"ppl_{n}{suffix}" for n in texts for suffix in ("", "_tokens", "_prefix")}
    return {k: v for k, v in out.items() if k in wanted}
