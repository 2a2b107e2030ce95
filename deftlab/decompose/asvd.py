"""ASVD's activation-aware decomposition (Yuan et al., 2023; hahnyuan/ASVD4LLM): scale each input channel j by
S_j = (mean_t |x_tj| + 1e-6)^α (α = 0.5; `calib_input_distribution`, "abs_mean"), take the SVD of W·diag(S), and
undo the scaling on the right factor: W = U Σ (Vᵀ diag(S)⁻¹).

- We take the exact thin SVD in float64 where ASVD calls `torch.svd_lowrank` (randomised, seed-dependent): one
  cached decomposition then serves every rank, as for DeFT.
- The sensitivity (`sensitivity`) is ASVD's `calib_sensitivity_ppl`: each matrix alone truncated at each kept ratio,
  the calibration perplexity measured, everything else dense: matrices × ratios forward passes, cached by the caller.
  Blocks before the measured matrix's are replayed from their cached dense output (the same numbers, about half
  the work), and finished matrices are handed to the caller as they come, so an interrupted table resumes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import Tensor
from tqdm.auto import tqdm

from deftlab.allocate.asvd import asvd_rank
from deftlab.decompose.config import ASVD_RATIOS
from deftlab.decompose.whiten import Decomposition, svd_counter, truncated_factors
from deftlab.errors import DeftlabError
from deftlab.linalg import thin_svd



def activation_scale(abs_mean: Tensor, alpha: float = 0.5) -> Tensor:
    """S_j = (mean |x_j| + 1e-6)^α."""
    if not torch.isfinite(abs_mean).all() or bool((abs_mean < 0).any()):
        raise DeftlabError("activation means are negative or not finite", "recollect the calibration statistics")
    return (abs_mean.double() + 1e-6) ** alpha


def scaled_svd(W: Tensor, scale: Tensor, *, dtype: torch.dtype = torch.float32) -> Decomposition:
    """W = U Σ (Vᵀ diag(S)⁻¹) from the SVD of W·diag(S) (float64); σ are the scaled matrix's."""
    if W.ndim != 2 or scale.shape != (W.shape[1],):
        raise DeftlabError(f"scale {tuple(scale.shape)} does not match weight {tuple(W.shape)}",
                           "pass one scale per input channel")
    S = scale.to(device=W.device, dtype=torch.float64)
    U, s, Vh = thin_svd(W.detach().double() * S[None, :])
    svd_counter.increment()
    return Decomposition(U=U.to(dtype), sigma=s, Vt_Sinv=(Vh / S[None, :]).to(dtype), whitened=False)


