"""XSum summarisation data: records ``{document, summary, id}`` (``id`` always a string).

Local files: ``xsum/test.jsonl`` (1,000 official-test articles, not the first 1,000),
``xsum/validation_1k.jsonl`` (1,000 validation articles), ``xsum/train.jsonl`` when a user adds
it. The hub fallback is ``EdinburghNLP/xsum`` — its test/validation splits are the full ones
(11,334 / 11,332 articles), so results from it are not comparable to the 1k local files; the
returned ``Records.source`` says which was used.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from deftlab.data.source import HubLoader, HubSource, Record, Records, fetch, read_jsonl
from deftlab.errors import UnknownNameError

XSUM_FILES = {"test": "xsum/test.jsonl", "validation": "xsum/validation_1k.jsonl", "train": "xsum/train.jsonl"}
XSUM_HUB_ID = "EdinburghNLP/xsum"


def _record(r: Record) -> Record:
    return {"document": r["document"], "summary": r["summary"], "id": str(r["id"])}


def _read_xsum(path: Path) -> list[Record]:
    rows = read_jsonl(path, fields=("document", "summary", "id"), text_fields=("document", "summary"))
    return [_record(r) for r in rows]


def load_xsum(
    split: Literal["test", "validation", "train"] = "test",
    data_dir: str | os.PathLike | None = None,
    hub_loader: HubLoader | None = None,
) -> Records:
    """XSum records of one split (local file first, then ``EdinburghNLP/xsum``)."""
    if split not in XSUM_FILES:
        raise UnknownNameError("XSum split", split, XSUM_FILES)
    hub = HubSource(XSUM_HUB_ID, split, convert=_record)
    return fetch(XSUM_FILES[split], _read_xsum, hub, name=f"xsum-{split}", data_dir=data_dir, hub_loader=hub_loader)
