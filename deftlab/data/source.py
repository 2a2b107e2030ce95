"""Where a dataset comes from: the real-data directory first, then the Hugging Face hub.

Every loader names one file relative to the data directory (the layout of ../shared/data, e.g.
``arith/gsm8k/test.json``) and, where one exists, the hub dataset holding the same data. Resolution:

1. data directory configured (argument > ``DEFTLAB_DATA_DIR``) but missing → ``DataNotFoundError``;
2. the file exists there → read and validate it;
3. otherwise, unless the hub is switched off (``settings.hub_offline()``), ask the hub loader;
4. both fail → ``DataNotFoundError`` naming the file and both ways to provide it.

The hub call goes through a replaceable callable (``hub_loader`` argument, default the module
attribute ``load_from_hub`` looked up at call time) so tests can exercise the fallback offline.
"""

from __future__ import annotations

import json
import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence
from urllib.parse import urlparse

from deftlab import settings
from deftlab.errors import DataNotFoundError, MalformedDataError

Record = dict[str, Any]
Converter = Callable[[Record], Record]


@dataclass(frozen=True)
class HubSource:
    """How to get the same data from the hub: ``datasets.load_dataset(path, config, split=...)``.

    ``configs`` lists several configs to concatenate (e.g. the seven MATH subjects); ``convert``
    maps one hub row to deftlab's record format.
    """

    path: str
    split: str
    configs: tuple[str | None, ...] = (None,)
    data_files: dict[str, str] | None = None
    convert: Converter | None = None

    def describe(self) -> str:
        cfg = ",".join(c for c in self.configs if c) if any(self.configs) else ""
        files = f" data_files={self.data_files}" if self.data_files else ""
        return f"'{self.path}'" + (f" ({cfg})" if cfg else "") + f" split '{self.split}'" + files


HubLoader = Callable[[HubSource], list[Record]]


class Records(list):
    """A list of record dicts that also says where it came from.

    It is a plain ``list`` for every consumer (slicing gives a plain list); the extra attributes
    are ``name`` (dataset name), ``path`` (the file read, or None when from the hub) and
    ``source`` (``"file:<path>"`` or ``"hub:<id>"``) for run records.
    """

    def __init__(self, items: Iterable[Record] = (), *, name: str = "", path: Path | None = None, source: str = ""):
        super().__init__(items)
        self.name = name
        self.path = path
        self.source = source

    @property
    def records(self) -> list[Record]:
        return self

    def as_hf_dataset(self):
        """The records as a ``datasets.Dataset`` (imported lazily: it is slow to import)."""
        import datasets

        return datasets.Dataset.from_list(list(self))

    def __repr__(self) -> str:
        return f"Records(name={self.name!r}, n={len(self)}, source={self.source!r})"


# ----------------------------------------------------------------------------- data directory


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path | None:
    """The configured data directory as an absolute path (relative paths are taken from the CWD).

    None when nothing is configured; ``DataNotFoundError`` when configured but absent.
    """
    d = settings.data_dir(data_dir)
    if d is None:
        return None
    d = d if d.is_absolute() else Path.cwd() / d
    if not d.is_dir():
        raise DataNotFoundError(
            f"data directory {d} does not exist",
            "set DEFTLAB_DATA_DIR / --data-dir to the folder holding arith/, math/, xsum/, wikitext2/, c4/",
        )
    return d


def find_file(rel: str, data_dir: str | os.PathLike | None = None) -> Path | None:
    """``<data dir>/<rel>`` when it exists, else None (also None when no data dir is configured)."""
    d = resolve_data_dir(data_dir)
    if d is None:
        return None
    p = d / rel
    return p if p.is_file() else None


# ----------------------------------------------------------------------------- hub


def _hub_reachable(timeout: float = 3.0) -> str | None:
    """None when the hub host accepts a TCP connection within ``timeout``, else the reason.

    ``datasets`` retries an unreachable hub for ~25 s per call; probing first makes the offline
    case fail fast. DNS lookups ignore socket timeouts, so the probe runs in a daemon thread.
    """
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme != "http" else 80)
    result: list[str | None] = ["timed out"]

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result[0] = None
        except OSError as e:
            result[0] = f"{type(e).__name__}: {e}"

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 0.5)
    if result[0] is None:
        return None
    return f"cannot reach {host}:{port} ({result[0]})"


def load_from_hub(src: HubSource) -> list[Record]:
    """Default hub loader: probe the hub, then ``datasets.load_dataset`` each config and convert rows."""
    reason = _hub_reachable()
    if reason is not None:
        raise ConnectionError(reason)
    import datasets

    rows: list[Record] = []
    for cfg in src.configs:
        ds = datasets.load_dataset(src.path, cfg, split=src.split, data_files=src.data_files)
        rows.extend(src.convert(dict(r)) if src.convert else dict(r) for r in ds)
    return rows


