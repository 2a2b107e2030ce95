"""Batched greedy generation (KV cache, left padding, stop strings) and task evaluation with per-item records.

Differences from LLM-Adapters' evaluate.py (anchors §6), on purpose: greedy decoding with the KV cache and
batches instead of 4-beam search with `use_cache=False` at batch size 1, and outputs are cut at stop strings
("### Instruction", ...) instead of letting the model run on (LLM-Adapters #48). Prompts are sorted by length
so each batch pads little; results come back in the original order.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from deftlab.errors import DeftlabError
from deftlab.manifest import write_json_atomic
from deftlab.tasks.encoding import encode_example, encode_prompt, pad_id_of


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def eos_ids_of(model, tokenizer) -> list[int]:
    """The tokenizer's EOS plus any in the model's generation config (chat models often have several)."""
    ids = []
    for src in (getattr(tokenizer, "eos_token_id", None),
                getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        for t in (src if isinstance(src, (list, tuple)) else [src]):
            if t is not None and int(t) not in ids:
                ids.append(int(t))
    return ids


def find_stop(text: str, stop_strings: Sequence[str]) -> int | None:
    """Index of the earliest stop string in `text`, or None.

    A whitespace-only stop (e.g. "\\n") counts only after the first non-whitespace character, so an output that
    starts with a newline is not cut to nothing.
    """
    start = len(text) - len(text.lstrip())
    best = None
    for s in stop_strings:
        if not s:
            continue
        i = text.find(s, start if not s.strip() else 0)
        if i >= 0 and (best is None or i < best):
            best = i
    return best


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    i = find_stop(text, stop_strings)
    return text if i is None else text[:i]


class _StopOnStrings:
    """Per-row stopping criterion for HF generate: decodes each row's recent new tokens and looks for a stop."""

    def __init__(self, tokenizer, stop_strings: Sequence[str], prompt_len: int, batch: int):
        self.tokenizer, self.stops, self.prompt_len = tokenizer, [s for s in stop_strings if s], prompt_len
        # a stop string of c characters spans at most c tokens (+ slack for tokens that decode to nothing)
        self.window = max((len(s) for s in self.stops), default=0) + 8
        self.done_at = [None] * batch  # number of new tokens when the stop appeared

    def __call__(self, input_ids: torch.LongTensor, scores=None, **kwargs) -> torch.BoolTensor:
        if not self.stops:
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        n_new = input_ids.shape[1] - self.prompt_len
        # decode from the start while short (whitespace-only stops need the leading context), else a window
        windowed = n_new > 2 * self.window
        rows = input_ids[:, -self.window:] if windowed else input_ids[:, self.prompt_len:]
        for i, ids in enumerate(rows.tolist()):  # one device→host copy per step
            if self.done_at[i] is None:
                text = self.tokenizer.decode(ids, skip_special_tokens=True)
                if any(s in text for s in self.stops) if windowed else find_stop(text, self.stops) is not None:
                    self.done_at[i] = n_new
        return torch.tensor([d is not None for d in self.done_at], dtype=torch.bool, device=input_ids.device)


@torch.inference_mode()
def generate_ids(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int, batch_size: int = 8,
                 stop_strings: Sequence[str] = (), progress: bool = True, desc: str = "generate",
                 num_beams: int = 1) -> list[list[int]]:
    """Greedy (num_beams 1) or beam-search continuations as new-token id lists, cut after EOS or the step a stop
    string appeared. Beam search (LLM-Adapters' protocol) runs without the per-row stop criterion, whose rows
    are the batch's, not its beams'; callers cut the decoded text at the stop strings instead."""
    if num_beams < 1:
        raise DeftlabError(f"num_beams must be positive, got {num_beams}")
    if max_new_tokens < 1:
        raise DeftlabError(f"max_new_tokens must be positive, got {max_new_tokens}")
    if batch_size < 1:
        raise DeftlabError(f"batch_size must be positive, got {batch_size}")
    from transformers import GenerationConfig, StoppingCriteriaList

    device = _model_device(model)
    pad_id = pad_id_of(tokenizer)
    eos_ids = eos_ids_of(model, tokenizer)
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))  # longest first: any OOM shows at once
    results: list[list[int] | None] = [None] * len(encoded)
    was_training = model.training
    model.eval()
    gen_cfg = GenerationConfig(do_sample=False, num_beams=num_beams, max_new_tokens=max_new_tokens,
                               pad_token_id=pad_id, eos_token_id=eos_ids or None, use_cache=True)
    bar = tqdm(total=len(encoded), desc=desc, disable=not progress, unit="ex")
    try:
        for b in range(0, len(order), batch_size):
            idx = order[b : b + batch_size]
            n = max(len(encoded[i]) for i in idx)
            ids = torch.full((len(idx), n), pad_id, dtype=torch.long)
            mask = torch.zeros((len(idx), n), dtype=torch.long)
            for r, i in enumerate(idx):  # LEFT padding: the last prompt token of every row sits at column n-1
                ids[r, n - len(encoded[i]):] = torch.tensor(encoded[i])
                mask[r, n - len(encoded[i]):] = 1
            stopper = _StopOnStrings(tokenizer, stop_strings if num_beams == 1 else (), n, len(idx))
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=gen_cfg,
                                 stopping_criteria=StoppingCriteriaList([stopper]))
            new = out[:, n:].tolist()
            for r, i in enumerate(idx):
                row = new[r]
                if stopper.done_at[r] is not None:
                    row = row[: stopper.done_at[r]]
                ends = [k for k, t in enumerate(row) if t in eos_ids]
                if ends:
                    row = row[: ends[0]]
                results[i] = row
            bar.update(len(idx))
    finally:
        bar.close()
        if was_training:
            model.train()
    return results  # type: ignore[return-value]


