"""Plain causal-LM continual fine-tuning on raw text (WeLore's C4 setting), evaluated by perplexity.

Every token is a target (empty prompt). Each document is one example, truncated to `cutoff_len` by the
tokenisation, as WeLore's `welore_continual_finetune.py` truncates to `max_length`. With only the 2,000-document
C4 validation sample available offline, the last `n_eval` documents are held out for perplexity and the rest are
training text (WeLore streams C4 train and evaluates on C4 validation; this split is our substitute).
"""

from __future__ import annotations

from typing import Callable

from deftlab.data import load_c4_sample
from deftlab.errors import DeftlabError
from deftlab.tasks import Example, Task, first_n


class TextTask(Task):
    name = "text"
    metric = "perplexity"
    generative = False
    max_new_tokens = 0
    default_eval_sets = ("heldout",)

    def __init__(self, *, source: Callable[[], list[str]] | None = None, n_eval: int = 200, data_dir=None):
        self.data_dir = data_dir
        self._source = source or self._load
        self.n_eval = n_eval
        self._texts: list[str] | None = None

    def _load(self) -> list[str]:
        return load_c4_sample(data_dir=self.data_dir)

    def texts(self) -> list[str]:
        if self._texts is None:
            texts = [t for t in self._source() if t and t.strip()]
            if len(texts) <= self.n_eval:
                raise DeftlabError(f"text task needs more than n_eval={self.n_eval} documents, got {len(texts)}",
                                   "lower n_eval or provide more text")
            self._texts = texts
        return self._texts

    def train_examples(self) -> list[Example]:
        return [Example(prompt="", response=t) for t in self.texts()[: -self.n_eval]]

    def eval_examples(self, dataset_name: str, limit: int | None = None) -> list[Example]:
        if dataset_name != "heldout":
            raise DeftlabError(f"text task has no eval set '{dataset_name}'", "use 'heldout'")
        return [Example(prompt="", response=t, meta={"index": i})
                for i, t in enumerate(first_n(self.texts()[-self.n_eval:], limit))]

    def score(self, dataset_name, examples, outputs):
        raise DeftlabError("the text task is scored by perplexity, not by generated outputs",
                           "call deftlab.eval.generate.evaluate_task, which computes perplexity for it")
