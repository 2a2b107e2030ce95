"""Fine-tuned updates ΔW of a run, the task gradients OSD scores them with, and export/apply of stored updates.

ΔW is always "fine-tuned weight the model computes with − the ORIGINAL dense weight of the base model", so that
base + ΔW (applied densely) is the fine-tuned model. Per module of the fine-tuned model:

| module in the fine-tuned model             | kind             | ΔW                                          |
|--------------------------------------------|------------------|---------------------------------------------|
| PEFT LoRA over nn.Linear (or 4-bit)        | ``lora``         | (W_base_layer − W) + s·B A   (= s·B A)       |
| PEFT LoRA over ``LowRankLinear`` (DeFT)    | ``lowrank+lora`` | W_u W_v + s·B A − W  (DeFT step vi)         |
| ``LowRankLinear`` without LoRA             | ``lowrank``      | W_u W_v − W  (trained LRC or frozen factors) |
| nn.Linear / nn.Embedding, weight changed   | ``dense``        | W_ft − W  (full fine-tuning)                |

The base-layer term is exactly 0 for a frozen dense base of the same dtype, so LoRA gives s·B A bit for bit; with a
4-bit base it is the quantisation error Q(W) − W, which the fine-tuned model does compute with (so under QLoRA the
frozen 4-bit linears outside the LoRA appear as ``dense`` updates Q(W) − W too). Every decomposed
module is included, trained or not: its truncation error is part of the fine-tuned model (DeFT step vi).
Tied weights (a tied lm_head) are reported once, under the first module name. Other changed parameters (norm
weights and biases under full fine-tuning) are not matrices a codec compresses; `extract_extras` returns them
and `export_updates` stores them uncompressed in a companion file, reported apart from the budget.

OSD's Taylor score needs G = ∂L/∂W. The OSD summary says "at the truncated model"; deftlab.delta.codecs documents
(and tests) that for a quadratic loss the gradient at the rank-k truncation is ~0 along the kept directions, while
the gradient at the base model (Δ̂ = 0) ranks entries by the loss change of removing them. So ``grad_at``:
``"base"`` (default: the base model), ``"truncated"`` (base + every ΔW truncated to the rank r a truncSVD of the
same budget would keep — our reading of "the truncated model"), ``"finetuned"`` (base + ΔW), ``"none"`` (no G:
the osd codec falls back to magnitude scores). Gradients are computed on the dense base model with the updates
applied, for the modules that have an update, over a few training batches of the run's task.
"""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import torch
from torch import nn

from deftlab.adapters.bottleneck import BottleneckAdapter
from deftlab.delta.codecs import (
    CODECS,
    Encoded,
    _parse_fraction,
    budget_bytes,
    decode,
    encode,
    relative_error,
)
from deftlab.delta.codecs import _value_dtype
from deftlab.delta.storage import apply_delta, load_delta, save_delta
from deftlab.errors import BudgetError, DataNotFoundError, DeftlabError, UnknownNameError
from deftlab.linalg import thin_svd
from deftlab.surgery.lowrank import LowRankLinear, linear_weight

GRAD_AT = ("base", "truncated", "finetuned", "none")
EXTRAS_SUFFIX = ".extras.safetensors"


# ----------------------------------------------------------------------------------------------------------------
# extraction


def module_of(model: Any) -> nn.Module:
    """The plain HF model inside a LoadedModel / PeftModel / plain module."""
    model = getattr(model, "model", model) if not isinstance(model, nn.Module) else model
    if not isinstance(model, nn.Module):
        raise DeftlabError(f"expected a model, got {type(model).__name__}", "pass an nn.Module or a LoadedModel")
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _is_lora_layer(module: nn.Module) -> bool:
    from peft.tuners.lora.layer import LoraLayer

    return isinstance(module, LoraLayer)


