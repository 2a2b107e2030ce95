"""Decomposed checkpoints (with their adapter): safetensors weights + `rank_map.json`, reloadable without
re-running the search.

Layout of a checkpoint dir (never pickle):
    model.safetensors   base weights; LowRankLinear layers as `<name>.u_proj.weight` / `<name>.v_proj.weight`
    rank_map.json       {"format", "version", "modules": {name: {rank, factored, lrc, full_rank, shape}},
                         "lora": {"r", "alpha"} | null, "tied": {alias: source}}
    config.json         the HF config, when the model has one
    adapter/            PEFT adapter (save_pretrained), when a PeftModel was saved

Loading rebuilds the LowRankLinear shapes from the rank map on the meta device before reading any weight (the
ASVD `truncation_ranks` pattern), so only the decomposed model's tensors are ever allocated.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from deftlab.adapters.attach import load_adapter
from deftlab.errors import CacheCorruptError, DeftlabError
from deftlab.surgery.lowrank import LowRankLinear
from deftlab.surgery.quantize import is_4bit
from deftlab.surgery.replace import (
    AllocationLike,
    hf_factory,
    checkpoint_files,
    empty_model,
    finish_loading,
    get_parent,
    stream_checkpoint,
)

FORMAT = "deftlab-decomposed"
VERSION = 1
RANK_MAP = "rank_map.json"
ADAPTER_DIR = "adapter"


def _unwrap(model: nn.Module) -> tuple[nn.Module, Any]:
    """(base model, peft model or None)."""
    if hasattr(model, "get_base_model") and hasattr(model, "peft_config"):
        return model.get_base_model(), model
    return model, None


def _base_state_dict(base: nn.Module) -> dict[str, torch.Tensor]:
    """State dict without LoRA tensors and with PEFT's `.base_layer` hop removed (the plain model's keys)."""
    out = {}
    for key, value in base.state_dict(keep_vars=False).items():
        if "lora_" in key:
            continue
        out[key.replace(".base_layer.", ".")] = value
    return out


def rank_map_of(model: nn.Module, allocation: AllocationLike | None = None) -> dict:
    """The rank map of a (possibly PEFT-wrapped) decomposed model: actual factor ranks, allocation flags."""
    base, peft_model = _unwrap(model)
    modules: dict[str, dict] = {}
    for name, m in base.named_modules():
        plain = name.replace(".base_layer", "")
        if isinstance(m, LowRankLinear):
            modules[plain] = {"rank": m.rank, "factored": True, "shape": [m.out_features, m.in_features]}
    if allocation is not None:
        for name, rank in allocation.ranks.items():
            entry = modules.setdefault(name, {"rank": int(rank), "factored": False})
            if "shape" not in entry:
                lin = base.get_submodule(name)
                lin = getattr(lin, "base_layer", lin)
                entry["shape"] = [lin.out_features, lin.in_features]
            entry["lrc"] = bool(allocation.lrc.get(name, False))
    for entry in modules.values():
        entry.setdefault("lrc", False)
        entry["full_rank"] = min(entry["shape"])
    lora = None
    if peft_model is not None:
        cfg = peft_model.peft_config[peft_model.active_adapter]
        lora = {"r": cfg.r, "alpha": cfg.lora_alpha}
    return {"format": FORMAT, "version": VERSION, "modules": dict(sorted(modules.items())), "lora": lora}


def save_decomposed(model: nn.Module, allocation: AllocationLike | None, path: str | Path) -> Path:
    """Write weights (safetensors), rank_map.json, config.json and (for a PeftModel) the adapter to `path`."""
    path = Path(path)
    base, peft_model = _unwrap(model)
    if any(is_4bit(m) for m in base.modules()):
        raise DeftlabError("cannot save 4-bit weights as a decomposed checkpoint", "save the float model, quantise on load")
    if any(getattr(m, "merged_adapters", None) for m in base.modules()):
        raise DeftlabError("an adapter is merged into the base weights", "unmerge it, or save merge_for_eval's model")
    path.mkdir(parents=True, exist_ok=True)
    state = _base_state_dict(base)
    tied: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    tensors: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if t.numel() and ident in seen:
            tied[key] = seen[ident]
            continue
        seen[ident] = key
        tensors[key] = t.detach().contiguous()
    rank_map = rank_map_of(model, allocation)
    rank_map["tied"] = tied
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt", "deftlab": FORMAT})
    (path / RANK_MAP).write_text(json.dumps(rank_map, indent=1))
    config = getattr(base, "config", None)
    if config is not None and hasattr(config, "save_pretrained"):
        config.save_pretrained(str(path))
    if peft_model is not None:
        peft_model.save_pretrained(str(path / ADAPTER_DIR))
    return path


def read_rank_map(path: str | Path) -> dict:
    file = Path(path) / RANK_MAP
    if not file.is_file():
        raise DeftlabError(f"no {RANK_MAP} in {path}", "point to a dir written by save_decomposed")
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise CacheCorruptError(f"malformed {file}: {e}", "re-save the checkpoint") from e
    if data.get("format") != FORMAT or data.get("version") != VERSION:
        raise CacheCorruptError(f"{file} is not a {FORMAT} v{VERSION} rank map", "re-save with this deftlab")
    return data


def load_decomposed_checkpoint(
    path: str | Path,
    base_model_loader: Callable[[], nn.Module] | None = None,
    *,
    is_trainable: bool = False,
) -> nn.Module:
    """Rebuild a model saved by `save_decomposed`.

    base_model_loader: builds the architecture (e.g. `lambda: tiny_llama()` or
    `lambda: AutoModelForCausalLM.from_config(cfg)`); it is called under meta-device init, so nothing is
    allocated. Default: the config.json in `path`. Returns a PeftModel if the dir has an adapter.
    """
    path = Path(path)
    rank_map = read_rank_map(path)
    model = empty_model(base_model_loader or hf_factory(path))
    for name, entry in rank_map["modules"].items():
        if not entry["factored"]:
            continue
        parent, attr = get_parent(model, name)
        old = getattr(parent, attr)
        out_f, in_f = entry["shape"]
        if not isinstance(old, nn.Linear) or (old.out_features, old.in_features) != (out_f, in_f):
            raise CacheCorruptError(f"rank map entry '{name}' does not fit the architecture", "use the matching loader")
        new = LowRankLinear(in_f, out_f, entry["rank"], bias=old.bias is not None, device="meta")
        new.requires_grad_(old.weight.requires_grad)
        setattr(parent, attr, new)
    stream_checkpoint(model, checkpoint_files(path))
    for alias, source in rank_map.get("tied", {}).items():
        _tie(model, alias, source)
    finish_loading(model)
    model.eval()
    if (path / ADAPTER_DIR).is_dir():
        return load_adapter(model, str(path / ADAPTER_DIR), is_trainable=is_trainable)
    return model


def _tie(model: nn.Module, alias: str, source: str) -> None:
    src_mod, _, src_attr = source.rpartition(".")
    dst_mod, _, dst_attr = alias.rpartition(".")
    param = model.get_submodule(src_mod)._parameters[src_attr]
    model.get_submodule(dst_mod)._parameters[dst_attr] = param
