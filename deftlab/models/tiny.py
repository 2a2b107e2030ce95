"""A tiny randomly initialised LLaMA for fast tests (torchtune-style tiny-model tests)."""

from __future__ import annotations

import torch


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    kw = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA, so k/v shapes differ from q/o as in real models
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    kw.update(overrides)
    return LlamaConfig(**kw)


def tiny_llama(seed: int = 0, **overrides):
    """A LlamaForCausalLM with deterministic random weights (fp32, CPU, eval mode)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**overrides))
    return model.eval()


class TinyTokenizer:
    """Byte-level tokenizer with the HF call surface the trainers and evaluators use.

    ids: 0 pad, 1 bos, 2 eos, 3.. bytes (mod vocab). Enough for tests on generated arithmetic text.
    """

    pad_token_id = 0
    bos_token_id = 1
    eos_token_id = 2

    def __init__(self, vocab_size: int = 128):
        self.vocab_size = vocab_size
        self.padding_side = "right"
        self.pad_token = "<pad>"
        self.eos_token = "</s>"

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [3 + (b % (self.vocab_size - 3)) for b in text.encode("utf-8")]
        return ([self.bos_token_id] if add_special_tokens else []) + ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        out = []
        for i in (ids.tolist() if hasattr(ids, "tolist") else ids):
            if i < 3:
                if not skip_special_tokens:
                    out.append(["<pad>", "<s>", "</s>"][i])
                continue
            out.append(chr(i - 3 + 32) if 32 <= i - 3 + 32 < 127 else "?")
        return "".join(out)

    def batch_decode(self, seqs, skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(s, skip_special_tokens) for s in seqs]

    def __call__(self, texts, return_tensors=None, padding=False, truncation=False, max_length=None,
                 add_special_tokens=True):
        single = isinstance(texts, str)
        batch = [texts] if single else list(texts)
        ids = [self.encode(t, add_special_tokens) for t in batch]
        if truncation and max_length:
            ids = [x[:max_length] for x in ids]
        if padding:
            n = max(len(x) for x in ids)
            left = self.padding_side == "left"
            mask = [[0] * (n - len(x)) + [1] * len(x) if left else [1] * len(x) + [0] * (n - len(x)) for x in ids]
            fill = [[self.pad_token_id] * (n - len(x)) for x in ids]
            ids = [f + x if left else x + f for f, x in zip(fill, ids)]
        else:
            mask = [[1] * len(x) for x in ids]
        if return_tensors == "pt":
            return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}
        if single:
            return {"input_ids": ids[0], "attention_mask": mask[0]}
        return {"input_ids": ids, "attention_mask": mask}
