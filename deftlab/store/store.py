"""The results store: one directory per run, keyed by a hash of what the run computes (deftlab.store.keys).

Layout (root = settings.results_dir(), env DEFTLAB_RESULTS, default ./results):

    <root>/<kind>/<key>/record.json       the run's one record; the run is done iff this parses (`RECORD_FORMAT`)
    <root>/<kind>/<key>/...               artifacts written by the run function
    <root>/<kind>/.<key>.partial/         a run in flight, or interrupted: its artifacts and its lease
                                          (deftlab.store.lease); an interrupted run resumes inside it
    <root>/<kind>/.<key>.failed-<time>/   a run that raised: its partial output plus traceback.txt
    <root>/<kind>/.<key>.<why>-<time>/    anything moved aside (corrupt, superseded by --force)

Only this module writes records. A record holds the params and fingerprint that were hashed, the resolved config
the run used, its metrics, the artifact list, where it came from (experiment, preset, command), how it ran (host,
pid, times, attempts) and the manifest (git commit, package versions, hardware, seed). Nothing recorded is ever
deleted: a corrupt record or a result replaced by --force is moved aside under a dot-name, which `records()`
ignores. The experiment name is not part of the key, so two experiments that need the same run share it.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import shutil
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from deftlab.errors import DeftlabError
from deftlab.manifest import build_manifest, write_json_atomic
from deftlab.settings import results_dir
from deftlab.store.lease import LEASE_FILE, Lease, claim, host_name, lease_state

log = logging.getLogger(__name__)

RECORD = "record.json"
RECORD_FORMAT = "deftlab-record-v2"


def _stamp() -> str:
    return _dt.datetime.now().strftime("%Y%m%dT%H%M%S%f")


def _now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class RecordStatus:
    state: str  # "done" | "missing" | "corrupt" | "running" | "interrupted"
    detail: str = ""


def check_record(rec, where: str) -> dict:
    if not isinstance(rec, dict) or not isinstance(rec.get("metrics"), dict):
        raise DeftlabError(f"{where} has no 'metrics' mapping", "it is not a deftlab record")
    if rec.get("format") != RECORD_FORMAT:
        raise DeftlabError(f"{where} is not a {RECORD_FORMAT} record (format {rec.get('format')!r})",
                           "migrate the store once: python tools/migrate_store_v2.py RESULTS_DIR")
    return rec


def read_record(run_dir: str | os.PathLike) -> dict:
    """The record of one run directory; a clear error when it has none or it is unreadable."""
    path = Path(run_dir) / RECORD
    if not path.is_file():
        raise DeftlabError(f"{run_dir} has no {RECORD}", "pass the directory of a recorded run")
    try:
        rec = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DeftlabError(f"{path} is unreadable ({e})", "re-run the run (the runner moves it aside)") from e
    return check_record(rec, str(path))


def artifact_list(run_dir: Path) -> list[str]:
    """Every file of a run directory but its record and dot-files (the lease, temp files)."""
    return sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*")
                  if p.is_file() and p.name != RECORD and not p.name.startswith("."))


class ResultsStore:
    """Reads and writes run directories under one root; records are written atomically (temp file + rename)."""

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
            partial = self.partial_dir(kind, key)
            if partial.is_dir():
                state, lease, age = lease_state(partial)
                who = f"{(lease or {}).get('host')} pid {(lease or {}).get('pid')}"
                return None, RecordStatus("running" if state == "fresh" else "interrupted",
                                          f"{who}, heartbeat {age:.0f} s ago")
            return None, RecordStatus("missing")
        try:
            rec = read_record(path.parent)
        except DeftlabError as e:
            return None, RecordStatus("corrupt", str(e))
        return rec, RecordStatus("done")

    def status(self, kind: str, key: str) -> RecordStatus:
        return self._read(kind, key)[1]

    def load(self, kind: str, key: str) -> dict | None:
        """The run's record, or None when it is not done (corrupt records are left in place here; the runner
        moves them aside before it re-runs)."""
        return self._read(kind, key)[0]

    def kinds(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def records(self, kind: str | None = None) -> Iterator[dict]:
        """Every readable record in the store (dot-directories, i.e. runs in flight or moved aside, are skipped)."""
        for k in [kind] if kind else self.kinds():
            base = self.root / k
            if not base.is_dir():
                continue
            for d in sorted(base.iterdir()):
                if d.name.startswith(".") or not d.is_dir():
                    continue
                rec, _ = self._read(k, d.name)
                if rec is not None:
                    yield rec

    def locate(self, run: str | os.PathLike) -> Path:
        """A run's directory: `run` itself when it is a directory, else the run whose key (or key prefix, or
        kind/key) it is in this store (`find`). Reading its record (`read_record`) checks it is one."""
        path = Path(run).expanduser()
        if path.is_dir():
            return path
        rec = self.find(str(run))
        return self.run_dir(rec["kind"], rec["key"])

    def find(self, key: str) -> dict:
        """The record whose key is `key` or starts with it (any kind; 'kind/key' also works)."""
        kind, _, key = key.rpartition("/")
        key = key.strip()
        if len(key) < 4:
            raise DeftlabError(f"run key '{key}' is too short to look up", "give at least 4 hex digits")
        hits = []
        for k in [kind] if kind else self.kinds():
            base = self.root / k
            if base.is_dir():
                hits += [(k, d.name) for d in base.iterdir() if d.is_dir() and d.name.startswith(key)]
        if not hits:
            raise DeftlabError(f"no run with key {key} in {self.root}",
                               "check the key (tables print it in their 'run' column) or pass --results")
        if len(hits) > 1:
            raise DeftlabError(f"key {key} matches {len(hits)} runs: {[f'{a}/{b}' for a, b in hits][:5]}",
                               "give more digits")
        rec, st = self._read(*hits[0])
        if rec is None:
            raise DeftlabError(f"run {hits[0][0]}/{hits[0][1]} is {st.state} ({st.detail})",
                               "re-run it (deftlab run ... or the command that made it)")
        return rec

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

    def claim(self, kind: str, key: str) -> Lease:
        """The run's in-flight directory with this process's lease (heartbeat running). An interrupted attempt's
        directory is taken over and kept, so the run resumes inside it; a live one raises RunInProgressError."""
        return claim(self.partial_dir(kind, key), f"{kind}/{key}").start()

    def commit(self, kind: str, key: str, lease: Lease, *, params: dict, metrics: dict, config: dict | None = None,
               fingerprint: dict | None = None, refs: dict | None = None, origin: dict | None = None,
               seed: int | None = None, started: float | None = None) -> dict:
        """Write the run's record into its in-flight directory and rename that into place (atomic); returns the
        record. An existing final directory (a --force re-run) is moved aside first, never overwritten."""
        lease.check()
        partial = lease.run_dir
        finished = time.time()
        manifest = build_manifest({}, seed)
        manifest.pop("config", None)
        record = {
            "format": RECORD_FORMAT, "key": key, "kind": kind, "status": "ok",
            "params": params, "fingerprint": fingerprint or {}, "refs": refs or {},
            "config": config, "metrics": metrics, "artifacts": artifact_list(partial),
            "origin": origin or {},
            "run": {"host": host_name(), "pid": os.getpid(), "started_at": lease.started_at,
                    "finished_at": _now_iso(),
                    "duration_s": round(finished - started, 3) if started is not None else None,
                    "attempts": lease.attempt},
            "manifest": manifest,
        }
        write_json_atomic(partial / RECORD, record)
        lease.stop()
        final = self.run_dir(kind, key)
        if final.exists():
            _, st = self._read(kind, key)
            self._move_aside(final, kind, key, "superseded" if st.state == "done" else "incomplete")
        _drop_bookkeeping(partial)
        os.replace(partial, final)
        return record

    def fail(self, kind: str, key: str, lease: Lease, exc: BaseException, context: dict | None = None) -> Path:
        """Keep a failed run's directory (with the traceback) as .<key>.failed-<time>."""
        lease.stop()
        partial = lease.run_dir
        try:
            tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
            (partial / "traceback.txt").write_text(tb)
            if context is not None:
                write_json_atomic(partial / "failed_run.json", context)
            _drop_bookkeeping(partial)
        except OSError:  # the failure report must not hide the original error
            log.exception("could not write the failure report into %s", partial)
        return self._move_aside(partial, kind, key, "failed")


def _drop_bookkeeping(run_dir: Path) -> None:
    (run_dir / LEASE_FILE).unlink(missing_ok=True)
    for p in run_dir.glob(".takeover-*"):
        shutil.rmtree(p, ignore_errors=True)