def _missing_message(rel: str, data_dir: Path | None) -> str:
    if data_dir is None:
        return f"{rel} not found: no data directory is configured"
    return f"{data_dir / rel} not found"


def fetch(
    rel: str,
    reader: Callable[[Path], list[Record]],
    hub: HubSource | None,
    *,
    name: str,
    data_dir: str | os.PathLike | None = None,
    hub_loader: HubLoader | None = None,
    no_hub_reason: str = "it has no official hub copy",
    shown_as: str | None = None,
) -> Records:
    """Read ``<data dir>/<rel>`` with ``reader``, else fall back to the hub (see module docstring).

    ``shown_as`` replaces ``rel`` in error messages when a loader accepts several files.
    """
    d = resolve_data_dir(data_dir)
    path = (d / rel) if d is not None else None
    if path is not None and path.is_file():
        return Records(reader(path), name=name, path=path, source=f"file:{path}")

    shown = shown_as or rel
    problem = _missing_message(shown, d)
    folder = str(d) if d is not None else "<data dir>"
    where = f"put the file at {folder}/{shown} (set DEFTLAB_DATA_DIR / --data-dir)"
    if hub is None:
        raise DataNotFoundError(problem, f"{where}; {no_hub_reason}")
    if settings.hub_offline():
        raise DataNotFoundError(
            problem, f"{where}, or unset the offline flags so deftlab can fetch hub dataset {hub.describe()}"
        )
    loader = hub_loader if hub_loader is not None else globals()["load_from_hub"]
    try:
        rows = loader(hub)
    except Exception as e:  # any hub failure (network, auth, schema) ends in the same user error
        raise DataNotFoundError(
            f"{problem} and the hub fallback {hub.describe()} failed ({type(e).__name__}: {str(e)[:200]})",
            f"{where}, or go online so deftlab can fetch the hub dataset",
        ) from e
    return Records(rows, name=name, path=None, source=f"hub:{hub.path}")


# ----------------------------------------------------------------------------- readers

_RESTORE = "restore the original file (see the data directory's PROVENANCE.md)"


def check_record(r: Any, where: str, fields: Sequence[str], text_fields: Sequence[str] = ()) -> Record:
    """``r`` must be an object with ``fields``; ``text_fields`` must be strings. Errors say ``where``."""
    if not isinstance(r, dict):
        raise MalformedDataError(f"{where} is {type(r).__name__}, not an object", _RESTORE)
    for f in fields:
        if f not in r:
            raise MalformedDataError(f"{where} has no field '{f}'", f"every record needs fields {', '.join(fields)}")
    for f in text_fields:
        if not isinstance(r.get(f), str):
            raise MalformedDataError(f"{where}: field '{f}' is {type(r.get(f)).__name__}, not a string", _RESTORE)
    return r


def read_json_list(path: Path, fields: Sequence[str] = (), text_fields: Sequence[str] = ()) -> list[Record]:
    """A JSON file holding a list of objects, each checked with ``check_record``."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise MalformedDataError(f"{path}: invalid JSON at line {e.lineno} column {e.colno} ({e.msg})", _RESTORE) from e
    except UnicodeDecodeError as e:
        raise MalformedDataError(f"{path}: not UTF-8 text ({e.reason})", _RESTORE) from e
    if not isinstance(data, list):
        raise MalformedDataError(f"{path}: expected a JSON list of records, got {type(data).__name__}", _RESTORE)
    return [check_record(r, f"{path}: record {i}", fields, text_fields) for i, r in enumerate(data)]


def read_jsonl(path: Path, fields: Sequence[str] = (), text_fields: Sequence[str] = ()) -> list[Record]:
    """A JSON-lines file: one object per non-blank line, each checked with ``check_record``."""
    rows: list[Record] = []
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{path}: record {len(rows)} (line {lineno})"
                try:
                    r = json.loads(line)
                except json.JSONDecodeError as e:
                    raise MalformedDataError(f"{where}: invalid JSON ({e.msg})", _RESTORE) from e
                rows.append(check_record(r, where, fields, text_fields))
    except UnicodeDecodeError as e:
        raise MalformedDataError(f"{path}: not UTF-8 text ({e.reason})", _RESTORE) from e
    return rows


def read_text(path: Path) -> str:
    """A UTF-8 text file exactly as stored (no newline translation)."""
    try:
        return Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise MalformedDataError(f"{path}: not UTF-8 text ({e.reason})", _RESTORE) from e
