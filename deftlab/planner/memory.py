"""Peak memory of each phase of a DeFT run, predicted from shapes alone (an `Architecture`): pure arithmetic.

Fine-tuning = frozen weights (NF4 for QLoRA, the compute dtype for LoRA, fp32 masters for full FT) + trainable
parameters, their gradients and AdamW's two states (fp32) + the activations autograd saves for the backward pass +
the logits' loss buffers + the largest transient (QLoRA dequantises one weight at a time).

The saved activations are counted tensor by tensor from what HF's LLaMA layer, PEFT's LoRA and SDPA save (checked
against `torch.autograd.graph.saved_tensors_hooks` in tests/unit/test_planner.py), per token of one decoder layer:
- each RMSNorm keeps its input upcast to fp32 (4d bytes) and the 1/rms (4 bytes);
- each LoRA target keeps its dropout mask (1 byte per element on CUDA, the compute dtype's size on CPU), the dropped
  input (e bytes per element) and lora_A's output (e·r); with dropout 0 the targets of one input share it;
- SDPA keeps q, k, v (k and v at the key/value heads' width), its output and a log-sum-exp per head;
- the gated MLP keeps SiLU's input, its output and up_proj's output (3·e·f);
- frozen linears, NF4 or not, and frozen DeFT factors keep nothing per token.
With gradient checkpointing every layer keeps only its input (e·d) and one layer's activations are rebuilt at a
time. Without it the first layer saves less when the embeddings are frozen (its input needs no gradient).

Not modelled: the CUDA context and allocator fragmentation (torch's max_memory_allocated excludes both), and for
OPT the attention/MLP dropout of its config (its masks are counted as LoRA-style masks of width d).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Literal

from deftlab.allocate.base import linear_keep
from deftlab.errors import DeftlabError
from deftlab.planner.architecture import Architecture

GiB = 1024 ** 3
DTYPE_BYTES = {"fp64": 8, "fp32": 4, "bf16": 2, "fp16": 2}
DEFT_TARGETS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj")  # the paper's #Trainable

Adapter = Literal["qlora", "lora", "full"]
# AdamW's two states per trainable parameter on the device: fp32, 8-bit, or paged to the CPU (QLoRA's recipe; the
# planner counts paged states as off the device, where paging puts them when memory runs short)
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adamw_8bit": 2, "paged_adamw": 0, "paged_adamw_8bit": 0}


def nf4_bytes(numel: int, blocksize: int = 64, double_quant: bool = True) -> float:
    """bitsandbytes NF4: 4 bits per weight plus one absmax per block (fp32, or 8-bit with an fp32 absmax per 256
    blocks when double-quantised, as QLoRA and deftlab do)."""
    blocks = math.ceil(numel / blocksize)
    absmax = blocks + 4 * math.ceil(blocks / 256) if double_quant else 4 * blocks
    return numel / 2 + absmax


@dataclass(frozen=True)
class TrainSetup:
    adapter: Adapter
    batch_size: int
    seq_len: int
    keep: float | None = None                # DeFT: fraction kept (None: dense)
    keep_of: Literal["model", "linears"] = "model"
    lora_r: int = 32
    lora_targets: tuple[str, ...] = DEFT_TARGETS
    lora_dropout: float = 0.05
    grad_ckpt: bool = False
    compute: Literal["bf16", "fp16", "fp32"] = "bf16"
    device: Literal["cuda", "cpu"] = "cuda"
    adapter_dtype: Literal["fp32", "bf16"] = "fp32"  # deftlab/PEFT: fp32 LoRA weights; QLoRA's script: bf16
    optimizer: Literal["adamw", "paged_adamw", "adamw_8bit", "paged_adamw_8bit"] = "adamw"

    def validate(self) -> None:
        if self.adapter not in ("qlora", "lora", "full"):
            raise DeftlabError(f"adapter {self.adapter!r} is not one the planner models", "use qlora, lora or full")
        if self.batch_size < 1 or self.seq_len < 1:
            raise DeftlabError(f"batch size {self.batch_size} and sequence length {self.seq_len} must be ≥ 1",
                               "pass positive --batch-size and --seq-len")
        if self.optimizer not in OPTIMIZER_STATE_BYTES:
            raise DeftlabError(f"optimizer {self.optimizer!r} is not one the planner models",
                               f"use one of {', '.join(OPTIMIZER_STATE_BYTES)}")
        if self.keep is not None and not 0 < self.keep <= 1:
            raise DeftlabError(f"keep={self.keep} is not in (0, 1]", "pass a fraction such as 0.85")

    @property
    def e(self) -> int:
        return DTYPE_BYTES[self.compute]


@dataclass
class Phase:
    """One phase's peak as named parts (bytes)."""
    name: str
    parts: dict[str, float] = field(default_factory=dict)
    per_sequence: float = 0.0  # the bytes that grow with each sequence of the batch (largest-batch search)

    @property
    def total(self) -> float:
        return sum(self.parts.values())


