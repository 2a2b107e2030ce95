"""Model surgery: swap `nn.Linear` layers for low-rank or rank-reduced ones in place, by module name.

No HF modeling code is forked: we look the module up by its dotted name, build the replacement and `setattr` it
on the parent, so any architecture (GQA k/v shapes included) works unchanged.

Per allocated module (name → θ, factored, lrc), with full rank = min(out, in):

- factored            → `LowRankLinear` holding the top θ components (θ−r with DeFT init and LoRA rank r),
- not factored, θ<full → the same nn.Linear with its weight replaced by the dense rank-θ (θ−r) reconstruction,
- not factored, θ≥full → untouched (no decomposition is needed or used; LoRA gets the standard B=0 init).

DeFT init (§7.6 of the research notes): the r components after the frozen θ−r initialise the LoRA with the
PiSSA/CorDA scaling convention, B = U√(σ/s), A = √(σ/s) VᵀS⁻¹ with s = α/r, so frozen + s·B·A equals the rank-θ
reconstruction at step 0. If θ ≤ r, every kept component goes to the LoRA (the frozen factors have rank 0) and
`deftlab.adapters.attach` pads the LoRA to rank r with zero-B columns.

Selective loading (`load_decomposed`): the HF model is instantiated on the meta device and only the tensors of
non-replaced modules are read from the safetensors checkpoint; replaced layers get their factors directly, so
their dense weights are never read or allocated.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol, Union

import torch
from safetensors import safe_open
from torch import nn

from deftlab.decompose.whiten import Decomposition, split_for_lora, truncated_factors
from deftlab.errors import DeftlabError
from deftlab.surgery.lowrank import LowRankLinear

FactorSpec = Union[tuple[torch.Tensor, torch.Tensor], torch.Tensor]
Finalizer = Callable[[str, nn.Module], Union[nn.Module, None]]
InitKind = Literal["deft", "vanilla"]


class AllocationLike(Protocol):
    """What we read from `deftlab.allocate`'s `Allocation` (duck-typed so surgery does not import the search)."""

    ranks: dict[str, int]
    factored: dict[str, bool]
    lrc: dict[str, bool]


@dataclass(frozen=True)
class LoraTail:
    """DeFT LoRA init for one module: s·B·A is the tail (components θ−r..θ) of its rank-θ reconstruction."""

    B: torch.Tensor  # out × r_eff
    A: torch.Tensor  # r_eff × in
    scaling: float  # s = α / r the tail was divided by (PiSSA convention)

    @property
    def rank(self) -> int:
        return self.A.shape[0]


# ----------------------------------------------------------------------------------------------------------------
# name-based module access


def get_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """(parent module, attribute name) of the module called `name` (dotted, as in `named_modules()`)."""
    parent_name, _, attr = name.rpartition(".")
    try:
        parent = model.get_submodule(parent_name) if parent_name else model
    except AttributeError:
        parent = None
    if parent is None or not hasattr(parent, attr) or not isinstance(getattr(parent, attr), nn.Module):
        raise DeftlabError(f"model has no module named '{name}'", "use names from model.named_modules()")
    return parent, attr


def _linear_shape(module: nn.Module, name: str) -> tuple[int, int]:
    if isinstance(module, (nn.Linear, LowRankLinear)):
        return module.out_features, module.in_features
    raise DeftlabError(
        f"module '{name}' is a {type(module).__name__}, not an nn.Linear",
        "allocate ranks only to linear layers",
    )


