"""Fine-tuning tasks: how to build (prompt, response) training examples, the eval sets, and how to score outputs.

A task never tokenises; `deftlab.train.datamodule` turns examples into ids with the loss on the response only,
and `deftlab.eval.generate` runs generation and calls `Task.score`.
"""

from __future__ import annotations

from typing import Callable

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Example:
    """One example. `response` is the training target (EOS is appended by the tokenisation, not here)."""

    prompt: str
    response: str
    gold: Any = None  # what scoring compares against (number string, option letter, boxed answer, summary)
    question: str = ""  # the raw question, written to prediction files and used for train/test overlap
    meta: dict = field(default_factory=dict)


class Task:
    """Base class. Subclasses set the class attributes and implement the three methods."""

    name: str = "task"
    metric: str = "accuracy"  # "accuracy" | "rouge" | "perplexity"
    generative: bool = True  # False → evaluated by loss (perplexity), not by generation
    default_eval_sets: tuple[str, ...] = ()
    max_new_tokens: int = 256
    stop_strings: tuple[str, ...] = ()

    def train_examples(self) -> list[Example]:
        raise NotImplementedError

    def eval_examples(self, dataset_name: str, limit: int | None = None) -> list[Example]:
        raise NotImplementedError

    def score(self, dataset_name: str, examples: list[Example], outputs: list[str]) -> tuple[list[dict], dict]:
        """(per-item {extracted, correct}, aggregate metrics) for generated `outputs`."""
        raise NotImplementedError

    def describe(self) -> dict:
        return {"name": self.name, "metric": self.metric, "eval_sets": list(self.default_eval_sets),
                "max_new_tokens": self.max_new_tokens, "stop_strings": list(self.stop_strings)}


class SplitTask(Task):
    """A task whose data comes in named splits read by `_load(split)` (or an injected `source`), cached per split."""

    def __init__(self, *, train_split: str = "train", eval_sets: tuple[str, ...] | None = None,
                 max_new_tokens: int | None = None, source: Callable[[str], object] | None = None,
                 data_dir=None):
        self.train_split = train_split
        self.data_dir = data_dir
        self._source = source or self._load
        if eval_sets:
            self.default_eval_sets = tuple(eval_sets)
        if max_new_tokens:
            self.max_new_tokens = max_new_tokens
        self._cache: dict[str, list[dict]] = {}

    def _load(self, split: str):
        raise NotImplementedError

    def records(self, split: str) -> list[dict]:
        if split not in self._cache:
            self._cache[split] = records_of(self._source(split))
        return self._cache[split]


def records_of(obj) -> list[dict]:
    """Loaders return either a list of records or an object with `.records`; accept both."""
    recs = getattr(obj, "records", obj)
    return list(recs)


def first_n(items: list, limit: int | None) -> list:
    """Deterministic eval subset: the first `limit` items (None or <= 0 → all)."""
    return items if limit is None or limit <= 0 else items[:limit]


from deftlab.tasks.registry import TASKS, get_task, task_names  # noqa: E402  (after the base classes)

__all__ = ["Example", "Task", "SplitTask", "TASKS", "get_task", "task_names", "records_of", "first_n"]
