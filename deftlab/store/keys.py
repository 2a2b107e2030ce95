"""Run keys: the first 12 hex digits of SHA-256 over the canonical JSON of {kind, params[, fingerprint]}.

Canonical: sorted keys, tuples as lists, integral floats as ints (1.0 and 1 hash alike). The key is what makes
results content-addressed: two experiments that need the same run share it, and a changed param is a new run.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

from deftlab.errors import DeftlabError

KEY_LEN = 12


def _canonical(obj: Any) -> Any:
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


def short_digest(obj: Any, n: int = KEY_LEN) -> str:
    """The first n hex digits of SHA-256 over the canonical JSON of obj."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:n]


def run_key(kind: str, params: dict, fingerprint: dict | None = None) -> str:
    """Stable short hash of a run: same kind + same params (+ the kind's fingerprint) -> same key."""
    payload = {"kind": kind, "params": params}
    if fingerprint:
        payload["fingerprint"] = fingerprint
    return short_digest(payload)