def replace_linears(
    model: nn.Module,
    factors: Mapping[str, FactorSpec],
    *,
    dtype: torch.dtype | None = None,
) -> list[str]:
    """Swap linears in place: `(W_u, W_v)` → `LowRankLinear` (keeps the bias), a tensor → new dense weight.

    Factors are cast to `dtype` (default: the replaced weight's dtype, or the factor's own if that is meta).
    Trainability is inherited from the replaced weight. Returns the replaced names.
    """
    done = []
    for name, spec in factors.items():
        parent, attr = get_parent(model, name)
        old = getattr(parent, attr)
        out_f, in_f = _linear_shape(old, name)
        old_w = old.weight if isinstance(old, nn.Linear) else old.u_proj.weight
        on_meta = old_w.device.type == "meta"
        target = dtype or (None if on_meta else old_w.dtype)
        device = None if on_meta else old_w.device
        grad = old_w.requires_grad
        if isinstance(spec, tuple):
            W_u, W_v = spec
            if W_u.shape[0] != out_f or W_v.shape[1] != in_f:
                raise DeftlabError(
                    f"factors for '{name}' give {W_u.shape[0]}×{W_v.shape[1]}, the layer is {out_f}×{in_f}",
                    "decompose the matching weight",
                )
            bias = old.bias if isinstance(old, nn.Linear) else old.u_proj.bias
            W_u, W_v = (t.to(device=device or t.device, dtype=target or t.dtype) for t in (W_u, W_v))
            if bias is not None and bias.device.type != "meta":
                bias = bias.detach().to(W_u.dtype)
            new = LowRankLinear.from_factors(W_u, W_v, requires_grad=grad)
            if bias is not None:
                # a meta bias is filled later by the selective loader (key name.bias → name.u_proj.bias)
                new.u_proj.bias = nn.Parameter(bias.detach(), requires_grad=grad)
            setattr(parent, attr, new)
        else:
            if not isinstance(old, nn.Linear):
                raise DeftlabError(f"'{name}' is already decomposed", "give it factors, not a dense weight")
            if tuple(spec.shape) != (out_f, in_f):
                raise DeftlabError(
                    f"dense weight for '{name}' is {tuple(spec.shape)}, the layer is {out_f}×{in_f}",
                    "pass a reconstruction of this layer's weight",
                )
            weight = spec.detach().to(device=device or spec.device, dtype=target or spec.dtype).contiguous()
            old.weight = nn.Parameter(weight, requires_grad=grad)
        done.append(name)
    return done


# ----------------------------------------------------------------------------------------------------------------
# planning from decompositions (the math lives in deftlab.decompose.whiten)


def plan_module(
    dec: Decomposition,
    *,
    rank: int,
    full_rank: int,
    factored: bool,
    lora_rank: int = 0,
    scaling: float = 1.0,
    init: InitKind = "deft",
) -> tuple[FactorSpec | None, LoraTail | None]:
    """What to put in one module: None (keep), a dense reconstruction, or (W_u, W_v); plus the DeFT tail."""
    if rank < 1:
        raise DeftlabError(f"rank {rank} < 1", "allocate at least rank 1 to every decomposed matrix")
    if not factored and rank >= full_rank:
        return None, None
    r_eff = min(lora_rank, rank) if init == "deft" else 0  # θ ≤ r: all θ components go to the LoRA
    if r_eff == 0:
        W_u, W_v = truncated_factors(dec, rank)
        tail = None
    else:
        W_u, W_v, lora_B, lora_A = split_for_lora(dec, rank, r_eff, scaling)
        tail = LoraTail(B=lora_B, A=lora_A, scaling=scaling)
    spec: FactorSpec = (W_u, W_v) if factored else W_u @ W_v
    return spec, tail


def with_tail(spec: FactorSpec, tail: LoraTail, dtype: torch.dtype | None = None) -> FactorSpec:
    """`spec` with its DeFT tail put back: factors [W_u | s·B], [W_v; A], or the dense W + s·B·A (in `dtype`,
    each term rounded to it first, as adding the tail to an already built weight does)."""
    sB = tail.B * tail.scaling
    if isinstance(spec, tuple):
        W_u, W_v = spec
        dt = dtype or W_u.dtype
        return torch.cat([W_u.to(dt), sB.to(dt)], dim=1), torch.cat([W_v.to(dt), tail.A.to(dt)], dim=0)
    dt = dtype or spec.dtype
    return spec.to(dt) + (sB @ tail.A).to(dt)


