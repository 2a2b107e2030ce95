"""One safetensors file per stored fine-tuned update, and applying decoded updates to a model's weights.

File layout (format ``deftlab-delta-v1``, never pickle):

- tensors named ``<module name>::<tensor key>``, e.g. ``model.layers.0.self_attn.q_proj::A.indices``; the data
  section therefore holds exactly ``sum(encoded.nbytes)`` bytes;
- header metadata (safetensors allows only str → str, so values are JSON strings):
  ``deftlab.format``, ``deftlab.entries`` (per module: codec, shape, ranks, index encoding, per-matrix budget,
  tensor dtypes/shapes — everything ``decode`` needs), ``deftlab.metadata`` (the caller's dict: base-model
  fingerprint, run id, ...), ``deftlab.total_nbytes`` and ``deftlab.sha256`` (digest of every tensor's name, dtype,
  shape and bytes, so silent corruption of the data section is caught on load).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from deftlab.checksums import digest
from deftlab.delta.codecs import Encoded, decode
from deftlab.errors import CacheCorruptError, DataNotFoundError, DeftlabError

FORMAT = "deftlab-delta-v1"
SEP = "::"


def save_delta(
    path: str | os.PathLike, encoded: Mapping[str, Encoded], metadata: Mapping[str, Any] | None = None
) -> Path:
    """Write every module's ``Encoded`` update into ONE safetensors file at ``path`` (atomically)."""
    from safetensors.torch import save_file

    path = Path(path)
    if not encoded:
        raise DeftlabError("no encoded updates to save", "encode at least one matrix")
    tensors: dict[str, torch.Tensor] = {}
    entries: dict[str, Any] = {}
    for module, enc in encoded.items():
        if not isinstance(enc, Encoded):
            raise DeftlabError(
                f"update for '{module}' is a {type(enc).__name__}, not Encoded", "pass the result of codecs.encode"
            )
        if not module or SEP in module:
            raise DeftlabError(
                f"module name '{module}' is empty or contains '{SEP}'", "use the nn.Module's dotted name"
            )
        for key, t in enc.tensors.items():
            # copy: safetensors refuses tensors that share storage, and files must not depend on the device
            tensors[f"{module}{SEP}{key}"] = t.detach().to("cpu", copy=True).contiguous()
        entries[module] = enc.header()
    try:
        header = {
            "deftlab.format": FORMAT,
            "deftlab.entries": json.dumps(entries, sort_keys=True),
            "deftlab.metadata": json.dumps(dict(metadata or {}), sort_keys=True),
            "deftlab.total_nbytes": str(sum(e.nbytes for e in encoded.values())),
            "deftlab.sha256": digest(tensors),
        }
    except TypeError as e:
        raise DeftlabError(
            f"delta metadata is not JSON-serialisable ({e})", "use str/int/float/list/dict values"
        ) from None
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=header)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _corrupt(path: Path, why: str) -> CacheCorruptError:
    return CacheCorruptError(f"delta file {path} is corrupt: {why}", "delete it and encode the update again")


def load_delta(path: str | os.PathLike) -> tuple[dict[str, Encoded], dict[str, Any]]:
    """Read a file written by ``save_delta``: ({module name: Encoded}, caller metadata)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError(f"delta file {path} not found", "check the path or encode the update first")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for bad headers and short files
        raise _corrupt(path, f"unreadable safetensors ({type(e).__name__}: {e})") from None
    if header.get("deftlab.format") != FORMAT:
        raise _corrupt(path, f"not a {FORMAT} file (format {header.get('deftlab.format')!r})")
    try:
        entries = json.loads(header["deftlab.entries"])
        metadata = json.loads(header["deftlab.metadata"])
        total = int(header["deftlab.total_nbytes"])
        recorded = header["deftlab.sha256"]
    except (KeyError, ValueError) as e:
        raise _corrupt(path, f"bad header ({type(e).__name__}: {e})") from None
    if digest(tensors) != recorded:
        raise _corrupt(path, "tensor checksum mismatch")
    out: dict[str, Encoded] = {}
    seen: set[str] = set()
    try:
        for module, h in entries.items():
            parts = {}
            for key, (dtype, shape) in h["tensors"].items():
                name = f"{module}{SEP}{key}"
                t = tensors.get(name)
                if t is None or str(t.dtype).removeprefix("torch.") != dtype or list(t.shape) != shape:
                    raise _corrupt(path, f"tensor '{name}' is missing or has the wrong dtype/shape")
                parts[key] = t
                seen.add(name)
            out[module] = Encoded(h["codec"], (int(h["shape"][0]), int(h["shape"][1])), parts, dict(h["meta"]))
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise _corrupt(path, f"bad entry description ({type(e).__name__}: {e})") from None
    extra = set(tensors) - seen
    if extra:
        raise _corrupt(path, f"undescribed tensors {sorted(extra)[:3]}")
    if sum(e.nbytes for e in out.values()) != total:
        raise _corrupt(path, "stored byte count differs from the header")
    return out, metadata


def _weights(target: nn.Module | dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    if isinstance(target, nn.Module):
        found = {}
        for name, mod in target.named_modules():
            w = getattr(mod, "weight", None)
            if isinstance(w, torch.Tensor):
                found[name] = w
        return found, "model"
    if isinstance(target, dict):
        return {k.removesuffix(".weight"): v for k, v in target.items() if k.endswith(".weight")}, "state dict"
    raise DeftlabError(f"cannot apply a delta to a {type(target).__name__}", "pass an nn.Module or a state dict")


def apply_delta(
    target: nn.Module | dict[str, torch.Tensor],
    deltas: Mapping[str, torch.Tensor | Encoded],
    sign: float = 1.0,
) -> list[str]:
    """Add ``sign · ΔW`` in place to ``<module name>.weight`` for every entry; returns the module names updated.

    Works on an nn.Module (modules looked up by dotted name) or a state dict (keys ``<name>.weight``). Sums are
    formed in float32 and written back in the weight's own dtype. All names and shapes are checked before any
    weight changes, so a bad entry leaves the target untouched. ``sign=-1`` removes a previously applied update
    (exactly only for float32 weights).
    """
    weights, kind = _weights(target)
    plan = []
    for name, delta in deltas.items():
        w = weights.get(name)
        if w is None:
            examples = ", ".join(sorted(weights)[:3]) or "none"
            raise DeftlabError(f"no weight '{name}.weight' in the {kind}", f"use module names such as: {examples}")
        d = decode(delta) if isinstance(delta, Encoded) else delta
        if tuple(d.shape) != tuple(w.shape):
            raise DeftlabError(
                f"update for '{name}' has shape {tuple(d.shape)}, weight has {tuple(w.shape)}",
                "encode the update of this exact weight",
            )
        if not w.is_floating_point():
            raise DeftlabError(f"weight '{name}.weight' is {w.dtype}, not floating point", "apply before quantising")
        plan.append((name, w, d))
    with torch.no_grad():
        for _, w, d in plan:
            w.copy_((w.float() + sign * d.to(device=w.device, dtype=torch.float32)).to(w.dtype))
    return [name for name, _, _ in plan]
