"""One calibration pass collecting, for every target linear, the input Gram XᵀX and the output outlier ratio α.

- Gram: accumulated in float64 across batches; each batch's XᵀX is computed in fp32 (exact enough for a few
  thousand tokens, and ~2x cheaper than fp64 on CPU), block upper triangle only (deftlab.decompose.gram).
  Linears that read the same input tensor (q/k/v, gate/up) share one Gram, found at run time: consecutive calls
  on the very same input tensor object (HF LLaMA, Mistral, Qwen call q/k/v and gate/up back to back on one
  tensor), so no module names are assumed.
- Padding tokens are excluded (the batch's attention mask is applied inside the hooks).
- α_l (DeFT eq. 4, after OWL) = fraction of output entries with |A| > T·mean|A|, T = 5. The exact statistic needs
  the global mean first (two passes); we use each batch's mean and pool the counts over batches. With batches of
  many tokens the two agree closely; this keeps calibration to one pass.
- Propagation is dense (SVD-LLM step 1 / OWL convention): every layer sees the uncompressed model's inputs.
- Only the backbone runs (``model.base_model`` when it holds every target): the statistics need no logits, and
  the LM head is ~20 % of a small model's forward (576 × 49,152 on SmolLM2-135M).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from deftlab.decompose import gram as gram_ops
from deftlab.decompose.targets import DEFAULT_TARGETS, target_linears
from deftlab.errors import CacheCorruptError, DeftlabError


@dataclass
class CalibrationStats:
    grams: dict[str, torch.Tensor]  # group key -> (in × in) float64 Gram
    gram_of: dict[str, str]  # module name -> group key
    alpha: dict[str, float]  # module name -> outlier ratio of its output activations
    tokens: int
    threshold: float = 5.0
    info: dict = field(default_factory=dict)

    def gram(self, module: str) -> torch.Tensor:
        return self.grams[self.gram_of[module]]

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        path.mkdir(parents=True, exist_ok=True)
        tmp = path / f"grams.safetensors.tmp{os.getpid()}"  # per process: ranks of one launch save alike
        save_file({k: v.contiguous() for k, v in self.grams.items()}, str(tmp))
        size = tmp.stat().st_size
        tmp.replace(path / "grams.safetensors")
        meta = {"gram_of": self.gram_of, "alpha": self.alpha, "tokens": self.tokens, "threshold": self.threshold,
                "info": self.info, "size": size}
        (path / f"stats.json.tmp{os.getpid()}").write_text(json.dumps(meta, indent=1))
        (path / f"stats.json.tmp{os.getpid()}").replace(path / "stats.json")

    @classmethod
    def load(cls, path: Path) -> CalibrationStats:
        from safetensors.torch import load_file

        try:
            meta = json.loads((path / "stats.json").read_text())
            f = path / "grams.safetensors"
            if f.stat().st_size != meta["size"]:
                raise CacheCorruptError(f"calibration cache {f} is truncated")
            grams = load_file(str(f))
        except (OSError, json.JSONDecodeError, KeyError, RuntimeError) as e:
            raise CacheCorruptError(f"calibration cache {path} is unreadable ({e})") from e
        missing = set(meta["gram_of"].values()) - set(grams)
        if missing:
            raise CacheCorruptError(f"calibration cache {path} lacks Grams {sorted(missing)[:3]}")
        return cls(grams=grams, gram_of=meta["gram_of"], alpha=meta["alpha"], tokens=meta["tokens"],
                   threshold=meta["threshold"], info=meta.get("info", {}))


class _Collector:
    """Forward hooks accumulating the Grams and outlier counts of one pass (also driven by blockwise.py).

    Per batch, set ``mask`` ((B, L) bool, None when nothing is padding) and reset ``last_input``. Large
    temporaries (the gathered valid rows, |output|, the outlier flags) live in buffers reused across calls:
    fresh memory costs page faults on every call, and the α statistics are memory-bound passes.
    """

    def __init__(self, names: list[str], threshold: float):
        self.names = names
        self.threshold = threshold
        self._mask: torch.Tensor | None = None
        self._valid_rows: torch.Tensor | None = None  # flat indices of the non-padding rows
        self._pad_rows: torch.Tensor | None = None
        self._n_valid = 0
        self.grams: dict[str, torch.Tensor] = {}  # block upper triangles until finalize()
        self.bounds: dict[str, list[int]] = {}
        self.gram_of: dict[str, str] = {}
        self.last_input: torch.Tensor | None = None  # the previous hook's input (one reference only)
        self.last_key: str | None = None
        self.outliers = dict.fromkeys(names, 0)
        self.entries = dict.fromkeys(names, 0)
        self._buffers: dict[tuple, torch.Tensor] = {}

    @property
    def mask(self) -> torch.Tensor | None:
        return self._mask

    @mask.setter
    def mask(self, mask: torch.Tensor | None) -> None:
        self._mask = None if mask is None else mask.bool()
        if self._mask is None:
            self._valid_rows = self._pad_rows = None
            return
        rows = self._mask.reshape(-1)
        self._valid_rows = rows.nonzero().squeeze(1)
        self._pad_rows = (~rows).nonzero().squeeze(1)
        self._n_valid = int(self._valid_rows.numel())

    def _buffer(self, slot: str, shape: tuple[int, ...], like: torch.Tensor, dtype=None) -> torch.Tensor:
        dtype = like.dtype if dtype is None else dtype
        key = (slot, dtype, like.device)
        n = math.prod(shape)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < n:
            buf = self._buffers[key] = torch.empty(n, dtype=dtype, device=like.device)
        return buf[:n].view(shape)

    def _valid(self, t: torch.Tensor) -> torch.Tensor:
        t = t.reshape(-1, t.shape[-1])
        if self._valid_rows is None:
            return t
        # the same rows, in the same order, as t[mask]: the Gram is unchanged
        out = self._buffer("rows", (self._n_valid, t.shape[1]), t)
        return torch.index_select(t, 0, self._valid_rows, out=out)

    def pre_hook(self, name):
        def hook(module, args):
            x = args[0]
            if x is self.last_input:
                key = self.last_key  # a sibling reading the same tensor: reuse its Gram
            else:
                key = self.gram_of.get(name, name)
                xv = self._valid(x.detach())
                if key not in self.grams:
                    d = xv.shape[-1]
                    self.bounds[key] = gram_ops.block_bounds(d)
                    self.grams[key] = torch.zeros(d, d, dtype=torch.float64, device=xv.device)
                gram_ops.add_upper_gram(self.grams[key], xv, self.bounds[key])
                self.last_input, self.last_key = x, key
            self.gram_of.setdefault(name, key)
            if self.gram_of[name] != key:
                raise DeftlabError(f"calibration: input sharing of {name} changed between batches")
        return hook

    def post_hook(self, name):
        def hook(module, args, out):
            o = out.detach().reshape(-1, out.shape[-1])
            a = torch.abs(o, out=self._buffer("abs", tuple(o.shape), o))
            n = a.shape[0]
            if self._pad_rows is not None:  # zero the padding rows instead of gathering: they count as no outliers
                a.index_fill_(0, self._pad_rows, 0)
                n = self._n_valid
            entries = n * a.shape[1]
            # float32 sum: torch sums in cascaded blocks (error ~1e-7, ample for a threshold), and a float64
            # sum of a wide output converts element by element, ~9x slower here
            mean = float(a.sum()) / max(entries, 1)
            # bool flags, counted as bytes: a quarter of the traffic of flagging in place in float32
            flags = torch.gt(a, self.threshold * mean, out=self._buffer("flags", tuple(a.shape), a, torch.bool))
            self.outliers[name] += int(flags.view(torch.uint8).sum(dtype=torch.int64))
            self.entries[name] += entries
        return hook

    def finalize(self) -> None:
        self._buffers.clear()
        for key, acc in self.grams.items():
            gram_ops.finalize(acc, self.bounds[key])


@torch.inference_mode()
def collect_statistics(model: torch.nn.Module, batches, *, targets=DEFAULT_TARGETS, threshold: float = 5.0,
                       progress: bool = True, total: int | None = None) -> CalibrationStats:
    """Run `batches` (dicts with input_ids and attention_mask) through `model`, hooks on the target linears."""
    linears = target_linears(model, targets)
    if not linears:
        raise DeftlabError("no target linear layers found", f"targets were {list(targets)}")
    col = _Collector(list(linears), threshold)
    handles = []
    for name, mod in linears.items():
        handles.append(mod.register_forward_pre_hook(col.pre_hook(name)))
        handles.append(mod.register_forward_hook(col.post_hook(name)))
    device = next(model.parameters()).device
    body = calibration_body(model, linears.values())
    tokens, t0 = 0, time.time()
    was_training = model.training
    model.eval()
    try:
        for batch in tqdm(batches, desc="calibration", disable=not progress, total=total, unit="batch"):
            ids = batch["input_ids"].to(device)
            mask = batch.get("attention_mask")
            mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.to(device).bool()
            col.mask, col.last_input = (None if bool(mask.all()) else mask), None
            body(input_ids=ids, attention_mask=mask.long(), use_cache=False)
            tokens += int(mask.sum())
    finally:
        col.last_input = None
        for h in handles:
            h.remove()
        model.train(was_training)
    if tokens == 0:
        raise DeftlabError("calibration saw no tokens", "check the calibration data")
    col.finalize()
    alpha = {n: col.outliers[n] / max(col.entries[n], 1) for n in linears}
    for key, g in col.grams.items():
        if not torch.isfinite(g).all():
            raise DeftlabError(f"calibration Gram for {key} has NaN/Inf", "the model's activations overflow")
    return CalibrationStats(grams=col.grams, gram_of=col.gram_of, alpha=alpha, tokens=tokens,
                            threshold=threshold, info={"seconds": round(time.time() - t0, 2)})


def calibration_body(model: torch.nn.Module, linears) -> torch.nn.Module:
    """The part of `model` a calibration pass runs: its backbone (HF ``base_model``, without the LM head) when
    that holds every target linear, else the whole model."""
    body = getattr(model, "base_model", None)
    if not isinstance(body, torch.nn.Module) or body is model:
        return model
    inside = {id(m) for m in body.modules()}
    return body if all(id(m) in inside for m in linears) else model


def token_batches(tokenizer, texts: list[str], *, batch_size: int = 8, max_length: int = 512):
    """Tokenised, right-padded batches of calibration texts (longest first, to pad less)."""
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    for s in range(0, len(order), batch_size):
        chunk = [texts[i] for i in order[s : s + batch_size]]
        enc = tokenizer(chunk, return_tensors="pt", padding=True, truncation=True, max_length=max_length)
        yield {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def stats_key(model_fingerprint: str, calib_fingerprint: str, targets, max_length: int, threshold: float) -> str:
    blob = json.dumps([model_fingerprint, calib_fingerprint, sorted(targets), max_length, threshold, "stats-v1"])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
