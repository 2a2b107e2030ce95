"""Block-sequential calibration: the same statistics as `calibration.collect_statistics` (each target linear's
input Gram and output outlier ratio α) with one decoder block resident at a time.

1. The calibration batches run through the model up to its first decoder block, where a catcher stops them: the
   block inputs (hidden states) and the keyword arguments the model prepared for its blocks (causal/padding mask,
   rotary position embeddings, position ids) are kept, per batch, on `hidden_device`.
2. Block by block: the block is brought to the device (moved from the in-memory model, or read from the
   checkpoint's safetensors shards into a meta skeleton), every batch runs through it with the statistics hooks
   on its target linears, and its outputs replace its inputs. Propagation stays dense (SVD-LLM / OWL): each block
   sees the uncompressed model's inputs, exactly as in the whole-model pass.
3. `on_block(index, stats)` receives the block's finished statistics, a CalibrationStats of its own (e.g. to
   decompose its matrices into the cache, or `stats.save` them); with `keep_grams=False` they are dropped afterwards, so memory holds one block's weights, one block's Grams and
   the hidden states, whatever the depth.

Peak ≈ one block + its Grams + the calibration set's hidden states (deftlab.planner.memory.calibration_phase).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from deftlab.decompose.calibration import CalibrationStats, _Collector, calibration_body
from deftlab.decompose.targets import DEFAULT_TARGETS
from deftlab.errors import DeftlabError


class _Caught(Exception):
    pass


class _Catcher(torch.nn.Module):
    """Stands in for the first decoder block: records what the model passes to it, then stops the forward."""

    def __init__(self, block: torch.nn.Module):
        super().__init__()
        self.block = block
        self.args: tuple = ()
        self.kwargs: dict = {}

    def forward(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs
        raise _Caught


def _move(x, device):
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, tuple):
        return tuple(_move(v, device) for v in x)
    if isinstance(x, list):
        return [_move(v, device) for v in x]
    if isinstance(x, dict):
        return {k: _move(v, device) for k, v in x.items()}
    return x


def decoder_layers(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """(qualified name, ModuleList) of the model's decoder blocks: the ModuleList named `layers` (LLaMA, Mistral,
    Qwen: model.layers; OPT: model.decoder.layers)."""
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and name.rsplit(".", 1)[-1] == "layers" and len(mod):
            return name, mod
    raise DeftlabError(f"{type(model).__name__} has no ModuleList named 'layers'",
                       "block-sequential calibration needs HF decoder blocks; use the whole-model pass")


class ShardReader:
    """Tensors of a safetensors checkpoint by name, read one at a time (model.safetensors or a sharded
    model.safetensors.index.json), never the whole file."""

    def __init__(self, ckpt_dir: str | Path):
        self.dir = Path(ckpt_dir)
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            self.where = {k: self.dir / f for k, f in json.loads(index.read_text())["weight_map"].items()}
        elif (self.dir / "model.safetensors").is_file():
            from safetensors import safe_open

            with safe_open(str(self.dir / "model.safetensors"), framework="pt") as f:
                self.where = dict.fromkeys(f.keys(), self.dir / "model.safetensors")
        else:
            raise DeftlabError(f"{self.dir} holds no model.safetensors(.index.json)",
                               "point at a Hugging Face checkpoint directory saved with safetensors")

    def load(self, prefix: str, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """Every tensor whose name starts with `prefix`, the prefix removed."""
        from safetensors import safe_open

        out: dict[str, torch.Tensor] = {}
        by_file: dict[Path, list[str]] = {}
        for k, f in self.where.items():
            if k.startswith(prefix):
                by_file.setdefault(f, []).append(k)
        for f, keys in by_file.items():
            with safe_open(str(f), framework="pt", device=str(device)) as h:
                for k in keys:
                    out[k[len(prefix):]] = h.get_tensor(k)
        if not out:
            raise DeftlabError(f"no tensor named {prefix}* in {self.dir}", "check the checkpoint's layout")
        return out


def skeleton_from_checkpoint(ckpt_dir: str | Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The checkpoint's HF model on the meta device (no weights), for `collect_statistics_blockwise(reader=)`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(ckpt_dir))
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def _materialise(module: torch.nn.Module, state: dict[str, torch.Tensor], device, dtype) -> None:
    """Put the checkpoint's tensors into a meta module as its parameters (assigned, not copied: one copy)."""
    state = {k: v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device) for k, v in state.items()}
    missing, unexpected = module.load_state_dict(state, strict=False, assign=True)
    left = [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
    if missing or unexpected or left:
        raise DeftlabError(f"checkpoint tensors do not match the block: missing {(missing or left)[:3]}, "
                           f"unexpected {unexpected[:3]}", "use the checkpoint the skeleton was built from")


def _prepare_meta_inputs(model: torch.nn.Module, reader: ShardReader, device, dtype) -> list[torch.nn.Module]:
    """Give a meta skeleton what runs before its first block: the token (and position) embeddings from the
    checkpoint, rotary embeddings rebuilt on the device. Returns the modules to send back to meta afterwards."""
    layers_name, _ = decoder_layers(model)
    body_prefix = layers_name.rsplit(".", 1)[0]
    body = model.get_submodule(body_prefix)
    restore = []
    for name, mod in body.named_children():
        if name == "layers":
            continue
        has_meta = any(t.is_meta for t in list(mod.parameters(recurse=True)) + list(mod.buffers(recurse=True)))
        if not has_meta:
            continue
        if "rotary" in name:  # non-persistent inv_freq: rebuild it from the config, on the device
            with torch.device(device):
                setattr(body, name, type(mod)(config=model.config))
            continue
        params = dict(mod.named_parameters())
        if not params:
            continue
        if name in ("norm", "final_layer_norm"):
            continue  # after the blocks: never runs here
        _materialise(mod, reader.load(f"{body_prefix}.{name}."), device, dtype)
        restore.append(mod)
    return restore


@torch.inference_mode()
def collect_statistics_blockwise(model: torch.nn.Module, batches: Iterable[dict], *, targets=DEFAULT_TARGETS,
                                 threshold: float = 5.0, device: str | torch.device | None = None,
                                 hidden_device: str | torch.device = "cpu", reader: ShardReader | None = None,
                                 on_block: Callable[[int, CalibrationStats], None] | None = None,
                                 keep_grams: bool = True, progress: bool = True) -> CalibrationStats:
    """Block-sequential `collect_statistics` (module docstring).

    model: an HF causal LM, either with its weights (each block is moved to `device` in turn and back) or a meta
    skeleton (`skeleton_from_checkpoint`) with `reader` giving the checkpoint's tensors block by block. Returns
    the same CalibrationStats as the whole-model pass (Grams only when `keep_grams`)."""
    layers_name, layers = decoder_layers(model)
    on_meta = any(p.is_meta for p in model.parameters())
    if on_meta and reader is None:
        raise DeftlabError("the model has no weights (meta device) and no checkpoint reader was given",
                           "pass reader=ShardReader(checkpoint_dir), or a loaded model")
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    if device is None:
        device = "cpu" if on_meta else next(model.parameters()).device
    device = torch.device(device)
    t0 = time.time()
    restore = _prepare_meta_inputs(model, reader, device, dtype) if on_meta else []
    home = None if on_meta else next(layers[0].parameters()).device  # where blocks go back to
    if not on_meta and home != device:  # everything but the blocks joins the device (embeddings, rotary, ...)
        inside = layers_name + "."
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if not name.startswith(inside):
                t.data = t.data.to(device)
    body = calibration_body(model, [layers[0]])
    was_training = model.training
    model.eval()

    # 1. the first block's inputs, per batch
    first = layers[0]
    catcher = _Catcher(first)
    layers[0] = catcher
    inputs: list[tuple[torch.Tensor, dict, torch.Tensor | None]] = []
    tokens = 0
    try:
        for batch in batches:
            ids = batch["input_ids"].to(device)
            mask = batch.get("attention_mask")
            mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.to(device).bool()
            try:
                body(input_ids=ids, attention_mask=mask.long(), use_cache=False)
            except _Caught:
                pass
            kwargs = {k: v for k, v in catcher.kwargs.items() if k not in ("cache", "past_key_values")}
            inputs.append((catcher.args[0].to(hidden_device), _move(kwargs, hidden_device),
                           None if bool(mask.all()) else mask.to(hidden_device)))
            tokens += int(mask.sum())
    finally:
        layers[0] = first
    for mod in restore:
        mod.to("meta")
    if tokens == 0:
        raise DeftlabError("calibration saw no tokens", "check the calibration data")

    # 2. block by block
    grams: dict[str, torch.Tensor] = {}
    gram_of: dict[str, str] = {}
    alpha: dict[str, float] = {}
    try:
        for i in tqdm(range(len(layers)), desc="calibration (blocks)", disable=not progress, unit="block"):
            block = layers[i]
            prefix = f"{layers_name}.{i}."
            if on_meta:
                _materialise(block, reader.load(prefix), device, dtype)
            else:
                block.to(device)
            linears = {prefix + n: m for n, m in block.named_modules()
                       if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in targets}
            col = _Collector(list(linears), threshold)
            handles = [h for name, mod in linears.items()
                       for h in (mod.register_forward_pre_hook(col.pre_hook(name)),
                                 mod.register_forward_hook(col.post_hook(name)))]
            try:
                for j, (h, kwargs, mask) in enumerate(inputs):
                    col.mask = None if mask is None else mask.to(device)
                    col.last_input = None
                    out = block(h.to(device), **_move(kwargs, device))
                    out = out[0] if isinstance(out, tuple) else out
                    inputs[j] = (out.to(hidden_device), kwargs, mask)
            finally:
                col.last_input = None
                for hd in handles:
                    hd.remove()
            col.finalize()
            for key, g in col.grams.items():
                if not torch.isfinite(g).all():
                    raise DeftlabError(f"calibration Gram for {key} has NaN/Inf", "the model's activations overflow")
            block_alpha = {n: col.outliers[n] / max(col.entries[n], 1) for n in linears}
            gram_of.update(col.gram_of)
            alpha.update(block_alpha)
            if on_block is not None:
                on_block(i, CalibrationStats(grams=col.grams, gram_of=col.gram_of, alpha=block_alpha, tokens=tokens,
                                             threshold=threshold, info={"block": i}))
            if keep_grams:
                grams.update(col.grams)
            block.to("meta" if on_meta else home)
    finally:
        model.train(was_training)
    return CalibrationStats(grams=grams, gram_of=gram_of, alpha=alpha, tokens=tokens, threshold=threshold,
                            info={"seconds": round(time.time() - t0, 2), "mode": "blockwise"})