def generate(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int, batch_size: int = 8,
             stop_strings: Sequence[str] = (), progress: bool = True, desc: str = "generate") -> list[str]:
    """Greedy continuations of `prompts` as text, cut at the first stop string (and at EOS)."""
    ids = generate_ids(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                       stop_strings=stop_strings, progress=progress, desc=desc)
    return [cut_at_stop(tokenizer.decode(r, skip_special_tokens=True), stop_strings) for r in ids]


@torch.inference_mode()
def response_nll(model, tokenizer, examples, *, cutoff_len: int, batch_size: int = 8,
                 progress: bool = True) -> list[dict]:
    """Per-example summed NLL and token count of the response tokens (used for the text task's perplexity)."""
    device = _model_device(model)
    pad_id = pad_id_of(tokenizer)
    enc = [encode_example(tokenizer, ex, cutoff_len) for ex in examples]
    rows: list[dict] = []
    was_training = model.training
    model.eval()
    for b in tqdm(range(0, len(enc), batch_size), desc="nll", disable=not progress):
        chunk = enc[b : b + batch_size]
        valid = [e for e in chunk if e is not None]
        stats = {}
        if valid:
            n = max(len(e["input_ids"]) for e in valid)
            ids = torch.full((len(valid), n), pad_id, dtype=torch.long)
            labels = torch.full((len(valid), n), -100, dtype=torch.long)
            mask = torch.zeros((len(valid), n), dtype=torch.long)
            for r, e in enumerate(valid):
                ids[r, : len(e["input_ids"])] = torch.tensor(e["input_ids"])
                labels[r, : len(e["labels"])] = torch.tensor(e["labels"])
                mask[r, : len(e["input_ids"])] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
            lp = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels[:, 1:].to(device),
                                                   ignore_index=-100, reduction="none")
            tok = (labels[:, 1:] != -100).sum(1)
            for r, e in enumerate(valid):
                stats[id(e)] = (float(lp[r].sum()), int(tok[r]))
        for e in chunk:
            nll, tok = stats.get(id(e), (0.0, 0)) if e is not None else (0.0, 0)
            if not math.isfinite(nll):
                raise DeftlabError("non-finite loss while computing perplexity", "check the model's dtype/weights")
            rows.append({"nll": nll, "tokens": tok})
    if was_training:
        model.train()
    return rows


def _answer_nll(model, tokenizer, examples, lines: list[dict], cutoff_len: int, batch_size: int,
                progress: bool) -> dict:
    """NLL per reference-answer token over the examples that have a reference (all, and the non-overlapping ones);
    each prediction line gets its own answer_nll / answer_tokens."""
    idx = [i for i, e in enumerate(examples) if e.response]
    rows = response_nll(model, tokenizer, [examples[i] for i in idx], cutoff_len=cutoff_len, batch_size=batch_size,
                        progress=progress)
    out: dict = {}
    for part, keep in (("", lambda line: True), ("_non_overlap", lambda line: not line.get("overlaps_train", False))):
        chosen = [r for i, r in zip(idx, rows) if keep(lines[i])]
        tokens = sum(r["tokens"] for r in chosen)
        out[f"answer_nll{part}"] = sum(r["nll"] for r in chosen) / tokens if tokens else None
        out[f"answer_tokens{part}"] = tokens
    for i, r in zip(idx, rows):
        lines[i].update(answer_nll=r["nll"] / r["tokens"] if r["tokens"] else None, answer_tokens=r["tokens"])
    return out


