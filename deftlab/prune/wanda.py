"""Wanda (Sun et al., 2024; locuslab/wanda `prune_wanda`): score S_ij = |W_ij|·‖X_j‖₂ with ‖X_j‖₂ the norm of
input feature j over the calibration tokens (√ of the Gram's diagonal), and in every output row the
⌊n·s⌋ lowest-scoring weights are zeroed (Wanda's comparison group is the row: `sort(W_metric, dim=-1)`).

Sparsity per block: one s everywhere, or OWL's (Yin et al., 2024) s_l = s − offset_l from the outlier map, clamped
at 0.01 below as OWL does (`deftlab.allocate.owl` computes D_l and the centred offsets). LLaMA blocks are equal in
size, so the mean sparsity, and the kept parameter count, are the uniform one's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from deftlab.errors import DeftlabError


def wanda_scores(W: Tensor, input_sq_norms: Tensor) -> Tensor:
    """|W| · ‖X_j‖ (out × in), float32."""
    if W.ndim != 2 or input_sq_norms.shape != (W.shape[1],):
        raise DeftlabError(f"input norms {tuple(input_sq_norms.shape)} do not match weight {tuple(W.shape)}",
                           "pass diag(XᵀX) of the layer's own inputs")
    return W.detach().abs().float() * input_sq_norms.detach().to(W.device).clamp_min(0).sqrt().float()[None, :]


def wanda_mask(W: Tensor, input_sq_norms: Tensor, sparsity: float) -> Tensor:
    """Boolean keep-mask: per output row, all but the ⌊n·sparsity⌋ lowest Wanda scores (ties by position, as
    Wanda's stable sort)."""
    if not 0.0 <= sparsity < 1.0:
        raise DeftlabError(f"sparsity {sparsity} is outside [0, 1)", "prune a fraction of each row, e.g. 0.15")
    scores = wanda_scores(W, input_sq_norms)
    drop = int(W.shape[1] * sparsity)
    mask = torch.ones_like(scores, dtype=torch.bool)
    if drop:
        idx = torch.sort(scores, dim=-1, stable=True).indices[:, :drop]
        mask.scatter_(1, idx, False)
    return mask


def block_sparsities(sparsity: float, layers: list[int], offsets: Mapping[int, float] | None = None) -> dict[int, float]:
    """Per-block sparsity: `sparsity` everywhere, or OWL's s − offset_l (floored at 0.01, below 1)."""
    if offsets is None:
        return dict.fromkeys(layers, sparsity)
    return {b: min(max(sparsity - offsets[b], 0.01), 0.99) for b in layers}


@torch.no_grad()
def apply_masks(linears: Mapping[str, torch.nn.Linear], masks: Mapping[str, Tensor]) -> int:
    """Zero the pruned weights in place; returns how many weights remain."""
    kept = 0
    for name, mask in masks.items():
        w = linears[name].weight
        w.mul_(mask.to(device=w.device, dtype=w.dtype))
        kept += int(mask.sum())
    return kept


@dataclass
class Pruning:
    """What a pruning run kept, in the shape of `deftlab.allocate.Allocation` where tables read it (keep fraction,
    kept/dense parameters, a per-matrix frame); no rank is reduced, so ranks/factored/lrc are empty."""

    sparsity: dict[str, float]  # matrix -> fraction of its weights zeroed
    kept: dict[str, int]
    shapes: dict[str, tuple[int, int]]
    layer: dict[str, int]
    info: dict = field(default_factory=dict)
    method: str = "wanda"
    err: float = 0.0
    ranks: dict = field(default_factory=dict)
    factored: dict = field(default_factory=dict)
    lrc: dict = field(default_factory=dict)

    @property
    def params_dense(self) -> int:
        return sum(m * n for m, n in self.shapes.values())

    @property
    def params_kept(self) -> int:
        return sum(self.kept.values())

    @property
    def keep_fraction(self) -> float:
        return self.params_kept / self.params_dense

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame([{"name": n, "layer": self.layer[n], "m": m, "n": k, "full_rank": min(m, k),
                              "rank": min(m, k), "factored": False, "lrc": False, "sparsity": self.sparsity[n],
                              "params_dense": m * k, "params": self.kept[n]} for n, (m, k) in self.shapes.items()])