def _base_weight(base_modules: Mapping[str, nn.Module], name: str, shape: tuple[int, ...]) -> torch.Tensor:
    mod = base_modules.get(name)
    w = getattr(mod, "weight", None) if mod is not None else None
    if not isinstance(w, torch.Tensor):
        raise DeftlabError(f"module '{name}' has no dense weight in the base model",
                           "pass the dense base model the run was fine-tuned from")
    if tuple(w.shape) != tuple(shape):
        raise DeftlabError(f"'{name}': base weight {tuple(w.shape)} differs from the fine-tuned {tuple(shape)}",
                           "pass the base model the run was fine-tuned from")
    return linear_weight(mod) if isinstance(mod, nn.Linear) else w.detach()


def _lora_delta(layer: nn.Module, name: str) -> torch.Tensor | None:
    """Σ s·B A over the active, unmerged adapters of a PEFT LoRA layer (None when there is none)."""
    total = None
    for a in layer.active_adapters:
        if a not in layer.lora_A or a in layer.merged_adapters:
            continue
        if getattr(layer, "use_dora", {}).get(a):
            raise DeftlabError(f"'{name}' uses DoRA; its update is not s·B A", "extract plain LoRA runs only")
        d = layer.get_delta_weight(a).detach().float()
        total = d if total is None else total + d
    return total


@dataclass
class UpdateSpec:
    name: str
    kind: str  # lora | lowrank+lora | lowrank | dense
    shape: tuple[int, int]


def _scan(base: nn.Module, ft: nn.Module) -> Iterator[tuple[UpdateSpec, Any]]:
    """(spec, thunk computing ΔW) per updated module, in module order; claims each module's subtree once."""
    base_modules = dict(base.named_modules())
    skip: str | None = None
    seen: set[int] = set()
    for name, mod in ft.named_modules():
        if skip is not None and name.startswith(skip + "."):
            continue  # named_modules is pre-order: a claimed module's descendants follow it directly
        skip = None
        if isinstance(mod, BottleneckAdapter):
            raise DeftlabError(f"'{name}' has a {mod.kind} bottleneck adapter: a nonlinear module, not a weight "
                               "update ΔW", "extract updates from lora/full/lrc runs")
        if _is_lora_layer(mod):
            skip = name
            inner = mod.get_base_layer()
            low = isinstance(inner, LowRankLinear)
            if not low and not isinstance(inner, nn.Linear):
                raise DeftlabError(f"LoRA over a {type(inner).__name__} at '{name}'", "extract Linear layers only")
            shape = (inner.out_features, inner.in_features)

            def thunk(mod=mod, inner=inner, name=name, low=low, shape=shape):
                w_ft = inner.dense_weight() if low else linear_weight(inner)
                delta = w_ft.float() - _base_weight(base_modules, name, shape).to(w_ft.device).float()
                lora = _lora_delta(mod, name)
                return (delta if lora is None else delta + lora.to(delta.device)).cpu()

            yield UpdateSpec(name, "lowrank+lora" if low else "lora", shape), thunk
        elif isinstance(mod, LowRankLinear):
            skip = name
            shape = (mod.out_features, mod.in_features)

            def thunk(mod=mod, name=name, shape=shape):
                w_ft = mod.dense_weight().float()
                return (w_ft - _base_weight(base_modules, name, shape).to(w_ft.device).float()).cpu()

            yield UpdateSpec(name, "lowrank", shape), thunk
        elif isinstance(mod, (nn.Linear, nn.Embedding)):
            w = mod.weight
            if w.data_ptr() in seen:
                continue  # tied (lm_head ↔ embed_tokens): one update moves both
            seen.add(w.data_ptr())
            w_ft = linear_weight(mod) if isinstance(mod, nn.Linear) else w.detach()
            if name not in base_modules:
                continue  # a module the base lacks (e.g. a value head): nothing to diff against
            w0 = _base_weight(base_modules, name, tuple(w_ft.shape)).to(w_ft.device)
            if w_ft.dtype == w0.dtype and torch.equal(w_ft, w0):
                continue  # frozen: no update
            shape = tuple(w_ft.shape)

            def thunk(w_ft=w_ft, w0=w0):
                return (w_ft.float() - w0.float()).cpu()

            yield UpdateSpec(name, "dense", shape), thunk  # type: ignore[arg-type]