def _jsonable(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return str(v)


def evaluate_task(model, tokenizer, task, dataset_name: str, *, limit: int | None = None, batch_size: int = 8,
                  out_dir: str | os.PathLike, max_new_tokens: int | None = None, cutoff_len: int = 1024,
                  progress: bool = True, num_beams: int = 1, answer_nll: bool = False) -> dict:
    """Evaluate `task` on `dataset_name`; write every prediction and the metrics; return the metrics.

    Files: <out_dir>/<dataset>.predictions.jsonl (one line per item: index, question, gold, output (cut at
    the first stop string), raw_output (as generated), extracted, correct [, overlaps_train]) and
    <out_dir>/<dataset>.metrics.json. Generative tasks use greedy decoding (or `num_beams`-beam search) with the
    task's stop strings; the text task reports perplexity over its held-out documents. answer_nll=True adds the
    teacher-forced NLL per token of the reference answers (answer_nll, and answer_nll_non_overlap on the items
    that do not overlap the training questions), a loss that still orders models whose accuracies are near 0.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    examples = task.eval_examples(dataset_name, limit)
    if not examples:
        raise DeftlabError(f"eval set '{dataset_name}' of task '{task.name}' is empty")
    t0 = time.perf_counter()
    if task.generative:
        mnt = max_new_tokens or task.max_new_tokens
        ids = generate_ids(model, tokenizer, [e.prompt for e in examples], max_new_tokens=mnt,
                           batch_size=batch_size, stop_strings=task.stop_strings, progress=progress,
                           desc=f"{task.name}/{dataset_name}", num_beams=num_beams)
        seconds = time.perf_counter() - t0
        raw = [tokenizer.decode(r, skip_special_tokens=True) for r in ids]
        outputs = [cut_at_stop(r, task.stop_strings) for r in raw]  # what scoring sees
        items, metrics = task.score(dataset_name, examples, outputs)
        lines = [{"index": i, "question": e.question, "gold": e.gold, "output": o, "raw_output": r, **it}
                 for i, (e, o, r, it) in enumerate(zip(examples, outputs, raw, items, strict=True))]
        if answer_nll:
            metrics.update(_answer_nll(model, tokenizer, examples, lines, cutoff_len, batch_size, progress))
        new_tokens = sum(len(r) for r in ids)
        metrics.update({"max_new_tokens": mnt, "generation_seconds": seconds,
                        "new_tokens_per_s": new_tokens / seconds if seconds > 0 else None,
                        "decoding": ("greedy" if num_beams == 1 else f"beam search ({num_beams} beams)")
                        + ", KV cache, left padding", "stop_strings": list(task.stop_strings)})
    else:
        rows = response_nll(model, tokenizer, examples, cutoff_len=cutoff_len, batch_size=batch_size,
                            progress=progress)
        tokens = sum(r["tokens"] for r in rows)
        if tokens == 0:
            raise DeftlabError(f"no tokens to score in '{dataset_name}'", "check the eval texts and cutoff_len")
        nll = sum(r["nll"] for r in rows) / tokens
        metrics = {"n": len(examples), "tokens": tokens, "nll": nll, "perplexity": math.exp(nll),
                   "cutoff_len": cutoff_len, "seconds": time.perf_counter() - t0}
        lines = [{"index": i, **r} for i, r in enumerate(rows)]
    metrics.update({"task": task.name, "dataset": dataset_name, "limit": limit})
    pred_path = out_dir / f"{dataset_name}.predictions.jsonl"
    tmp = pred_path.with_name(f".{pred_path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        for line in lines:
            f.write(json.dumps({k: _jsonable(v) for k, v in line.items()}, ensure_ascii=False) + "\n")
    os.replace(tmp, pred_path)
    write_json_atomic(out_dir / f"{dataset_name}.metrics.json", {k: v for k, v in metrics.items()})
    return metrics


def evaluate_sets(model, tokenizer, task, out_dir: str | os.PathLike, *, eval_sets: Sequence[str] | None = None,
                  limit: int | None = None, batch_size: int = 8, max_new_tokens: int | None = None,
                  cutoff_len: int = 1024, progress: bool = True, reuse: bool = False,
                  num_beams: int = 1, answer_nll: bool = False) -> dict[str, dict]:
    """`evaluate_task` on every eval set (default: the task's), plus <out_dir>/metrics.json with all of them.

    reuse=True keeps each set whose <set>.metrics.json an earlier attempt wrote into `out_dir` (a resumed run
    evaluates only the sets it had not finished). Arguments map onto a training profile's eval_sets,
    eval_limit, eval_batch_size, max_new_tokens, cutoff_len, num_beams and answer_nll.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in eval_sets or task.default_eval_sets:
        path = out_dir / f"{name}.metrics.json"
        if reuse and path.is_file():
            try:
                results[name] = json.loads(path.read_text())
                continue
            except json.JSONDecodeError:
                pass  # a torn write cannot happen (atomic), but an edited file can: evaluate again
        results[name] = evaluate_task(model, tokenizer, task, name, limit=limit, batch_size=batch_size,
                                      out_dir=out_dir, max_new_tokens=max_new_tokens, cutoff_len=cutoff_len,
                                      progress=progress, num_beams=num_beams, answer_nll=answer_nll)
    write_json_atomic(out_dir / "metrics.json", results)
    return results