@torch.inference_mode()
def collect_abs_mean(model: torch.nn.Module, linears: Mapping[str, torch.nn.Module],
                     batches: Iterable[dict]) -> dict[str, Tensor]:
    """Mean |x| per input channel of each linear over the calibration tokens (padding excluded)."""
    sums = {n: torch.zeros(m.in_features, dtype=torch.float64) for n, m in linears.items()}
    state = {"mask": None, "tokens": 0}

    def hook(name):
        def fn(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            if state["mask"] is not None:
                x = x[state["mask"]]
            sums[name] += x.abs().sum(0, dtype=torch.float64).cpu()
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for b in batches:
            mask = b.get("attention_mask")
            ids = b["input_ids"].to(device)
            mask = torch.ones_like(ids) if mask is None else mask.to(device)
            state["mask"] = mask.reshape(-1).bool()
            state["tokens"] += int(mask.sum())
            model(input_ids=ids, attention_mask=mask, use_cache=False)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {n: s / max(state["tokens"], 1) for n, s in sums.items()}


@torch.inference_mode()
def batches_nll(model: torch.nn.Module, batches: list[dict], state: dict | None = None) -> float:
    """Mean next-token NLL over the batches' non-padding tokens (state["batch"]: the batch in flight, for
    replayed blocks)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for b_i, b in enumerate(batches):
        if state is not None:
            state["batch"] = b_i
        ids = b["input_ids"].to(device)
        mask = b.get("attention_mask", torch.ones_like(ids)).to(device)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
        tgt, keep = ids[:, 1:], mask[:, 1:].bool()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                                                reduction="none").reshape(tgt.shape)
        total += float(nll[keep].sum())
        count += int(keep.sum())
    return total / max(count, 1)


class _Replay(torch.nn.Module):
    """Stands in for decoder block j < l while block l's matrices are measured: returns block l's cached input for
    the current batch without computing (other attributes, e.g. attention_type, come from the block it replaces)."""

    def __init__(self, block: torch.nn.Module, state: dict):
        super().__init__()
        object.__setattr__(self, "_block", block)  # not a submodule: its weights stay out of this module
        object.__setattr__(self, "_state", state)

    def forward(self, *args, **kwargs):
        h = self._state["inputs"][self._state["batch"]]
        return (h,) if self._state["tuple"] else h

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_block"), name)


@torch.inference_mode()
def sensitivity(model: torch.nn.Module, linears: Mapping[str, torch.nn.Linear], decs: Mapping[str, Decomposition],
                batches: list[dict], ratios=ASVD_RATIOS, progress: bool = True,
                done: Mapping[str, Mapping[float, float]] | None = None,
                on_matrix: Callable[[str, dict[float, float]], None] | None = None) -> dict[str, dict[float, float]]:
    """{matrix: {ρ: calibration perplexity with only that matrix truncated to ASVD's rank at ρ}}.

    Matrices are measured block by block; blocks before the measured one are replayed from their cached output
    (one dense pass per block keeps it), so each measurement computes only the blocks from the measured one on,
    with the same numbers as a whole forward. done: rows already measured (skipped; resuming), on_matrix: called
    with each new row (to save progress)."""
    from deftlab.decompose.blockwise import decoder_layers

    _, layers = decoder_layers(model)
    block_of = {name: next((i for i, b in enumerate(layers) if any(m is lin for m in b.modules())), None)
                for name, lin in linears.items()}
    outside = [n for n, i in block_of.items() if i is None]
    if outside:
        raise DeftlabError(f"{outside[0]} is not in a decoder block", "ASVD measures the decoder blocks' linears")
    out = {n: {float(r): float(v) for r, v in row.items()} for n, row in (done or {}).items() if n in linears}
    todo = [n for n in linears if n not in out]
    bar = tqdm(total=len(todo) * len(ratios), desc="ASVD sensitivity", disable=not progress)
    state: dict = {"inputs": [], "batch": 0, "tuple": False}
    originals = list(layers)
    last = max((block_of[n] for n in todo), default=-1)
    try:
        for i in range(last + 1):
            for j in range(i):
                layers[j] = _Replay(originals[j], state)
            for name in (n for n in todo if block_of[n] == i):
                lin, original = linears[name], linears[name].weight.data
                m, n = original.shape
                row: dict[float, float] = {}
                try:
                    for rho in ratios:
                        k = min(asvd_rank(m, n, rho), decs[name].full_rank)
                        B, A = truncated_factors(decs[name], k)
                        lin.weight.data = (B @ A).to(original)
                        row[float(rho)] = math.exp(batches_nll(model, batches, state))
                        bar.update()
                finally:
                    lin.weight.data = original
                out[name] = row
                if on_matrix is not None:
                    on_matrix(name, row)
            if i < last:  # block i's dense output: the next block's cached input
                state["inputs"] = _block_outputs(model, originals[i], batches, state)
    finally:
        for j, block in enumerate(originals):
            layers[j] = block
    bar.close()
    return out


def _block_outputs(model: torch.nn.Module, block: torch.nn.Module, batches: list[dict], state: dict) -> list:
    """Each batch's dense output of `block` (earlier blocks replayed), caught by a hook that stops the forward."""
    outs: list = []

    def catch(_mod, _args, output):
        state["tuple"] = isinstance(output, tuple)
        outs.append((output[0] if state["tuple"] else output).detach().clone())
        raise _Stop

    handle = block.register_forward_hook(catch)
    try:
        for b_i, b in enumerate(batches):
            state["batch"] = b_i
            ids = b["input_ids"].to(next(model.parameters()).device)
            mask = b.get("attention_mask", torch.ones_like(ids)).to(ids.device)
            try:
                model(input_ids=ids, attention_mask=mask, use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return outs


class _Stop(Exception):
    pass