def _check_allocation(allocation: AllocationLike) -> None:
    for attr in ("ranks", "factored", "lrc"):
        if not isinstance(getattr(allocation, attr, None), Mapping):
            raise DeftlabError(f"allocation has no '{attr}' mapping", "pass a deftlab.allocate Allocation")
    extra = set(allocation.factored) - set(allocation.ranks)
    if extra:
        raise DeftlabError(f"allocation.factored names modules without a rank: {sorted(extra)[:3]}", "fix the allocation")


def build_decomposed_model(
    model_or_factory: nn.Module | Callable[[], nn.Module],
    allocation: AllocationLike,
    decompositions: Mapping[str, Decomposition],
    *,
    lora_rank: int = 0,
    lora_alpha: float = 16.0,
    init: InitKind = "deft",
    dtype: torch.dtype | None = None,
) -> tuple[nn.Module, dict[str, LoraTail]]:
    """Apply an allocation to a (dense, loaded) model in place; return it and the DeFT LoRA tails per module.

    `decompositions` may be a lazy Mapping (read from disk on access); each entry is read once. Tails are
    empty unless init="deft" and lora_rank > 0; with init="vanilla" all θ components are frozen.
    """
    model = model_or_factory if isinstance(model_or_factory, nn.Module) else model_or_factory()
    _check_allocation(allocation)
    if init not in ("deft", "vanilla"):
        raise DeftlabError(f"unknown init '{init}'", "use 'deft' or 'vanilla'")
    if lora_rank < 0:
        raise DeftlabError(f"lora_rank {lora_rank} < 0", "use 0 (no LoRA) or a positive rank")
    scaling = lora_alpha / lora_rank if lora_rank else 1.0
    tails: dict[str, LoraTail] = {}
    for name, spec, tail in _iter_plans(model, allocation, decompositions, lora_rank, scaling, init):
        replace_linears(model, {name: spec}, dtype=dtype)
        if tail is not None:
            tails[name] = tail
    return model, tails


def _iter_plans(
    model: nn.Module,
    allocation: AllocationLike,
    decompositions: Mapping[str, Decomposition],
    lora_rank: int,
    scaling: float,
    init: InitKind,
) -> Iterator[tuple[str, FactorSpec, LoraTail | None]]:
    for name, rank in allocation.ranks.items():
        parent, attr = get_parent(model, name)
        out_f, in_f = _linear_shape(getattr(parent, attr), name)
        factored = bool(allocation.factored.get(name, False))
        if not factored and rank >= min(out_f, in_f):
            continue
        if name not in decompositions:
            raise DeftlabError(f"no decomposition for '{name}'", "decompose every module the allocation reduces")
        spec, tail = plan_module(
            decompositions[name],
            rank=rank,
            full_rank=min(out_f, in_f),
            factored=factored,
            lora_rank=lora_rank,
            scaling=scaling,
            init=init,
        )
        yield name, spec, tail


# ----------------------------------------------------------------------------------------------------------------
# meta-device construction and streaming tensor assignment (shared with checkpoint.py)


