"""Calibration text for decomposition statistics: N examples drawn with a fixed seed.

``sample_calibration`` draws from any list of records or strings with its own
``random.Random(seed)`` (never the global RNG, so other seeding cannot change the draw);
``calibration_texts`` does the same for a named task; ``fingerprint`` hashes the result for
cache keys. Tokenisation and cutting to a sequence length belong to the caller.
"""

from __future__ import annotations

import hashlib
import os
import random
from typing import Any, Callable, Sequence

from deftlab.data.arithmetic import load_arith_train
from deftlab.data.generated import generate_arith
from deftlab.data.math import load_math
from deftlab.data.text import load_c4_sample, load_wikitext2
from deftlab.data.xsum import load_xsum
from deftlab.errors import DeftlabError, UnknownNameError

Formatter = Callable[[dict[str, Any]], str]
CALIBRATION_TASKS = ("arith", "xsum", "math", "c4", "wikitext2", "generated")


def default_formatter(record: dict[str, Any]) -> str:
    """Text of one record by its fields: arithmetic ``instruction\\noutput``, XSum ``document\\nsummary``,
    MATH ``problem\\nsolution``, else ``text``. Trainers pass their own prompt template instead."""
    if "instruction" in record and "output" in record:
        return f"{record['instruction']}\n{record['output']}"
    if "document" in record and "summary" in record:
        return f"{record['document']}\n{record['summary']}"
    if "problem" in record and "solution" in record:
        return f"{record['problem']}\n{record['solution']}"
    if "text" in record:
        return str(record["text"])
    raise DeftlabError(
        f"cannot turn a record with fields {sorted(record)} into calibration text",
        "pass formatter=callable(record) -> str",
    )


def calibration_picks(size: int, n: int, seed: int) -> list[int]:
    """Indices of the `n` calibration items drawn from `size` (what `sample_calibration` takes)."""
    return random.Random(seed).sample(range(size), n)


def sample_calibration(
    items: Sequence[dict[str, Any] | str],
    n: int = 256,
    seed: int = 0,
    formatter: Formatter | None = None,
) -> list[str]:
    """``n`` distinct items drawn without replacement by ``random.Random(seed)``, as text.

    Strings are used as they are; records go through ``formatter`` (default ``default_formatter``).
    Raises when fewer than ``n`` items exist rather than silently returning fewer.
    """
    if n <= 0:
        raise DeftlabError(f"n={n} calibration examples requested", "pass n >= 1")
    if n > len(items):
        raise DeftlabError(f"{n} calibration examples requested but only {len(items)} available",
                           f"lower n to at most {len(items)}")
    fmt = formatter or default_formatter
    picks = calibration_picks(len(items), n, seed)
    return [items[i] if isinstance(items[i], str) else fmt(items[i]) for i in picks]


def random_windows(text: str, n: int, window_words: int, seed: int = 0) -> list[str]:
    """``n`` windows of ``window_words`` consecutive whitespace-separated words from ``text``,
    starting at positions drawn by ``random.Random(seed)`` (as SVD-LLM/GPTQ draw token windows;
    words instead of tokens because no tokenizer is known here)."""
    words = text.split()
    if window_words <= 0 or len(words) < window_words:
        raise DeftlabError(f"text has {len(words)} words, fewer than a window of {window_words}",
                           "use a smaller window_words or a longer text")
    r = random.Random(seed)
    starts = [r.randint(0, len(words) - window_words) for _ in range(n)]
    return [" ".join(words[s : s + window_words]) for s in starts]


def calibration_texts(
    task: str,
    n: int = 256,
    seed: int = 0,
    data_dir: str | os.PathLike | None = None,
    formatter: Formatter | None = None,
    *,
    split: str | None = None,
    window_words: int = 512,
) -> list[str]:
    """Calibration texts for a task.

    - ``arith``: training records (math_10k, else math_data) through ``formatter`` (pass the
      Alpaca template used for fine-tuning; default ``instruction\\noutput``).
    - ``xsum``: split ``validation`` by default (the train split is not in the data directory;
      pass ``split="train"`` when you have it), ``document\\nsummary``.
    - ``math``: MATH train, ``problem\\nsolution``.
    - ``c4``: whole documents of the C4 validation sample.
    - ``wikitext2``: random windows of ``window_words`` words; split ``train`` by default as in
      SVD-LLM (from the hub unless ``wikitext2/wiki.train.txt`` exists). ``split="test"`` works
      offline but then calibration and perplexity share text.
    - ``generated``: ``generate_arith(n, seed)`` — no data needed.
    """
    # Imported here so that importing calibration does not pull every loader.

    if task == "arith":
        return sample_calibration(load_arith_train(data_dir), n, seed, formatter)
    if task == "xsum":
        return sample_calibration(load_xsum(split or "validation", data_dir), n, seed, formatter)
    if task == "math":
        return sample_calibration(load_math(split or "train", data_dir), n, seed, formatter)
    if task == "c4":
        return sample_calibration(load_c4_sample(None, data_dir), n, seed)
    if task == "wikitext2":
        return random_windows(load_wikitext2(split or "train", data_dir), n, window_words, seed)
    if task == "generated":
        return sample_calibration(generate_arith(n, seed), n, seed, formatter)
    raise UnknownNameError("calibration task", task, CALIBRATION_TASKS)


def fingerprint(texts: Sequence[str]) -> str:
    """sha256 (hex) of the texts in order; a length prefix per text keeps ["ab","c"] ≠ ["a","bc"]."""
    h = hashlib.sha256()
    for t in texts:
        b = t.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()