# --- parameters ---------------------------------------------------------------------------------------------------
def kept_linear_fraction(arch: Architecture, keep: float | None, keep_of: str = "model") -> float:
    """The fraction of the decoder linears' parameters DeFT keeps (1 for a dense model)."""
    if keep is None:
        return 1.0
    if keep_of == "linears":
        return keep
    return linear_keep(keep, arch.total_params(), arch.linear_params())


def trainable_params(arch: Architecture, setup: TrainSetup) -> int:
    """LoRA: r·(m + n) per targeted linear per layer; full: every parameter kept."""
    if setup.adapter == "full":
        kept = kept_linear_fraction(arch, setup.keep, setup.keep_of)
        return round(arch.total_params() - arch.linear_params() * (1 - kept))
    targets = set(setup.lora_targets)
    per_layer = sum(setup.lora_r * (lin.out_features + lin.in_features)
                    for lin in arch.block_linears() if lin.name in targets)
    return arch.layers * per_layer


def weight_bytes(arch: Architecture, setup: TrainSetup) -> dict[str, float]:
    """The model's own weights: decoder linears (kept part) and everything else (embeddings, head, norms)."""
    kept = arch.linear_params() * kept_linear_fraction(arch, setup.keep, setup.keep_of)
    other = arch.total_params() - arch.linear_params()
    if setup.adapter == "full":  # fp32 masters (mixed precision) or the fp32 model itself
        return {"weights: linears": 4.0 * kept, "weights: embeddings, head, norms": 4.0 * other}
    linears = nf4_bytes(round(kept)) if setup.adapter == "qlora" else setup.e * kept
    return {"weights: linears": linears, "weights: embeddings, head, norms": float(setup.e * other)}


# --- activations --------------------------------------------------------------------------------------------------
def _lora_saves(setup: TrainSetup, width: int, n_targets: int) -> float:
    """Per token, what n LoRA targets reading one input of `width` save (masks, dropped inputs, lora_A outputs)."""
    if n_targets == 0:
        return 0.0
    e, r = setup.e, setup.lora_r
    if setup.lora_dropout > 0:
        mask = 1 if setup.device == "cuda" else e
        return n_targets * ((mask + e) * width + e * r)
    return e * width + n_targets * e * r


def layer_activation_bytes(arch: Architecture, setup: TrainSetup, first: bool = False) -> float:
    """Bytes one decoder layer saves for backward, per token. `first`: the layer right after frozen embeddings,
    whose input needs no gradient (its first norm and the masks of the first LoRA inputs are not saved)."""
    e, d, f = setup.e, arch.hidden, arch.intermediate
    norm = 4 * d + 4
    attention = e * (2 * arch.q_width + 2 * arch.kv_width) + 4 * arch.heads
    if setup.adapter == "full":
        kept = kept_linear_fraction(arch, setup.keep, setup.keep_of)
        # every linear keeps its input (shared per group); factored linears also their rank-k middle
        inputs = e * (2 * d + arch.q_width + f)
        middle = 0.0 if kept >= 1 else sum(
            e * kept * lin.out_features * lin.in_features / (lin.out_features + lin.in_features)
            for lin in arch.block_linears())
        return 2 * norm + attention + inputs + middle + 3 * e * f
    by_group: dict[str, list[str]] = {}
    for lin in arch.block_linears():
        by_group.setdefault(lin.group, []).append(lin.name)
    widths = arch.gram_widths()
    targets = set(setup.lora_targets)
    lora = 0.0
    for group, names in by_group.items():
        n = sum(name in targets for name in names)
        lora += _lora_saves(setup, widths[group], n)
        if first and group == "attn_in" and n and setup.lora_dropout > 0:
            lora -= n * (1 if setup.device == "cuda" else e) * widths[group]  # no mask without an input grad
    mlp = 3 * e * f if arch.family == "llama" else e * f
    return (0 if first else norm) + norm + attention + lora + mlp


