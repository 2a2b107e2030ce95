"""XSum summarisation: "original text: {document}" / "summary: {summary}", scored with ROUGE-1/2/L.

Documents are cut to `max_document_words` words (train and eval alike) so the summary survives `cutoff_len`
truncation; the cut is recorded in each example's meta. Generation stops at the first newline after some text
(a summary is one sentence).
"""

from __future__ import annotations

from typing import Callable

from deftlab.data import load_xsum
from deftlab.scoring.rouge import rouge_scores
from deftlab.tasks import Example, SplitTask, first_n
from deftlab.tasks.templates import XSUM_STOPS, xsum_prompt, xsum_response


def clip_words(text: str, max_words: int | None) -> tuple[str, bool]:
    words = text.split()
    if max_words is None or len(words) <= max_words:
        return " ".join(words), False
    return " ".join(words[:max_words]), True


class XSumTask(SplitTask):
    name = "xsum"
    metric = "rouge"
    max_new_tokens = 64
    stop_strings = XSUM_STOPS
    default_eval_sets = ("test",)

    # options spelled out: get_task validates options against this signature
    def __init__(self, *, train_split: str = "train", eval_sets: tuple[str, ...] | None = None,
                 max_document_words: int | None = 400, max_new_tokens: int | None = None,
                 source: Callable[[str], object] | None = None, data_dir=None):
        super().__init__(train_split=train_split, eval_sets=eval_sets, max_new_tokens=max_new_tokens, source=source,
                         data_dir=data_dir)
        self.max_document_words = max_document_words

    def _load(self, split: str):
        return load_xsum(split, data_dir=self.data_dir)

    def _example(self, rec: dict) -> Example:
        doc, clipped = clip_words(rec["document"], self.max_document_words)
        return Example(prompt=xsum_prompt(doc), response=xsum_response(rec["summary"].strip()),
                       gold=rec["summary"].strip(), question=rec["document"][:200],
                       meta={"id": rec.get("id"), "document_clipped": clipped})

    def train_examples(self) -> list[Example]:
        return [self._example(r) for r in self.records(self.train_split)]

    def eval_examples(self, dataset_name: str, limit: int | None = None) -> list[Example]:
        return [self._example(r) for r in first_n(self.records(dataset_name), limit)]

    def score(self, dataset_name: str, examples: list[Example], outputs: list[str]) -> tuple[list[dict], dict]:
        preds = [o.strip() for o in outputs]
        items = [{"extracted": p, "correct": None} for p in preds]
        metrics = {"n": len(preds), **rouge_scores(preds, [e.gold for e in examples])}
        return items, metrics
