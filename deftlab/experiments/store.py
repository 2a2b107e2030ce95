"""The results store: one directory per run, keyed by a hash of what the run computes.

Layout (root = settings.results_dir(), env DEFTLAB_RESULTS, default ./results):

    <root>/<kind>/<key>/record.json      metrics + params + manifest; the run is done iff this parses
    <root>/<kind>/<key>/manifest.json    config, git commit, package versions, seed, hardware
    <root>/<kind>/<key>/...              artifacts written by the run function
    <root>/<kind>/.<key>.partial/        a run in flight (renamed to <key>/ when it succeeds)
    <root>/<kind>/.<key>.failed-<time>/  a failed run: its partial output plus traceback.txt
    <root>/<kind>/.<key>.<why>-<time>/   anything moved aside (corrupt, interrupted, superseded, incomplete)

Nothing recorded is ever deleted: a corrupt record, a half-finished directory or a result replaced by --force is
moved aside under a dot-name, which `records()` ignores. The key is the first 12 hex digits of SHA-256 over the
canonical JSON of {kind, params}; the experiment name is not part of it, so two experiments that need the same run
share it (PEFT method_comparison style: results are addressed by what they computed).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import math
import os
import socket
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from deftlab.errors import DeftlabError
from deftlab.manifest import write_json_atomic
from deftlab.settings import results_dir

log = logging.getLogger(__name__)

KEY_LEN = 12
RECORD = "record.json"
MANIFEST = "manifest.json"


def _canonical(obj: Any) -> Any:
    """Normalise for hashing: sorted keys, tuples as lists, integral floats as ints (1.0 and 1 hash alike)."""
    if isinstance(obj, dict):
        return {str(k): _canonical(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    if isinstance(obj, float):
        if math.isfinite(obj) and obj.is_integer():
            return int(obj)
        if not math.isfinite(obj):
            return repr(obj)
        return obj
    if isinstance(obj, Path):
        return str(obj)
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    raise DeftlabError(f"run parameter {obj!r} ({type(obj).__name__}) cannot be hashed",
                       "use only strings, numbers, booleans, null, lists and mappings in params")


def canonical_json(obj: Any) -> str:
    return json.dumps(_canonical(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def run_key(kind: str, params: dict, fingerprint: dict | None = None) -> str:
    """Stable short hash of a run: same kind + same resolved params (+ the kind's fingerprint) → same key."""
    payload = {"kind": kind, "params": params}
    if fingerprint:
        payload["fingerprint"] = fingerprint
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()[:KEY_LEN]


def _stamp() -> str:
    return _dt.datetime.now().strftime("%Y%m%dT%H%M%S%f")


@dataclass(frozen=True)
class RecordStatus:
    state: str  # "done" | "missing" | "corrupt"
    detail: str = ""


class ResultsStore:
    """Reads and writes run directories under one root; all writes are atomic renames."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = results_dir(root)

    def __repr__(self) -> str:
        return f"ResultsStore({str(self.root)!r})"

    # --- paths ---------------------------------------------------------------------------------------------
    def run_dir(self, kind: str, key: str) -> Path:
        return self.root / kind / key

    def record_path(self, kind: str, key: str) -> Path:
        return self.run_dir(kind, key) / RECORD

    def partial_dir(self, kind: str, key: str) -> Path:
        return self.root / kind / f".{key}.partial"

    def aside_dirs(self, kind: str, key: str, why: str | None = None) -> list[Path]:
        """Directories moved aside for this run (failed, corrupt, ...), oldest first."""
        base = self.root / kind
        if not base.is_dir():
            return []
        prefix = f".{key}." + (f"{why}-" if why else "")
        return sorted(p for p in base.iterdir() if p.name.startswith(prefix) and not p.name.endswith(".partial"))

    # --- reading -------------------------------------------------------------------------------------------
    def _read(self, kind: str, key: str) -> tuple[dict | None, RecordStatus]:
        path = self.record_path(kind, key)
        if not path.is_file():
            return None, RecordStatus("missing")
        try:
            rec = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            return None, RecordStatus("corrupt", f"{type(e).__name__}: {e}")
        if not isinstance(rec, dict) or not isinstance(rec.get("metrics"), dict):
            return None, RecordStatus("corrupt", "record has no 'metrics' mapping")
        return rec, RecordStatus("done")

    def status(self, kind: str, key: str) -> RecordStatus:
        return self._read(kind, key)[1]

    def load(self, kind: str, key: str) -> dict | None:
        """The run's record, or None when it is missing or corrupt (corrupt records are left in place here;
        the runner moves them aside before it re-runs)."""
        return self._read(kind, key)[0]

    def records(self, kind: str | None = None) -> Iterator[dict]:
        """Every readable record in the store (dot-directories, i.e. moved-aside runs, are skipped)."""
        if not self.root.is_dir():
            return
        kinds = [kind] if kind else sorted(p.name for p in self.root.iterdir() if p.is_dir()
                                           and not p.name.startswith("."))
        for k in kinds:
            base = self.root / k
            if not base.is_dir():
                continue
            for d in sorted(base.iterdir()):
                if d.name.startswith(".") or not d.is_dir():
                    continue
                rec, st = self._read(k, d.name)
                if rec is not None:
                    yield rec

    # --- writing -------------------------------------------------------------------------------------------
    def _move_aside(self, path: Path, kind: str, key: str, why: str) -> Path:
        target = self.root / kind / f".{key}.{why}-{_stamp()}"
        n = 0
        while target.exists():
            n += 1
            target = self.root / kind / f".{key}.{why}-{_stamp()}-{n}"
        os.replace(path, target)
        return target

    def set_aside(self, kind: str, key: str, why: str) -> Path | None:
        """Move the run's directory out of the way (never delete it); returns where it went."""
        d = self.run_dir(kind, key)
        if not d.exists():
            return None
        return self._move_aside(d, kind, key, why)

    def begin(self, kind: str, key: str) -> Path:
        """A fresh, empty in-flight directory for the run. A leftover one from a crashed process is moved
        aside as `interrupted`; one owned by a live process on this host is an error (two runners at once)."""
        partial = self.partial_dir(kind, key)
        if partial.exists():
            owner = _read_owner(partial)
            if owner and owner.get("host") == socket.gethostname() and _pid_alive(owner.get("pid")) \
                    and owner.get("pid") != os.getpid():
                raise DeftlabError(f"run {kind}/{key} is already in progress (pid {owner['pid']})",
                                   "wait for it to finish, or stop that process first")
            moved = self._move_aside(partial, kind, key, "interrupted")
            log.warning("moved the unfinished run directory of an earlier crash aside: %s", moved)
        partial.mkdir(parents=True)
        write_json_atomic(partial / ".owner.json", {"pid": os.getpid(), "host": socket.gethostname(),
                                                    "started_at": _dt.datetime.now().isoformat()})
        return partial

    def commit(self, kind: str, key: str, partial: Path, record: dict, manifest: dict) -> Path:
        """Write record + manifest into the in-flight directory, then rename it into place (atomic).

        An existing final directory (a --force re-run, or a directory without a readable record) is moved
        aside first, never overwritten."""
        for name in (RECORD, MANIFEST):  # files of the same name the run function wrote are kept, renamed
            if (partial / name).exists():
                os.replace(partial / name, partial / f"run.{name}")
        write_json_atomic(partial / MANIFEST, manifest)
        (partial / ".owner.json").unlink(missing_ok=True)
        write_json_atomic(partial / RECORD, record)
        final = self.run_dir(kind, key)
        if final.exists():
            _, st = self._read(kind, key)
            self._move_aside(final, kind, key, "superseded" if st.state == "done" else "incomplete")
        os.replace(partial, final)
        return final

    def fail(self, kind: str, key: str, partial: Path, exc: BaseException, context: dict | None = None) -> Path:
        """Keep a failed run's directory (with the traceback) as .<key>.failed-<time>."""
        try:
            tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
            (partial / "traceback.txt").write_text(tb)
            if context is not None:
                write_json_atomic(partial / "failed_run.json", context)
            (partial / ".owner.json").unlink(missing_ok=True)
        except OSError:  # the failure report must not hide the original error
            log.exception("could not write the failure report into %s", partial)
        return self._move_aside(partial, kind, key, "failed")


def _read_owner(partial: Path) -> dict | None:
    try:
        return json.loads((partial / ".owner.json").read_text())
    except (OSError, ValueError):
        return None


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
