"""MATH (hendrycks) competition problems: records ``{problem, solution, answer, level, type, unique_id}``.

- ``level`` is an int 1–5, or None for the two "Level ?" training problems (MATH writes
  "Level 3"; MATH-500 writes 3).
- ``type`` is the subject ("Algebra", ...); MATH-500 calls it ``subject``, kept as both.
- ``answer``: MATH-500 ships one; for the train/test splits it is the last ``\\boxed{}`` of the
  solution (``deftlab.scoring.answers.extract_boxed``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from deftlab.data.source import HubLoader, HubSource, Record, Records, fetch, read_jsonl
from deftlab.errors import MalformedDataError, UnknownNameError
from deftlab.scoring.answers import extract_boxed

MATH_SUBJECTS = (
    "algebra", "counting_and_probability", "geometry", "intermediate_algebra",
    "number_theory", "prealgebra", "precalculus",
)
MATH_FILES = {"train": "math/train.jsonl", "test": "math/test_full.jsonl"}
MATH500_FILES = {True: "math/math500_test_original.jsonl", False: "math/math500_test.jsonl"}
MATH500_PREFIX = "Return your final response within \\boxed{}. "


def _level(v: object, where: str) -> int | None:
    if isinstance(v, int):
        return v
    text = str(v).replace("Level", "").strip()
    if text.isdigit():
        return int(text)
    if text == "?":
        return None
    raise MalformedDataError(f"{where}: level {v!r} is not 'Level N'", "restore the original file")


def _record(r: Record, where: str) -> Record:
    answer = r.get("answer")
    if answer is None:
        answer = extract_boxed(r["solution"])
    subject = r.get("type") or r.get("subject")
    return {
        "problem": r["problem"], "solution": r["solution"], "answer": answer,
        "level": _level(r.get("level"), where), "type": subject, "subject": subject,
        "unique_id": r.get("unique_id"),
    }


def _reader(path: Path) -> list[Record]:
    rows = read_jsonl(path, fields=("problem", "solution", "level"), text_fields=("problem", "solution"))
    return [_record(r, f"{path}: record {i}") for i, r in enumerate(rows)]


def _from_hub(r: Record) -> Record:
    return _record(r, "hub row")


def load_math(
    split: Literal["train", "test"] = "train",
    data_dir: str | os.PathLike | None = None,
    hub_loader: HubLoader | None = None,
) -> Records:
    """The full MATH train (7,500) or test (5,000) split; hub fallback ``EleutherAI/hendrycks_math``
    (its seven subject configs concatenated; ``hendrycks/competition_math`` was taken down)."""
    if split not in MATH_FILES:
        raise UnknownNameError("MATH split", split, MATH_FILES)
    hub = HubSource("EleutherAI/hendrycks_math", split, configs=MATH_SUBJECTS, convert=_from_hub)
    return fetch(MATH_FILES[split], _reader, hub, name=f"math-{split}", data_dir=data_dir, hub_loader=hub_loader)


def load_math500(
    original: bool = True,
    data_dir: str | os.PathLike | None = None,
    hub_loader: HubLoader | None = None,
) -> Records:
    """MATH-500. ``original=True``: the problem text as in MATH; ``False``: the BudgetThinker copy
    whose problems start with "Return your final response within \\boxed{}. "."""
    def add_prefix(r: Record) -> Record:
        r = _from_hub(r)
        return r if original else {**r, "problem": MATH500_PREFIX + r["problem"]}

    hub = HubSource("HuggingFaceH4/MATH-500", "test", convert=add_prefix)
    name = "math500" if original else "math500-prefixed"
    return fetch(MATH500_FILES[bool(original)], _reader, hub, name=name, data_dir=data_dir, hub_loader=hub_loader)
