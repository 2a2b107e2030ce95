"""Arithmetic reasoning (LLM-Adapters math_10k → AddSub, SingleEq, MultiArith, SVAMP, GSM8K, AQuA, mawps).

Scoring follows LLM-Adapters (anchors §6) through `deftlab.scoring.answers`: the LAST number within 0.001 for the
numeric sets, the first option letter for AQuA. Differences from LLM-Adapters, on purpose:
- the plain Alpaca prompt for train and eval (see `templates`), `prompt_style="llm-adapters"` gives theirs;
- loss on the response only (LLM-Adapters defaults to `train_on_inputs=True`);
- greedy decoding with the KV cache and stop strings instead of 4-beam search without cache;
- accuracy is also reported on the test items that do not overlap the training questions.
"""

from __future__ import annotations

from functools import partial

from typing import Callable

from deftlab.data import load_arith_test, load_arith_train
from deftlab.data.arithmetic import canonical_test_name
from deftlab.data.generated import generate_arith
from deftlab.errors import DeftlabError
from deftlab.scoring.answers import arith_correct, extract_choice, extract_number
from deftlab.scoring.overlap import train_test_overlap
from deftlab.tasks import Example, Task, first_n, records_of
from deftlab.tasks.splits import two_way_split
from deftlab.tasks.templates import ALPACA_STOPS, alpaca_prompt, llm_adapters_prompt

ARITH_SETS = ("AddSub", "SingleEq", "MultiArith", "SVAMP", "gsm8k", "AQuA", "mawps")
DEFAULT_ARITH_SETS = ("AddSub", "SingleEq", "MultiArith", "SVAMP", "gsm8k", "AQuA")  # LLM-Adapters' six


def answer_text(answer) -> str:
    """A numeric answer as the model should write it: "8.0" -> "8", "2.5" -> "2.5"; option letters as they are."""
    try:
        v = float(answer)
    except (TypeError, ValueError):
        return str(answer)
    return str(int(v)) if v.is_integer() else str(v)