def iter_updates(base_model: Any, finetuned_model: Any) -> Iterator[tuple[UpdateSpec, torch.Tensor]]:
    """(spec, ΔW float32 CPU) one module at a time, so callers can encode without holding every ΔW."""
    base, ft = module_of(base_model), module_of(finetuned_model)
    with torch.no_grad():
        for spec, thunk in _scan(base, ft):
            yield spec, thunk()


def update_kinds(base_model: Any, finetuned_model: Any) -> dict[str, str]:
    """{module name: kind} of every module `extract_updates` reports (no ΔW computed)."""
    base, ft = module_of(base_model), module_of(finetuned_model)
    with torch.no_grad():
        return {spec.name: spec.kind for spec, _ in _scan(base, ft)}


def extract_updates(base_model: Any, finetuned_model: Any) -> dict[str, torch.Tensor]:
    """{module name: ΔW (out×in float32, CPU)} for every adapted / trained / decomposed linear (see module doc)."""
    updates = {spec.name: delta for spec, delta in iter_updates(base_model, finetuned_model)}
    if not updates:
        raise DeftlabError("the fine-tuned model does not differ from the base model",
                           "check that the run trained something and that its weights were loaded")
    return updates


def extract_extras(base_model: Any, finetuned_model: Any) -> dict[str, torch.Tensor]:
    """{parameter name: Δ} of changed parameters outside the extracted matrices (norms, biases).

    Names are the base model's parameter names; for LoRA/LowRankLinear modules the bias is compared as
    ``<module>.bias``. Parameters the base lacks are ignored.
    """
    base, ft = module_of(base_model), module_of(finetuned_model)
    base_params = dict(base.named_parameters())
    claimed = {spec.name: spec for spec, _ in _scan(base, ft)}
    covered = set()
    out: dict[str, torch.Tensor] = {}

    def diff(pname: str, value: torch.Tensor | None) -> None:
        w0 = base_params.get(pname)
        if value is None or w0 is None or tuple(value.shape) != tuple(w0.shape):
            return
        v, w0 = value.detach(), w0.detach().to(value.device)
        if not (v.dtype == w0.dtype and torch.equal(v, w0)):
            out[pname] = (v.float() - w0.float()).cpu()

    with torch.no_grad():
        ft_modules = dict(ft.named_modules())
        for name, spec in claimed.items():
            mod = ft_modules[name]
            if spec.kind == "dense":
                covered.add(mod.weight.data_ptr())
            else:
                inner = mod.get_base_layer() if _is_lora_layer(mod) else mod
                bias = inner.u_proj.bias if isinstance(inner, LowRankLinear) else inner.bias
                diff(f"{name}.bias", bias)
        prefixes = tuple(f"{n}." for n, s in claimed.items() if s.kind != "dense")
        for pname, p in ft.named_parameters():
            if pname.startswith(prefixes) or p.data_ptr() in covered or "lora_" in pname:
                continue
            if pname.endswith(".weight") and pname.removesuffix(".weight") in claimed:
                continue
            diff(pname, p)
    return out


# ----------------------------------------------------------------------------------------------------------------
# gradients


