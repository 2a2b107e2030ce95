"""Checksums that detect truncated or corrupt cache, checkpoint and delta files.

``digest`` hashes named tensors (name, dtype, shape and bytes) in memory without copying the data: a writer never
reads its file back, and a reader checks exactly what it is about to use. ``file_sha256`` hashes a file on disk.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Mapping
from pathlib import Path

import torch


class Crc32:
    """hashlib-style wrapper of zlib.crc32: ~3.5× faster than sha256 here (6.9 vs 2.0 GB/s) and releases the
    GIL on large buffers. It catches accidental corruption (every burst up to 32 bits, anything else with
    probability 1 − 2⁻³²), which is all a local cache needs; it is not tamper-proof."""

    def __init__(self) -> None:
        self.value = 0

    def update(self, data) -> None:
        self.value = zlib.crc32(data, self.value)

    def hexdigest(self) -> str:
        return f"{self.value:08x}"


def digest(tensors: Mapping[str, torch.Tensor], algorithm: str = "sha256") -> str:
    """Hex digest over the tensors in name order; ``algorithm`` is "sha256" or "crc32"."""
    if algorithm not in ("sha256", "crc32"):
        raise ValueError(f"unknown digest algorithm {algorithm!r}")
    h = hashlib.sha256() if algorithm == "sha256" else Crc32()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        if t.numel():
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())  # a view, no copy
    return h.hexdigest()


def file_sha256(path: Path, chunk: int = 1 << 24) -> str:
    """sha256 (hex) of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