def empty_model(factory: Callable[[], nn.Module]) -> nn.Module:
    """Build the architecture with every parameter on the meta device (buffers such as RoPE freqs stay real)."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return factory()


def assign_tensor(model: nn.Module, key: str, tensor: torch.Tensor) -> None:
    """Set parameter/buffer `key` to `tensor` without copying into a preallocated one (keeps requires_grad)."""
    module_name, _, attr = key.rpartition(".")
    try:
        module = model.get_submodule(module_name) if module_name else model
    except AttributeError:
        module = None
    if module is not None and attr in module._parameters and module._parameters[attr] is not None:
        old = module._parameters[attr]
        if tuple(old.shape) != tuple(tensor.shape):
            raise DeftlabError(
                f"checkpoint tensor '{key}' is {tuple(tensor.shape)}, the model expects {tuple(old.shape)}",
                "use the checkpoint that matches this architecture and rank map",
            )
        module._parameters[attr] = nn.Parameter(tensor, requires_grad=old.requires_grad)
    elif module is not None and attr in module._buffers:
        module._buffers[attr] = tensor
    else:
        raise DeftlabError(f"checkpoint tensor '{key}' has no place in the model", "use the matching checkpoint")


def finish_loading(model: nn.Module) -> None:
    """Re-tie tied weights (HF) and fail if any parameter or buffer is still on the meta device."""
    tie = getattr(model, "tie_weights", None)
    if callable(tie):
        tie()
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    missing += [n for n, b in model.named_buffers() if b.device.type == "meta"]
    if missing:
        raise DeftlabError(
            f"{len(missing)} tensor(s) were not in the checkpoint, e.g. {missing[:3]}",
            "use a checkpoint with every non-decomposed weight of this architecture",
        )


def checkpoint_files(path: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint dir (single file or sharded with an index), or the file itself."""
    path = Path(path)
    if path.is_file():
        return [path]
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / s for s in shards]
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    raise DeftlabError(f"no model.safetensors in {path}", "convert the checkpoint to safetensors first")


def checkpoint_has_safetensors(path: str | Path | None) -> bool:
    """Whether `path` is a checkpoint directory `load_decomposed` can stream (safetensors, single or sharded)."""
    return path is not None and any((Path(path) / f).is_file()
                                    for f in ("model.safetensors", "model.safetensors.index.json"))


@dataclass
class LoadReport:
    """Which checkpoint tensors were read and which were skipped (never read)."""

    read: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    bytes_read: int = 0


def stream_checkpoint(
    model: nn.Module,
    files: Iterable[Path],
    *,
    skip: set[str] = frozenset(),
    rename: Mapping[str, str] | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    report: LoadReport | None = None,
    after: Callable[[str], None] | None = None,
) -> LoadReport:
    """Read tensors one at a time and assign them into `model` (on `device`); keys in `skip` are never read.
    after(key): called with the model's key of each tensor once it is assigned."""
    report = report or LoadReport()
    rename = rename or {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                if key in skip:
                    report.skipped.append(key)
                    continue
                tensor = f.get_tensor(key)
                if dtype is not None and tensor.is_floating_point():
                    tensor = tensor.to(dtype)
                if device is not None:
                    tensor = tensor.to(device)
                assign_tensor(model, rename.get(key, key), tensor)
                report.read.append(key)
                report.bytes_read += tensor.numel() * tensor.element_size()
                if after is not None:
                    after(rename.get(key, key))
    return report


def _first_float_dtype(files: list[Path]) -> torch.dtype:
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                t = f.get_slice(key)
                dt = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}
                if t.get_dtype() in dt:
                    return dt[t.get_dtype()]
    return torch.float32


def hf_factory(checkpoint: Path) -> Callable[[], nn.Module]:
    def factory() -> nn.Module:
        from transformers import AutoConfig, AutoModelForCausalLM

        if not (checkpoint / "config.json").is_file():
            raise DeftlabError(f"no config.json in {checkpoint}", "pass model_factory or a converted HF checkpoint dir")
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(checkpoint)))

    return factory


