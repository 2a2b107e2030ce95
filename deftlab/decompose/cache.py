"""On-disk cache of per-matrix decompositions, reused for any budget and any allocator.

Layout: <cache>/decompositions/<key>/index.json + one safetensors file per matrix. The key covers the model
weights' fingerprint, the calibration statistics' key (or "plain" for data-agnostic SVD), the targets and a
format version. Each entry records its file size and a CRC-32 of its tensors (computed in memory when written,
checked on the loaded tensors when read; entries written before carry a sha256 of the file, still honoured); an
entry that fails either check is reported and recomputed, never used. The index is rewritten at most every
INDEX_EVERY seconds while writing and always at the end (``flush``), so a killed run loses at most that much work.
Several processes may fill one cache at once (sharded decomposition, `decompose_all(shard=)`): entry files are
written under temporary names and renamed, and every index write merges the index on disk with this process's
entries under an exclusive file lock (index.lock), so no writer drops another's entries.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path

from safetensors.torch import load_file, save_file

from deftlab.checksums import digest, file_sha256
from deftlab.decompose.whiten import Decomposition
from deftlab.errors import CacheCorruptError, DeftlabError
from deftlab.settings import cache_dir

log = logging.getLogger(__name__)
FORMAT = "decomp-v1"


def decomposition_key(model_fingerprint: str, stats_key: str | None, targets) -> str:
    blob = json.dumps([model_fingerprint, stats_key or "plain", sorted(targets), FORMAT])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


INDEX_EVERY = 2.0  # seconds between index rewrites during a run (each rewrite serialises the whole index)


@contextmanager
def _exclusive(path: Path):
    """An inter-process exclusive lock on `path` (POSIX flock; a no-op where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:  # Windows: one writer at a time is the user's job there
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class DecompositionCache:
    def __init__(self, key: str, meta: dict | None = None, root: Path | None = None):
        self.dir = (root or cache_dir() / "decompositions") / key
        self.dir.mkdir(parents=True, exist_ok=True)
        self.index_path = self.dir / "index.json"
        self.index = {"format": FORMAT, "meta": meta or {}, "entries": {}}
        self._index_written = time.monotonic()
        self._dirty = False
        self._lock = threading.Lock()  # decompose_all writes entries from several threads
        on_disk = self._read_index()
        if on_disk is not None:
            self.index = on_disk

    def _read_index(self) -> dict | None:
        if not self.index_path.exists():
            return None
        try:
            return json.loads(self.index_path.read_text())
        except json.JSONDecodeError:
            log.warning("decomposition index %s is corrupt; entries will be recomputed", self.index_path)
            return None

    def _file(self, name: str) -> Path:
        return self.dir / (hashlib.sha256(name.encode()).hexdigest()[:20] + ".safetensors")

    def get(self, name: str) -> Decomposition | None:
        rec = self.index["entries"].get(name)
        if rec is None:
            return None
        f = self._file(name)
        why = None
        if not f.is_file():
            why = "file missing"
        elif f.stat().st_size != rec["size"]:
            why = f"{f.stat().st_size} bytes, expected {rec['size']} (truncated)"
        elif "crc32" not in rec and "sha256" not in rec:
            why = "no checksum recorded"
        elif "sha256" in rec and file_sha256(f) != rec["sha256"]:  # entries written before the CRC
            why = "checksum mismatch (corrupt)"
        if why is None:
            try:
                tensors = load_file(str(f))
                if "crc32" in rec and digest(tensors, "crc32") != rec["crc32"]:
                    why = "checksum mismatch (corrupt)"
                else:
                    return Decomposition.from_tensors(tensors, rec["meta"])
            except Exception as e:  # unreadable safetensors header
                why = f"unreadable ({e})"
        log.warning("decomposition cache entry %s for %s: %s; recomputing", f.name, name, why)
        return None

    def sigma(self, name: str):
        """The stored σ of `name` alone (a few KB read, not the factors), or None when there is no usable entry;
        the full entry's CRC is checked when its factors are read (`get`)."""
        from safetensors import safe_open

        rec = self.index["entries"].get(name)
        f = self._file(name)
        if rec is None or not f.is_file() or f.stat().st_size != rec["size"]:
            return None
        try:
            with safe_open(str(f), framework="pt") as h:
                return h.get_tensor("sigma")
        except Exception:  # unreadable header: `get` reports and recomputes it
            return None

    def lazy(self, names) -> "CachedDecompositions":
        """A read-on-access Mapping of `names` to their cached decompositions (one in memory at a time)."""
        return CachedDecompositions(self, names)

    def put(self, name: str, dec: Decomposition) -> None:
        f = self._file(name)
        tmp = f.with_suffix(f".tmp{os.getpid()}")
        tensors, meta = dec.to_tensors()
        tensors = {k: v.contiguous() for k, v in tensors.items()}
        save_file(tensors, str(tmp))
        os.replace(tmp, f)
        rec = {"size": f.stat().st_size, "crc32": digest(tensors, "crc32"), "meta": meta}
        with self._lock:
            self.index["entries"][name] = rec
            self._dirty = True
        if time.monotonic() - self._index_written >= INDEX_EVERY:
            self.flush()

    def flush(self) -> None:
        """Write the index, merged with the one on disk, if entries were added since it was last written."""
        with self._lock:
            if self._dirty:
                with _exclusive(self.dir / "index.lock"):
                    on_disk = self._read_index()
                    if on_disk is not None:  # another process's entries, kept beside ours
                        self.index["entries"] = {**on_disk.get("entries", {}), **self.index["entries"]}
                    tmp = self.index_path.with_suffix(f".tmp{os.getpid()}")
                    tmp.write_text(json.dumps(self.index, indent=1))
                    os.replace(tmp, self.index_path)
                self._index_written, self._dirty = time.monotonic(), False

    def __contains__(self, name: str) -> bool:
        return name in self.index["entries"]

    def wait_for(self, names, *, timeout: float = 86400.0, poll: float = 1.0) -> None:
        """Block until every one of `names` is indexed, re-reading the index other processes write (the shards of
        one launch); a clear error after `timeout` seconds."""
        self.flush()
        deadline = time.monotonic() + timeout
        while True:
            on_disk = self._read_index() or {}
            with self._lock:
                self.index["entries"] = {**on_disk.get("entries", {}), **self.index["entries"]}
            missing = [n for n in names if n not in self.index["entries"]]
            if not missing:
                return
            if time.monotonic() > deadline:
                raise DeftlabError(f"{len(missing)} decompositions (e.g. {missing[0]}) never appeared in {self.dir}",
                                   "a shard's process failed: rerun it, or run without shards")
            time.sleep(poll)


class CachedDecompositions(Mapping):
    """Decompositions read from a cache when accessed, so building a model holds one matrix's factors at a time."""

    def __init__(self, cache: DecompositionCache, names):
        self.cache, self.names = cache, list(names)

    def __getitem__(self, name: str) -> Decomposition:
        if name not in self.names:
            raise KeyError(name)
        dec = self.cache.get(name)
        if dec is None:
            raise CacheCorruptError(f"decomposition of {name} is missing or corrupt in {self.cache.dir}",
                                    "run again: the missing entries are recomputed")
        return dec

    def __contains__(self, name) -> bool:
        return name in self.names and name in self.cache

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)
