"""On-disk cache of per-matrix decompositions, reused for any budget and any allocator.

Layout: <cache>/decompositions/<key>/index.json + one safetensors file per matrix. The key covers the model
weights' fingerprint, the calibration statistics' key (or "plain" for data-agnostic SVD), the targets and a
format version. Each entry records its size and sha256; an entry that fails either check is reported and
recomputed, never used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch

from deftlab.decompose.whiten import Decomposition
from deftlab.settings import cache_dir

log = logging.getLogger(__name__)
FORMAT = "decomp-v1"


def decomposition_key(model_fingerprint: str, stats_key: str | None, targets) -> str:
    blob = json.dumps([model_fingerprint, stats_key or "plain", sorted(targets), FORMAT])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()


class DecompositionCache:
    def __init__(self, key: str, meta: dict | None = None, root: Path | None = None):
        self.dir = (root or cache_dir() / "decompositions") / key
        self.dir.mkdir(parents=True, exist_ok=True)
        self.index_path = self.dir / "index.json"
        self.index = {"format": FORMAT, "meta": meta or {}, "entries": {}}
        if self.index_path.exists():
            try:
                self.index = json.loads(self.index_path.read_text())
            except json.JSONDecodeError:
                log.warning("decomposition index %s is corrupt; entries will be recomputed", self.index_path)

    def _file(self, name: str) -> Path:
        return self.dir / (hashlib.sha256(name.encode()).hexdigest()[:20] + ".safetensors")

    def get(self, name: str) -> Decomposition | None:
        from safetensors.torch import load_file

        rec = self.index["entries"].get(name)
        if rec is None:
            return None
        f = self._file(name)
        why = None
        if not f.is_file():
            why = "file missing"
        elif f.stat().st_size != rec["size"]:
            why = f"{f.stat().st_size} bytes, expected {rec['size']} (truncated)"
        elif _sha256(f) != rec["sha256"]:
            why = "checksum mismatch (corrupt)"
        if why is None:
            try:
                return Decomposition.from_tensors(load_file(str(f)), rec["meta"])
            except Exception as e:  # unreadable safetensors header
                why = f"unreadable ({e})"
        log.warning("decomposition cache entry %s for %s: %s; recomputing", f.name, name, why)
        return None

    def put(self, name: str, dec: Decomposition) -> None:
        from safetensors.torch import save_file

        f = self._file(name)
        tmp = f.with_suffix(f".tmp{os.getpid()}")
        tensors, meta = dec.to_tensors()
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, f)
        self.index["entries"][name] = {"size": f.stat().st_size, "sha256": _sha256(f), "meta": meta}
        self._write_index()

    def _write_index(self) -> None:
        tmp = self.index_path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(self.index, indent=1))
        os.replace(tmp, self.index_path)

    def __contains__(self, name: str) -> bool:
        return name in self.index["entries"]


def decompose_all(weights: dict[str, torch.Tensor], grams: dict[str, torch.Tensor] | None,
                  cache: DecompositionCache | None, *, progress: bool = True) -> dict[str, Decomposition]:
    """Decomposition of every weight (whitened with its Gram when `grams` is given), from the cache when valid.

    Cache writes (safetensors + sha256 + index) run on one background thread, overlapping the next SVD; all of
    them have finished (or raised) when this returns."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    from deftlab.decompose.whiten import cholesky_factor, whitened_svd

    out = {}
    factors: dict[int, tuple] = {}  # one Cholesky per shared Gram (q/k/v, gate/up read the same input)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="decomposition-cache") as writer:
        writes = []
        for name in tqdm(list(weights), desc="decompose", disable=not progress, unit="mat"):
            dec = cache.get(name) if cache is not None else None
            if dec is None:
                gram = None if grams is None else grams[name]
                chol = None
                if gram is not None:
                    if id(gram) not in factors:
                        factors[id(gram)] = (gram, cholesky_factor(gram))  # keep gram alive: id() stays unique
                    chol = factors[id(gram)][1]
                dec = whitened_svd(weights[name].detach(), gram, cholesky=chol)
                if dec.jitter:
                    log.info("%s: Gram not positive definite, added jitter %.3g", name, dec.jitter)
                if cache is not None:
                    writes.append(writer.submit(cache.put, name, dec))
            out[name] = dec
        for w in writes:
            w.result()  # re-raise a failed write here
    return out
