"""Reading a run's per-item prediction files (eval/<set>.predictions.jsonl), e.g. to pair two runs' answer losses
item by item."""

from __future__ import annotations

import json
from pathlib import Path

SUFFIX = ".predictions.jsonl"


def answer_losses(eval_dir: str | Path, metric: str = "answer_nll") -> dict[tuple[str, int], tuple[float, int]]:
    """{(set, index): (summed answer NLL, answer tokens)} behind a recorded answer-NLL metric.

    `metric` is one the finetune recipe reports: answer_nll (every set), answer_nll_<set> (set name lower-cased,
    e.g. answer_nll_svamp), either with _non_overlap (only items whose question does not overlap the training
    data). Items without a scored reference are left out; an empty dict when the run kept no prediction files."""
    name = metric.lower()
    if not name.startswith("answer_nll"):
        raise ValueError(f"{metric} is not an answer-NLL metric")
    non_overlap = name.endswith("_non_overlap")
    name = name.removesuffix("_non_overlap")
    wanted = name[len("answer_nll_"):] if name != "answer_nll" else None
    out: dict[tuple[str, int], tuple[float, int]] = {}
    d = Path(eval_dir)
    if not d.is_dir():
        return out
    for path in sorted(d.glob("*" + SUFFIX)):
        set_name = path.name[:-len(SUFFIX)].lower()
        if wanted is not None and set_name != wanted:
            continue
        with path.open() as f:
            for line in f:
                row = json.loads(line)
                nll, tokens = row.get("answer_nll"), row.get("answer_tokens")
                if not isinstance(nll, (int, float)) or not tokens:
                    continue
                if non_overlap and row.get("overlaps_train", False):
                    continue
                out[(set_name, int(row["index"]))] = (float(nll) * int(tokens), int(tokens))
    return out


def text_losses(eval_dir: str | Path, dataset: str = "heldout") -> dict[tuple[str, int], tuple[float, int]]:
    """{(set, index): (summed NLL, tokens)} of each document behind a text task's perplexity (ppl_<set>);
    an empty dict when the run kept no prediction file."""
    path = Path(eval_dir) / f"{dataset}{SUFFIX}"
    out: dict[tuple[str, int], tuple[float, int]] = {}
    if not path.is_file():
        return out
    with path.open() as f:
        for line in f:
            row = json.loads(line)
            if isinstance(row.get("nll"), (int, float)) and row.get("tokens"):
                out[(dataset, int(row["index"]))] = (float(row["nll"]), int(row["tokens"]))
    return out


def item_losses(eval_dir: str | Path, metric: str) -> dict[tuple[str, int], tuple[float, int]]:
    """Per-item (summed NLL, tokens) behind `metric`: answer_nll[...] (answer_losses) or ppl_heldout (text_losses,
    whose log-perplexity is the token-weighted mean NLL)."""
    name = metric.lower()
    if name.startswith("ppl_"):
        return text_losses(eval_dir, name[len("ppl_"):])
    return answer_losses(eval_dir, metric)
