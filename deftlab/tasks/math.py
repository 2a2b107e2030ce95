"""MATH (hendrycks): train on problem → worked solution ending in \\boxed{}; evaluate on MATH-500.

Scoring: the last \\boxed{...} of the output (`extract_boxed`) against the record's `answer` (or the boxed answer
of its reference solution) with `math_equal`.
"""

from __future__ import annotations

from deftlab.data import load_math, load_math500
from deftlab.scoring.answers import extract_boxed, math_equal
from deftlab.tasks import Example, SplitTask, first_n
from deftlab.tasks.templates import ALPACA_STOPS, math_prompt, math_response


class MathTask(SplitTask):
    name = "math"
    metric = "accuracy"
    max_new_tokens = 512  # MATH solutions are long; LLM-Adapters' 256 truncates many of them
    stop_strings = ALPACA_STOPS
    default_eval_sets = ("math500",)

    def _load(self, split: str):
        if split == "math500":
            return load_math500(data_dir=self.data_dir)
        return load_math(split, data_dir=self.data_dir)

    @staticmethod
    def gold_answer(rec: dict) -> str | None:
        if rec.get("answer") not in (None, ""):
            return str(rec["answer"])

        return extract_boxed(rec.get("solution", ""))

    def _example(self, rec: dict, with_gold: bool) -> Example:
        gold = self.gold_answer(rec) if with_gold else rec.get("answer")
        return Example(prompt=math_prompt(rec["problem"]), response=math_response(rec["solution"], gold),
                       gold=gold, question=rec["problem"],
                       meta={k: rec[k] for k in ("unique_id", "level", "subject", "type") if k in rec})

    def train_examples(self) -> list[Example]:
        return [self._example(r, with_gold=False) for r in self.records(self.train_split)]

    def eval_examples(self, dataset_name: str, limit: int | None = None) -> list[Example]:
        return [self._example(r, with_gold=True) for r in first_n(self.records(dataset_name), limit)]

    def score(self, dataset_name: str, examples: list[Example], outputs: list[str]) -> tuple[list[dict], dict]:
        items = []
        for ex, out in zip(examples, outputs, strict=True):
            pred = extract_boxed(out)
            items.append({"extracted": pred, "correct": pred is not None and bool(math_equal(pred, ex.gold))})
        n = len(items)
        correct = sum(it["correct"] for it in items)
        return items, {"n": n, "correct": correct, "accuracy": correct / n if n else float("nan"),
                       "extraction": "last \\boxed{}, math_equal"}
