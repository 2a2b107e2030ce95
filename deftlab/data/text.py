"""Plain-text corpora for perplexity and calibration: WikiText-2 (raw) and a C4 sample.

WikiText-2 follows the GPTQ/SparseGPT/SVD-LLM convention: the split's rows joined with
``"\\n\\n"`` into one string (``wikitext2/wiki.test.txt`` is exactly that string for the test
split; ``wikitext2/test.jsonl`` holds the rows). C4: ``c4/c4_validation_2k.jsonl`` (2,000
validation documents of unknown selection, likely not SparseGPT's first shard sample); the hub
fallback is shard ``en/c4-validation.00000-of-00008.json.gz`` of ``allenai/c4``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from deftlab.data.source import (
    HubLoader,
    HubSource,
    Record,
    fetch,
    find_file,
    read_jsonl,
    read_text,
)
from deftlab.errors import DeftlabError, UnknownNameError

WIKITEXT2_SPLITS = {"test": "test", "validation": "valid", "train": "train"}
C4_FILE = "c4/c4_validation_2k.jsonl"
C4_HUB = HubSource(
    "allenai/c4", "validation", data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"},
    convert=lambda r: {"text": r["text"]},
)


def _rows_file(path: Path) -> list[Record]:
    return [{"text": r["text"]} for r in read_jsonl(path, fields=("text",), text_fields=("text",))]


def load_wikitext2(
    split: Literal["test", "validation", "train"] = "test",
    data_dir: str | os.PathLike | None = None,
    hub_loader: HubLoader | None = None,
) -> str:
    """One WikiText-2-raw split as a single string, rows joined with ``"\\n\\n"``.

    Looks for ``wikitext2/wiki.<split>.txt`` (the joined string, read byte-exact), then
    ``wikitext2/<split>.jsonl`` (rows), then hub ``wikitext`` / ``wikitext-2-raw-v1``.
    """
    if split not in WIKITEXT2_SPLITS:
        raise UnknownNameError("WikiText-2 split", split, WIKITEXT2_SPLITS)
    joined = find_file(f"wikitext2/wiki.{WIKITEXT2_SPLITS[split]}.txt", data_dir)
    if joined is not None:
        return read_text(joined)
    hub = HubSource("wikitext", split, configs=("wikitext-2-raw-v1",), convert=lambda r: {"text": r["text"]})
    rows = fetch(f"wikitext2/{split}.jsonl", _rows_file, hub, name=f"wikitext2-{split}", data_dir=data_dir,
                 hub_loader=hub_loader,
                 shown_as=f"wikitext2/wiki.{WIKITEXT2_SPLITS[split]}.txt (or wikitext2/{split}.jsonl)")
    return "\n\n".join(r["text"] for r in rows)


def load_wikitext2_test(data_dir: str | os.PathLike | None = None, hub_loader: HubLoader | None = None) -> str:
    """The WikiText-2-raw test split as the single ``"\\n\\n"``-joined string used for perplexity."""
    return load_wikitext2("test", data_dir=data_dir, hub_loader=hub_loader)


def load_c4_sample(
    n: int | None = None, data_dir: str | os.PathLike | None = None, hub_loader: HubLoader | None = None
) -> list[str]:
    """The first ``n`` (all when None) C4 validation documents' texts, in file order."""
    if n is not None and n < 0:
        raise DeftlabError(f"n={n} C4 documents requested", "pass n >= 0 or None for all")
    rows = fetch(C4_FILE, _rows_file, C4_HUB, name="c4-validation", data_dir=data_dir, hub_loader=hub_loader)
    texts = [r["text"] for r in rows]
    return texts if n is None else texts[:n]
