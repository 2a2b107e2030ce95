"""Tokenisation of task examples: prompt and response tokenised separately, loss on the response only.

Prompt and response are tokenised separately and concatenated (prompt ids + response ids + EOS), so the
prompt/response boundary never depends on a BPE merge across it and matches what generation sees (the model
continues the tokenised prompt). The concatenation is truncated on the right to `cutoff_len`, like LLM-Adapters;
an example left with no response token is dropped (None). Training, generation and OSD's gradients share it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from deftlab.errors import DeftlabError
from deftlab.tasks import Example

IGNORE_INDEX = -100


def pad_id_of(tokenizer) -> int:
    """The tokenizer's pad id, or its EOS id when it has none (padding is masked anyway)."""
    pid = getattr(tokenizer, "pad_token_id", None)
    if pid is None:
        pid = getattr(tokenizer, "eos_token_id", None)
    if pid is None:
        raise DeftlabError("the tokenizer has neither a pad nor an EOS token id", "set tokenizer.pad_token_id")
    return int(pid)


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Prompt ids exactly as training and generation both use them (with the tokenizer's special tokens, e.g. BOS)."""
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def encode_example(tokenizer, example: Example, cutoff_len: int, add_eos: bool = True) -> dict | None:
    """{input_ids, labels} with labels = -100 on the prompt; None when truncation leaves no response token."""
    prompt = encode_prompt(tokenizer, example.prompt)  # "" still gives BOS for tokenizers that add one
    response = list(tokenizer(example.response, add_special_tokens=False)["input_ids"])
    eos = getattr(tokenizer, "eos_token_id", None)
    if add_eos and eos is not None:
        response.append(int(eos))
    ids = (prompt + response)[:cutoff_len]
    labels = ([IGNORE_INDEX] * len(prompt) + response)[:cutoff_len]
    # with an empty prompt and no BOS the first token has no predecessor; the shift in the loss handles that
    if sum(lab != IGNORE_INDEX for lab in labels[1:]) == 0:
        return None
    return {"input_ids": ids, "labels": labels}


@dataclass
class PaddingCollator:
    """Right-pads a batch to its longest example (optionally to a multiple); labels are padded with -100."""

    pad_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: Sequence[dict]) -> dict[str, torch.Tensor]:
        n = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            n = int(math.ceil(n / self.pad_to_multiple_of) * self.pad_to_multiple_of)
        ids = torch.full((len(features), n), self.pad_id, dtype=torch.long)
        labels = torch.full((len(features), n), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(features), n), dtype=torch.long)
        for i, f in enumerate(features):
            k = len(f["input_ids"])
            ids[i, :k] = torch.tensor(f["input_ids"])
            labels[i, :k] = torch.tensor(f["labels"])
            mask[i, :k] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