def gradient_batches(task, tokenizer, *, n_batches: int = 4, batch_size: int = 4, cutoff_len: int = 256,
                     seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """A few padded training batches ({input_ids, attention_mask, labels}, loss on responses) of `task`."""
    from deftlab.tasks.encoding import PaddingCollator, encode_example, pad_id_of

    if n_batches < 1 or batch_size < 1:
        raise DeftlabError(f"gradient batches {n_batches}×{batch_size} is empty", "use at least 1×1")
    examples = list(task.train_examples())
    if not examples:
        raise DeftlabError(f"task '{task.name}' has no training examples", "check the task's data")
    rng = random.Random(seed)
    picked = rng.sample(examples, min(len(examples), n_batches * batch_size))
    encoded = [e for e in (encode_example(tokenizer, ex, cutoff_len) for ex in picked) if e is not None]
    if not encoded:
        raise DeftlabError("no training example keeps a response token at this cutoff_len", "raise cutoff_len")
    collate = PaddingCollator(pad_id_of(tokenizer))
    return [collate(encoded[i : i + batch_size]) for i in range(0, len(encoded), batch_size)]


def task_gradients(model: Any, batches: Iterable[Mapping[str, torch.Tensor]], names: Iterable[str]
                   ) -> dict[str, torch.Tensor]:
    """{name: ∂L/∂W (float32, CPU)} of the mean response loss over `batches`, for `<name>.weight` of each module.

    `model` should be a dense model (the base, or the base with updates applied — see the module doc for which
    point OSD's G is taken at). Only the named weights get gradients; requires_grad flags and .grad fields are
    restored afterwards. Dropout is off (eval mode) so the gradient is deterministic.
    """
    from deftlab.train.module import masked_lm_loss

    net = module_of(model)
    names = list(dict.fromkeys(names))
    batches = list(batches)
    if not batches:
        raise DeftlabError("no batches to compute task gradients on", "pass at least one batch")
    modules = dict(net.named_modules())
    weights = {}
    for n in names:
        w = getattr(modules.get(n), "weight", None)
        if not isinstance(w, nn.Parameter) or not w.is_floating_point():
            raise DeftlabError(f"no float weight '{n}.weight' to differentiate", "compute gradients on the dense model")
        weights[n] = w
    flags = {id(p): p.requires_grad for p in net.parameters()}
    was_training = net.training
    device = next(net.parameters()).device
    try:
        net.requires_grad_(False)
        net.eval()
        for w in weights.values():
            w.requires_grad_(True)
            w.grad = None
        for batch in batches:
            logits = net(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                         use_cache=False).logits
            loss, _ = masked_lm_loss(logits, batch["labels"].to(device))
            (loss / len(batches)).backward()
        return {n: w.grad.detach().float().cpu().clone() if w.grad is not None else torch.zeros(w.shape)
                for n, w in weights.items()}
    finally:
        for p in net.parameters():
            p.requires_grad_(flags[id(p)])
        for w in weights.values():
            w.grad = None
        net.train(was_training)


def _truncate(delta: torch.Tensor, rank: int) -> torch.Tensor:
    u, s, vh = thin_svd(delta.double())
    return ((u[:, :rank] * s[:rank]) @ vh[:rank]).float()


def gradients_at(base_model: Any, updates: Mapping[str, torch.Tensor], batches, grad_at: str,
                 budgets: Mapping[str, int] | None = None, value_dtype: str = "float32"
                 ) -> dict[str, torch.Tensor] | None:
    """G for every update at the point ``grad_at`` names (module doc); the base model is restored afterwards."""
    if grad_at not in GRAD_AT:
        raise UnknownNameError("gradient point", grad_at, GRAD_AT)
    if grad_at == "none":
        return None
    net = module_of(base_model)
    shift: dict[str, torch.Tensor] = {}
    if grad_at == "finetuned":
        shift = dict(updates)
    elif grad_at == "truncated":
        item = torch.empty((), dtype=_vdt(value_dtype)).element_size()
        for n, d in updates.items():
            b = (budgets or {}).get(n)
            r = min(d.shape) if b is None else max(1, min(b // ((d.shape[0] + d.shape[1]) * item), min(d.shape)))
            shift[n] = _truncate(d, r)
    weights = dict(net.named_parameters())
    saved = {n: weights[f"{n}.weight"].detach().clone() for n in shift if f"{n}.weight" in weights}
    try:
        if shift:
            apply_delta(net, shift)
        return task_gradients(net, batches, list(updates))
    finally:
        with torch.no_grad():
            for n, w in saved.items():
                weights[f"{n}.weight"].copy_(w)


# ----------------------------------------------------------------------------------------------------------------
# budgets and compression


def _vdt(value_dtype: str | torch.dtype) -> torch.dtype:
    return _value_dtype(value_dtype)


def parse_budget(budget: Any) -> tuple[str, float | int | None]:
    """("fraction", f) for 0.02 / "2%" / "0.02"; ("bytes", n) for an int or digit string; ("full", None)."""
    if isinstance(budget, str):
        s = budget.strip().lower()
        if s in ("full", "none", "100%"):
            return "full", None
        if s.isdigit():
            return _bytes_budget(int(s))
        return "fraction", _parse_fraction(s)
    if isinstance(budget, bool) or budget is None:
        raise DeftlabError(f"budget {budget!r} is not a size", "write e.g. '2%', 0.02, 1000000 (bytes) or 'full'")
    if isinstance(budget, int):
        return _bytes_budget(budget)
    if isinstance(budget, float):
        if budget > 1.0 and budget.is_integer():
            return _bytes_budget(int(budget))
        f = _parse_fraction(budget)
        return ("full", None) if f == 1.0 else ("fraction", f)
    raise DeftlabError(f"budget {budget!r} is not a size", "write e.g. '2%', 0.02, 1000000 (bytes) or 'full'")


def _bytes_budget(n: int) -> tuple[str, int]:
    if n < 1:
        raise DeftlabError(f"budget of {n} bytes", "give a positive byte count or a fraction such as '2%'")
    return "bytes", n


def matrix_budgets(shapes: Mapping[str, tuple[int, int]], budget: Any) -> dict[str, int] | None:
    """Bytes per matrix: a fraction of each dense ΔW's fp32 bytes, or a total split in proportion to the matrices'
    sizes (rounded down, so the sum never exceeds it). None for "full" (store uncompressed)."""
    kind, value = parse_budget(budget)
    if kind == "full":
        return None
    if kind == "fraction":
        return {n: budget_bytes(s, value, torch.float32) for n, s in shapes.items()}
    total_numel = sum(s[0] * s[1] for s in shapes.values())
    if total_numel == 0:
        return {}
    return {n: int(value) * s[0] * s[1] // total_numel for n, s in shapes.items()}


@dataclass
class CompressionStats:
    """Per-matrix and total bytes / reconstruction errors of one set of encoded updates."""

    codec: str
    budget: Any
    rows: list[dict] = field(default_factory=list)  # name, kind, shape, budget_bytes, nbytes, rel_error, meta

    @property
    def nbytes(self) -> int:
        return sum(r["nbytes"] for r in self.rows)

    @property
    def budget_bytes(self) -> int | None:
        b = [r["budget_bytes"] for r in self.rows]
        return None if any(x is None for x in b) else sum(b)

    @property
    def dense_nbytes(self) -> int:
        return sum(4 * r["shape"][0] * r["shape"][1] for r in self.rows)

    @property
    def rel_error(self) -> float:
        """‖Δ − Δ̂‖_F / ‖Δ‖_F over all matrices stacked."""
        num = sum(r["err_sq"] for r in self.rows)
        den = sum(r["norm_sq"] for r in self.rows)
        return 0.0 if den == 0 and num == 0 else (math.sqrt(num / den) if den else math.inf)

    def summary(self) -> dict:
        errs = [r["rel_error"] for r in self.rows]
        return {
            "codec": self.codec, "budget": self.budget, "n_matrices": len(self.rows), "nbytes": self.nbytes,
            "budget_bytes": self.budget_bytes, "dense_nbytes": self.dense_nbytes,
            "bytes_fraction": self.nbytes / self.dense_nbytes if self.dense_nbytes else None,
            "rel_error": self.rel_error, "rel_error_mean": sum(errs) / len(errs) if errs else None,
            "rel_error_max": max(errs) if errs else None,
        }


def _row(name: str, kind: str, delta: torch.Tensor, recon: torch.Tensor, nbytes: int, budget: int | None,
         meta: dict) -> dict:
    d, r = delta.double(), recon.double()
    return {"name": name, "kind": kind, "shape": list(delta.shape), "budget_bytes": budget, "nbytes": nbytes,
            "rel_error": relative_error(delta, recon), "err_sq": float(((d - r) ** 2).sum()),
            "norm_sq": float((d**2).sum()), "meta": meta}


def compress_updates(updates: Mapping[str, torch.Tensor], codec: str, budget: Any, *,
                     grads: Mapping[str, torch.Tensor] | None = None, value_dtype: str = "float32",
                     kinds: Mapping[str, str] | None = None, codec_options: Mapping[str, Any] | None = None,
                     keep_decoded: bool = False
                     ) -> tuple[dict[str, Encoded], CompressionStats, dict[str, torch.Tensor]]:
    """Encode every ΔW with `codec` under its share of `budget`; returns (encoded, stats, decoded if asked).

    codec "none" (or budget "full") stores nothing: the decoded update is ΔW itself and its bytes are the dense
    fp32 bytes — the uncompressed reference.
    """
    if codec != "none" and codec not in CODECS:
        raise UnknownNameError("codec", codec, [*CODECS, "none"])
    if not updates:
        raise DeftlabError("no updates to compress", "extract the updates of a fine-tuned run first")
    budgets = matrix_budgets({n: tuple(d.shape) for n, d in updates.items()}, budget)
    reference = codec == "none" or budgets is None
    stats = CompressionStats("none" if reference else codec, "full" if reference else budget)
    encoded: dict[str, Encoded] = {}
    decoded: dict[str, torch.Tensor] = {}
    for name, delta in updates.items():
        kind = (kinds or {}).get(name, "")
        if reference:
            stats.rows.append(_row(name, kind, delta, delta, 4 * delta.numel(), None, {}))
            if keep_decoded:
                decoded[name] = delta
            continue
        g = (grads or {}).get(name) if codec == "osd" else None
        try:
            enc = encode(codec, delta, budgets[name], grad=g, value_dtype=value_dtype, **dict(codec_options or {}))
        except BudgetError as e:
            raise BudgetError(f"'{name}' ({delta.shape[0]}×{delta.shape[1]}): {e.problem}",
                              f"raise the budget ({e.fix})") from None
        recon = decode(enc)
        encoded[name] = enc
        stats.rows.append(_row(name, kind, delta, recon, enc.nbytes, budgets[name], dict(enc.meta)))
        if keep_decoded:
            decoded[name] = recon
    return encoded, stats, decoded


# ----------------------------------------------------------------------------------------------------------------
# export and apply


def extras_path(path: str | os.PathLike) -> Path:
    p = Path(path)
    return p.with_name(p.name.removesuffix(".safetensors") + EXTRAS_SUFFIX)


@dataclass
class ExportReport:
    path: Path
    stats: CompressionStats
    extras: list[str]
    extra_nbytes: int
    metadata: dict

    def summary(self) -> dict:
        return {**self.stats.summary(), "path": str(self.path), "extras": self.extras,
                "extra_nbytes": self.extra_nbytes}


def export_updates(base_lm: Any, finetuned_model: Any, codec: str, budget: Any, out_path: str | os.PathLike, *,
                   batches: list | None = None, grad_at: str = "base", value_dtype: str = "float32",
                   codec_options: Mapping[str, Any] | None = None, metadata: Mapping[str, Any] | None = None
                   ) -> ExportReport:
    """Extract, (score,) encode and save the updates of `finetuned_model` against `base_lm` (a LoadedModel or a
    dense model). `batches` are needed for codec osd unless grad_at is "none"."""
    if codec == "none":
        raise DeftlabError("codec 'none' stores nothing compressed", "use the fine-tuned run itself, or pick a codec")
    if parse_budget(budget)[0] == "full":
        raise DeftlabError("budget 'full' stores nothing compressed", "give a fraction ('2%') or a byte count")
    if grad_at not in GRAD_AT:
        raise UnknownNameError("gradient point", grad_at, GRAD_AT)
    base = module_of(base_lm)
    kinds = update_kinds(base, finetuned_model)
    updates = extract_updates(base, finetuned_model)
    extras = extract_extras(base, finetuned_model)
    grads = None
    if codec == "osd" and grad_at != "none":
        if not batches:
            raise DeftlabError("codec osd scores entries by the task gradient and no batches were given",
                               "pass batches (gradient_batches(task, tokenizer)) or grad_at='none'")
        budgets = matrix_budgets({n: tuple(d.shape) for n, d in updates.items()}, budget)
        grads = gradients_at(base, updates, batches, grad_at, budgets, value_dtype)
    encoded, stats, _ = compress_updates(updates, codec, budget, grads=grads, value_dtype=value_dtype, kinds=kinds,
                                         codec_options=codec_options)
    out_path = Path(out_path)
    meta = {
        **dict(metadata or {}),
        "codec": codec, "budget": budget if isinstance(budget, (int, float)) else str(budget),
        "value_dtype": value_dtype, "grad_at": grad_at if codec == "osd" else None,
        "codec_options": {k: v for k, v in dict(codec_options or {}).items() if not callable(v)},
        "kinds": kinds,
        "rel_error": {r["name"]: r["rel_error"] for r in stats.rows},
        "summary": stats.summary(),
        "extras_file": extras_path(out_path).name if extras else None,
    }
    if base_lm is not base and hasattr(base_lm, "fingerprint"):
        meta.setdefault("base_model", base_lm.spec.name)
        meta.setdefault("base_fingerprint", base_lm.fingerprint)
    save_delta(out_path, encoded, meta)
    extra_nbytes = 0
    ep = extras_path(out_path)
    if extras:
        from safetensors.torch import save_file

        tmp = ep.with_name(f".{ep.name}.tmp{os.getpid()}")
        save_file({k: v.contiguous() for k, v in extras.items()}, str(tmp), metadata={"deftlab.format": "extras-v1"})
        os.replace(tmp, ep)
        extra_nbytes = sum(v.numel() * v.element_size() for v in extras.values())
    elif ep.exists():
        ep.unlink()  # a stale companion of an earlier export to the same path
    return ExportReport(out_path, stats, sorted(extras), extra_nbytes, meta)


def apply_stored(base_model: Any, path: str | os.PathLike, *, check_fingerprint: bool = True
                 ) -> tuple[nn.Module, dict]:
    """Add a stored delta file (and its extras companion, if any) to `base_model` in place (sign +1).

    Returns (the compact fine-tuned dense model, the file's metadata). With a LoadedModel whose fingerprint
    differs from the one recorded at export, raises instead of building a wrong model.
    """
    encoded, meta = load_delta(path)
    fp = meta.get("base_fingerprint")
    if check_fingerprint and fp and hasattr(base_model, "fingerprint") and base_model.fingerprint != fp:
        raise DeftlabError(f"{path} was exported against base weights {fp}, not {base_model.fingerprint}",
                           f"load the base model '{meta.get('base_model')}' it was fine-tuned from")
    net = module_of(base_model)
    extras = {}
    if meta.get("extras_file"):
        ep = Path(path).with_name(meta["extras_file"])
        if not ep.is_file():
            raise DataNotFoundError(f"{path} needs its companion {ep.name}, which is missing",
                                    "copy it next to the delta file or export again")
        from safetensors.torch import load_file

        extras = load_file(str(ep))
        params = dict(net.named_parameters())
        bad = [k for k in extras if k not in params or tuple(params[k].shape) != tuple(extras[k].shape)]
        if bad:
            raise DeftlabError(f"extras parameter '{bad[0]}' does not fit the base model", "use the run's base model")
    apply_delta(net, encoded)
    with torch.no_grad():
        params = dict(net.named_parameters())
        for k, v in extras.items():
            p = params[k]
            p.copy_((p.float() + v.to(p.device)).to(p.dtype))
    return net, meta