def logits_bytes(arch: Architecture, setup: TrainSetup) -> float:
    """Per token: the logits (compute dtype), the loss's saved fp32 log-softmax and its gradient."""
    return (setup.e + 4 + 4) * arch.vocab


def activation_bytes(arch: Architecture, setup: TrainSetup) -> dict[str, float]:
    """Saved activations and loss buffers of one step (bytes), at the setup's batch and sequence length."""
    tokens = setup.batch_size * setup.seq_len
    e, layer = setup.e, layer_activation_bytes(arch, setup)
    if setup.grad_ckpt:  # every layer's input, plus one layer rebuilt during its backward
        saved = arch.layers * e * arch.hidden + layer
    else:
        first = layer_activation_bytes(arch, setup, first=setup.adapter != "full")
        saved = first + (arch.layers - 1) * layer
    final_norm = 4 * arch.hidden + 4
    return {"activations": tokens * (saved + final_norm), "logits and loss": tokens * logits_bytes(arch, setup)}


# --- phases -------------------------------------------------------------------------------------------------------
def finetune_phase(arch: Architecture, setup: TrainSetup) -> Phase:
    setup.validate()
    parts = dict(weight_bytes(arch, setup))
    n_train = trainable_params(arch, setup)
    a = 4 if setup.adapter == "full" else DTYPE_BYTES[setup.adapter_dtype]
    if setup.adapter != "full":
        parts[f"adapters ({setup.adapter_dtype})"] = float(a * n_train)
    parts["gradients"] = float(a * n_train)
    if OPTIMIZER_STATE_BYTES[setup.optimizer]:
        parts[f"optimizer states ({setup.optimizer})"] = float(OPTIMIZER_STATE_BYTES[setup.optimizer] * n_train)
    if setup.adapter == "full" and setup.compute != "fp32":  # autocast's half copies of the weights, kept for backward
        parts["half-precision weight copies"] = float(setup.e * arch.linear_params()
                                                      * kept_linear_fraction(arch, setup.keep, setup.keep_of))
    acts = activation_bytes(arch, setup)
    parts.update(acts)
    if setup.adapter == "qlora":  # one weight dequantised to the compute dtype at a time
        parts["dequantised weight"] = float(setup.e * max(lin.out_features * lin.in_features
                                                          for lin in arch.block_linears()))
    return Phase("fine-tuning", parts, per_sequence=sum(acts.values()) / setup.batch_size)