class ArithmeticTask(Task):
    metric = "accuracy"
    max_new_tokens = 256  # LLM-Adapters evaluate.py
    stop_strings = ALPACA_STOPS

    def __init__(self, *, train_source: Callable[[], object] | None = None,
                 test_source: Callable[[str], object] | None = None, eval_sets: tuple[str, ...] | None = None,
                 prompt_style: str = "plain", max_new_tokens: int | None = None, data_dir=None,
                 name: str = "arith", stop_at_new_example: bool | None = None, train_set: str | None = None,
                 train_fraction: float = 0.7, split_seed: int = 0, answer_only: bool = False):
        if prompt_style not in ("plain", "llm-adapters"):
            raise DeftlabError(f"unknown prompt_style '{prompt_style}'", "use 'plain' or 'llm-adapters'")
        if not 0 < train_fraction < 1:
            raise DeftlabError(f"train_fraction={train_fraction} is not in (0, 1)", "e.g. 0.7 (WeLore's 70/30)")
        # train_set: train on a seeded train_fraction of that test set and test on the rest (WeLore Table 9:
        # SVAMP 700/300) instead of math_10k; answer_only: the response is the bare answer (WeLore's downstream
        # fine-tuning), not a chain of thought
        self.train_set = canonical_test_name(train_set) if train_set else None
        self.train_fraction, self.split_seed, self.answer_only = train_fraction, split_seed, answer_only
        self.name = name
        self.prompt_style = prompt_style
        # stop_at_new_example: cut generation where the model starts another Alpaca example (ALPACA_STOPS). None:
        # the prompt style's default; llm-adapters' evaluate.py scores everything after "### Response:", uncut,
        # which a small greedy model needs cut (it rambles into new examples until max_new_tokens)
        if stop_at_new_example is None:
            stop_at_new_example = prompt_style != "llm-adapters"
        if not stop_at_new_example:
            self.stop_strings = ()
        self.data_dir = data_dir
        self._train_source = train_source or self._load_train
        self._test_source = test_source or self._load_test
        self.default_eval_sets = tuple(eval_sets) if eval_sets else DEFAULT_ARITH_SETS
        if max_new_tokens:
            self.max_new_tokens = max_new_tokens
        self._train_cache: list[dict] | None = None
        self._test_cache: dict[str, list[dict]] = {}

    # --- data ------------------------------------------------------------------------------------------------
    def _load_train(self):
        if self.train_set:
            return self._split(self.train_set)[0]
        return load_arith_train(data_dir=self.data_dir)

    def _load_test(self, name: str):
        if self.train_set and canonical_test_name(name) == self.train_set:
            return self._split(self.train_set)[1]
        return load_arith_test(name, data_dir=self.data_dir)

    def _split(self, name: str) -> tuple[list[dict], list[dict]]:
        recs = records_of(load_arith_test(name, data_dir=self.data_dir))
        train, test = two_way_split(len(recs), self.train_fraction, self.split_seed)
        return [recs[i] for i in train], [recs[i] for i in test]

    def train_records(self) -> list[dict]:
        if self._train_cache is None:
            self._train_cache = records_of(self._train_source())
        return self._train_cache

    def test_records(self, dataset_name: str) -> list[dict]:
        if dataset_name not in self._test_cache:
            self._test_cache[dataset_name] = records_of(self._test_source(dataset_name))
        return self._test_cache[dataset_name]

    def _prompt(self, rec: dict, stage: str) -> str:
        if self.prompt_style == "llm-adapters":
            return llm_adapters_prompt(rec["instruction"], stage)
        return alpaca_prompt(rec["instruction"], rec.get("input") or "")

    def train_examples(self) -> list[Example]:
        return [Example(prompt=self._prompt(r, "train"), response=answer_text(r["answer"]) if self.answer_only
                        else r["output"], gold=r.get("answer"), question=r["instruction"])
                for r in self.train_records()]

    def eval_examples(self, dataset_name: str, limit: int | None = None) -> list[Example]:
        recs = first_n(self.test_records(dataset_name), limit)
        return [Example(prompt=self._prompt(r, "eval"), response=r.get("output", ""), gold=str(r["answer"]),
                        question=r["instruction"], meta={"index": i}) for i, r in enumerate(recs)]

    # --- scoring ---------------------------------------------------------------------------------------------
    def score(self, dataset_name: str, examples: list[Example], outputs: list[str]) -> tuple[list[dict], dict]:
        choice = dataset_name.lower() == "aqua"
        items = []
        for ex, out in zip(examples, outputs, strict=True):
            if choice:
                pred = extract_choice(out)
                ok = pred is not None and str(pred).strip().upper() == str(ex.gold).strip().upper()
            else:
                pred = extract_number(out)
                ok = bool(arith_correct(out, ex.gold))
            items.append({"extracted": pred, "correct": ok})
        n = len(items)
        correct = sum(it["correct"] for it in items)
        metrics = {"n": n, "correct": correct, "accuracy": correct / n if n else float("nan"),
                   "extraction": "first option letter" if choice else "last number, |pred-gold| <= 0.001"}
        metrics.update(self._overlap_metrics(examples, items))
        return items, metrics

    def _overlap_metrics(self, examples: list[Example], items: list[dict]) -> dict:
        """Accuracy on the test items whose question does not (near-)duplicate a training question."""
        report = train_test_overlap([r["instruction"] for r in self.train_records()], [e.question for e in examples])
        overlapping = set(report.overlapping)
        for i, it in enumerate(items):
            it["overlaps_train"] = i in overlapping
        clean = [it for i, it in enumerate(items) if i not in overlapping]
        n_clean = len(clean)
        return {
            "n_overlap": len(overlapping),
            "n_non_overlap": n_clean,
            "accuracy_non_overlap": sum(it["correct"] for it in clean) / n_clean if n_clean else float("nan"),
            "overlap": overlap_summary(report),
        }


def overlap_summary(report) -> dict:
    """Counts of an `OverlapReport` for the metrics file."""
    return {"n_exact": len(report.exact), "n_near": len(report.near), "near_threshold": report.threshold,
            "n_train": report.n_train, "summary": report.summary()}


def _generated_test_set(_name: str, *, n: int, seed: int) -> list[dict]:
    return generate_arith(n, seed)


class GeneratedArithmeticTask(ArithmeticTask):
    """Synthetic arithmetic word problems (`deftlab.data.generated`) with a disjoint-seed test set.

    No downloads, so it serves smoke tests and the tiny model.
    """

    def __init__(self, *, n_train: int = 1000, n_test: int = 200, seed: int = 0, max_new_tokens: int | None = None,
                 prompt_style: str = "plain"):
        # partials, not lambdas: a task crosses into spawned training processes by pickling
        super().__init__(train_source=partial(generate_arith, n_train, seed),
                         test_source=partial(_generated_test_set, n=n_test, seed=seed + 1),
                         eval_sets=("generated",), prompt_style=prompt_style, max_new_tokens=max_new_tokens,
                         name="generated")
