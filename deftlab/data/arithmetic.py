"""Arithmetic-reasoning data in LLM-Adapters' format: records ``{instruction, input, output, answer}``.

Training: ``arith/math_10k.json`` (the DeFT / LLM-Adapters training mix), or LLM-Adapters' older
``arith/math_data.json``. Test: ``arith/<Name>/test.json`` for the seven benchmarks. ``answer``
is always a string ("16.0", or an option letter for AQuA).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

from deftlab.data.source import (
    HubLoader,
    HubSource,
    Record,
    Records,
    fetch,
    find_file,
    read_json_list,
    resolve_data_dir,
)
from deftlab.errors import DataNotFoundError, UnknownNameError

ARITH_FIELDS = ("instruction", "input", "output", "answer")
# Canonical spelling (the folder names in LLM-Adapters' dataset/).
ARITH_TEST_SETS = ("AddSub", "SingleEq", "MultiArith", "SVAMP", "gsm8k", "AQuA", "mawps")
TRAIN_FILES = {"math_10k": "arith/math_10k.json", "math_data": "arith/math_data.json"}


def _read_arith(path: Path) -> list[Record]:
    rows = read_json_list(path, fields=("instruction", "output", "answer"), text_fields=("instruction", "output"))
    out = []
    for r in rows:
        # answers are strings in every LLM-Adapters file; accept numbers from hand-made files
        out.append({"instruction": r["instruction"], "input": r.get("input") or "",
                    "output": r["output"], "answer": str(r["answer"])})
    return out


def _gsm8k_from_hub(row: Record) -> Record:
    # openai/gsm8k: answer = "<worked steps with <<calc>> annotations>\n#### 72"
    steps, _, final = row["answer"].rpartition("####")
    final = final.strip().replace(",", "")
    steps = re.sub(r"<<[^>]*>>", "", steps).strip()
    return {"instruction": row["question"], "input": "", "output": f"{steps} The answer is {final}.",
            "answer": final}


def _aqua_from_hub(row: Record) -> Record:
    # deepmind/aqua_rat (raw): options like "A)21"; LLM-Adapters writes "Answer Choices: (A) 21 (B) ..."
    opts = " ".join("(" + o[0] + ") " + o[2:] for o in row["options"])
    return {"instruction": f"{row['question']} Answer Choices: {opts}", "input": "",
            "output": f"{row['rationale']} The answer is ({row['correct']}).", "answer": row["correct"]}


# Only where a hub copy with a known schema exists; their text differs slightly from LLM-Adapters'.
_TEST_HUB = {
    "gsm8k": HubSource("openai/gsm8k", "test", configs=("main",), convert=_gsm8k_from_hub),
    "AQuA": HubSource("deepmind/aqua_rat", "test", configs=("raw",), convert=_aqua_from_hub),
}


def canonical_test_name(name: str) -> str:
    """Case-insensitive lookup of a benchmark name (``"GSM8K"`` → ``"gsm8k"``)."""
    by_lower = {n.lower(): n for n in ARITH_TEST_SETS}
    key = name.strip().lower()
    if key not in by_lower:
        raise UnknownNameError("arithmetic test set", name, ARITH_TEST_SETS)
    return by_lower[key]


def load_arith_test(
    name: str, data_dir: str | os.PathLike | None = None, hub_loader: HubLoader | None = None
) -> Records:
    """The test records of one benchmark (``AddSub``, ``SingleEq``, ``MultiArith``, ``SVAMP``,
    ``gsm8k``, ``AQuA``, ``mawps``; any case)."""
    canon = canonical_test_name(name)
    return fetch(
        f"arith/{canon}/test.json", _read_arith, _TEST_HUB.get(canon), name=canon, data_dir=data_dir,
        hub_loader=hub_loader,
        no_hub_reason="there is no hub copy in LLM-Adapters' format (take dataset/<Name>/test.json from "
        "AGI-Edgerunners/LLM-Adapters)",
    )


def load_arith_train(
    data_dir: str | os.PathLike | None = None,
    source: Literal["auto", "math_10k", "math_data"] = "auto",
) -> Records:
    """The arithmetic training set: ``math_10k`` when present (``source="auto"``), else ``math_data``.

    The returned ``Records.name`` says which one was read. Neither file has an official hub copy.
    """
    if source not in ("auto", *TRAIN_FILES):
        raise UnknownNameError("arithmetic training source", source, ["auto", *TRAIN_FILES])
    no_hub = (
        "there is no official hub copy: take ft-training_set/{} from AGI-Edgerunners/LLM-Adapters"
    )
    if source == "auto":
        for name, rel in TRAIN_FILES.items():
            if find_file(rel, data_dir) is not None:
                return fetch(rel, _read_arith, None, name=name, data_dir=data_dir)
        raise DataNotFoundError(
            "neither arith/math_10k.json nor arith/math_data.json found"
            + ("" if resolve_data_dir(data_dir) else " (no data directory is configured)"),
            "set DEFTLAB_DATA_DIR / --data-dir to a folder holding arith/math_10k.json; "
            + no_hub.format("math_10k.json"),
        )
    rel = TRAIN_FILES[source]
    return fetch(rel, _read_arith, None, name=source, data_dir=data_dir, no_hub_reason=no_hub.format(Path(rel).name))