def largest_batch(arch: Architecture, setup: TrainSetup, device_bytes: float) -> int:
    """The largest batch whose fine-tuning peak fits in device_bytes (0 if not even one sequence does)."""
    one = finetune_phase(arch, replace(setup, batch_size=1))
    fixed = one.total - one.per_sequence
    return max(0, int((device_bytes - fixed) // one.per_sequence))


def matched_lora_rank(arch: Architecture, setup: TrainSetup, keep: float) -> tuple[int, float, float]:
    """The matched-memory baseline: the largest LoRA rank r' ≤ setup.lora_r at which dense QLoRA's fine-tuning peak
    is at most QLoRA + DeFT's at `keep` (same batch, length, targets, optimizer, checkpointing).

    bitsandbytes has nothing below 4 bits, so the rank is the knob a QLoRA user has; the comparison then asks
    whether DeFT's saving is worth more than the LoRA capacity it buys. Returns (r', dense bytes at r', DeFT bytes).
    Raises when even rank 1 does not fit (the dense NF4 weights alone exceed it: large models at small budgets)."""
    target = finetune_phase(arch, replace(setup, adapter="qlora", keep=keep)).total
    for r in range(setup.lora_r, 0, -1):
        dense = finetune_phase(arch, replace(setup, adapter="qlora", keep=None, lora_r=r)).total
        if dense <= target:
            return r, dense, target
    dense = finetune_phase(arch, replace(setup, adapter="qlora", keep=None, lora_r=1)).total
    raise DeftlabError(f"dense QLoRA needs {dense / 2**30:.2f} GiB even at LoRA rank 1, more than QLoRA + DeFT's "
                       f"{target / 2**30:.2f} GiB at keep {keep}: no LoRA rank matches its memory",
                       "compare at a larger keep, or on a smaller model")


def gram_bytes(arch: Architecture) -> dict[str, float]:
    """float64 Grams of one block (one per distinct linear input) and of the whole model."""
    block = 8.0 * sum(n * n for n in arch.gram_widths().values())
    return {"block": block, "model": arch.layers * block}


def calibration_phase(arch: Architecture, *, n_samples: int, seq_len: int, batch_size: int = 1,
                      dtype: str = "bf16", block_sequential: bool = False,
                      hidden_on_device: bool = True) -> Phase:
    """Peak of collecting the Grams (no gradients; the backbone only, no LM head).

    Whole-model pass (today's default): every weight and every Gram resident at once. Block-sequential
    (deftlab.decompose.blockwise): the larger of (a) the embeddings while the block inputs are built and (b) one
    block's weights and Grams while a block runs; both beside the calibration set's hidden states (on the device,
    or on CPU/disk with `hidden_on_device=False`). Both add one batch's forward temporaries and the hook's float64
    copy of the widest input."""
    e = DTYPE_BYTES[dtype]
    tokens = batch_size * seq_len
    widest = max(arch.gram_widths().values())
    forward = float(tokens * (e * (3 * arch.hidden + 3 * arch.intermediate) + 8 * widest))
    grams = gram_bytes(arch)
    if not block_sequential:
        return Phase("calibration (whole model)", {
            "weights": float(e * arch.total_params()), "Grams (fp64, all blocks)": grams["model"],
            "forward temporaries": forward})
    hidden = float(e * (n_samples if hidden_on_device else batch_size) * seq_len * arch.hidden)
    block = float(e * (arch.block_linear_params() + arch.block_other_params()))
    embed = float(e * arch.embed_params())
    if embed > block + grams["block"]:
        return Phase("calibration (block by block)", {
            "embeddings (building the block inputs)": embed, "hidden states": hidden, "forward temporaries": forward})
    return Phase("calibration (block by block)", {
        "weights (one block)": block, "Grams (fp64, one block)": grams["block"], "hidden states": hidden,
        "forward temporaries": forward})


def decomposition_phase(arch: Architecture, *, block_sequential: bool = False, dtype: str = "bf16") -> Phase:
    """Peak of whitening and SVD-ing the largest matrix in float64 (W, W·S, U, Vᵀ, the Gram and its Cholesky
    factor), beside the resident weights and Grams (all of them today; one block's block by block)."""
    lin = max(arch.block_linears(), key=lambda x: x.out_features * x.in_features)
    m, n = lin.out_features, lin.in_features
    k = min(m, n)
    work = 8.0 * (2 * m * n + 2 * n * n + k * (m + n) + k)
    e = DTYPE_BYTES[dtype]
    grams = gram_bytes(arch)
    if block_sequential:
        resident = {"weights (one block)": float(e * arch.block_linear_params()), "Grams (one block)": grams["block"]}
    else:
        resident = {"weights": float(e * arch.total_params()), "Grams (all blocks)": grams["model"]}
    name = "decomposition (block by block)" if block_sequential else "decomposition (whole model)"
    return Phase(name, {**resident, f"SVD workspace ({lin.name}, fp64)": work})