def load_decomposed(
    checkpoint: str | Path,
    allocation: AllocationLike,
    decompositions: Mapping[str, Decomposition],
    *,
    selective: bool = True,
    lora_rank: int = 0,
    lora_alpha: float = 16.0,
    init: InitKind = "deft",
    dtype: torch.dtype | None = None,
    model_factory: Callable[[], nn.Module] | None = None,
    report: LoadReport | None = None,
    device: torch.device | str | None = None,
    finalize: Finalizer | None = None,
    fold: Iterable[str] = (),
) -> tuple[nn.Module, dict[str, LoraTail]]:
    """Load a checkpoint and decompose it, either selectively (default) or "load dense, then replace".

    checkpoint: a dir with config.json + model.safetensors (or a sharded index), or one .safetensors file
    together with `model_factory` (a callable that builds the architecture, e.g. `lambda: tiny_llama()`).
    dtype: cast every float tensor (default: the checkpoint's dtype).

    selective=True: the model is built on the meta device, the replaced layers receive their factors/dense
    reconstructions straight from `decompositions`, and only the other tensors are read from disk, so peak memory
    is the decomposed model (plus one tensor and one decomposition at a time when `decompositions` is lazy).
    selective=False: the whole dense model is materialised first (the baseline the benchmark compares against).
    device: where the model is built (default CPU); tensors are moved there one at a time.
    finalize(name, linear): called on every nn.Linear (factors included) as soon as its tensors are all loaded,
    returning a replacement (e.g. NF4, `deftlab.surgery.quantize.nf4_finalizer`) or None; with selective
    loading the model never holds more than one unfinalised linear that is already complete.
    fold: modules whose DeFT tail goes back into their frozen weight (those a LoRA will not target; as
    `deftlab.surgery.fold.fold_tails` does after building), before `finalize` sees them.
    """
    checkpoint = Path(checkpoint)
    files = checkpoint_files(checkpoint)
    factory = model_factory or hf_factory(checkpoint)
    dtype = dtype or _first_float_dtype(files)
    if not selective:
        if model_factory is None and checkpoint.is_dir():
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=dtype)
        else:
            model = factory().to(dtype)
            stream_checkpoint(model, files, dtype=dtype, report=report)
            finish_loading(model)
        model.eval()
        return build_decomposed_model(
            model, allocation, decompositions, lora_rank=lora_rank, lora_alpha=lora_alpha, init=init, dtype=dtype
        )

    _check_allocation(allocation)
    model = empty_model(factory)
    scaling = lora_alpha / lora_rank if lora_rank else 1.0
    skip: set[str] = set()
    rename: dict[str, str] = {}
    tails: dict[str, LoraTail] = {}
    pending = {n for n, m in model.named_modules() if type(m) is nn.Linear} if finalize else set()

    def settle(name: str) -> None:
        """Finalize module `name` once none of its tensors is on meta."""
        module = model.get_submodule(name)
        if finalize is None or any(t.is_meta for t in module.parameters()):
            return
        pending.discard(name)
        new = finalize(name, module)
        if new is not None:
            parent, attr = get_parent(model, name)
            setattr(parent, attr, new)

    fold = set(fold)
    for name, spec, tail in _iter_plans(model, allocation, decompositions, lora_rank, scaling, init):
        if tail is not None and name in fold:
            spec, tail = with_tail(spec, tail, dtype), None
        if device is not None:
            spec = tuple(t.to(device) for t in spec) if isinstance(spec, tuple) else spec.to(device)
        replace_linears(model, {name: spec}, dtype=dtype)
        skip.add(f"{name}.weight")
        if isinstance(spec, tuple):
            rename[f"{name}.bias"] = f"{name}.u_proj.bias"
            pending.discard(name)
            pending.update(f"{name}.{c}" for c in ("u_proj", "v_proj"))
            for c in ("v_proj", "u_proj"):
                settle(f"{name}.{c}")
        elif name in pending:
            settle(name)
        if tail is not None:
            tails[name] = tail

    def after(key: str) -> None:
        module_name = key.rpartition(".")[0]
        if module_name in pending:
            settle(module_name)

    stream_checkpoint(model, files, skip=skip, rename=rename, dtype=dtype, device=device, report=report,
                      after=after if finalize else None)
    if device is not None:  # buffers built on the CPU by empty_model (rotary frequencies)
        for module in model.modules():
            for bname, buf in list(module._buffers.items()):
                if buf is not None and buf.device.type != "meta":
                    module._buffers[bname] = buf.to(device)
    finish_loading(model)
    for name in sorted(pending):  # tied weights appear only after finish_loading
        settle(name)
    model.eval()
    return model, tails
