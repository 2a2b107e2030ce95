"""OWL baseline (Outlier-Weighted Layerwise ratios, luuyin/OWL) turned into a rank allocation.

Layer outlier ratio D_l (research notes §3, §10): the Wanda score A_ij = |W_ij|·‖x_j‖ over the concatenation of
all linears of block l; D_l = 100·#{A > M·mean A}/numel A (percent). We take ‖x_j‖² from the diagonal of the
input Gram (a sum over tokens, where OWL keeps a running mean): every linear of a block sees the same tokens, so
the two differ by one factor per block, which cancels in the M·mean threshold.

Mapping: r_l = (D_l − min D)/(max D − min D)·2λ, centred to mean 0 over blocks, added to the target ratio —
every matrix of block l gets the same ratio, blocks with more outliers keep more. Because blocks differ in size
(OWL's mean-centring only fixes the unweighted mean), an offset is bisected so the global target is met (notes
§3). keep target → per-block kept-parameter ratio ρ_l (SVD-LLM θ = ⌊mnρ/(m+n)⌋); err target → per-block
rank-reduction ratio p_l (pruned = int(p·full)); see ``uniform`` for the shared machinery.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor

from deftlab.allocate.base import Allocation, Target, check_spectra, make_allocation
from deftlab.allocate.uniform import fit_offset
from deftlab.errors import DeftlabError


def layer_outlier_ratios(weights: Mapping[str, Tensor], input_sq_norms: Mapping[str, Tensor],
                         layer_of: Mapping[str, int], M: float = 5.0) -> dict[int, float]:
    """OWL's D_l in percent per block, from weights and the squared input norms per column (diag of the Gram).

    Two passes per block (mean, then count) instead of concatenating the scores, so memory stays one matrix.
    """
    blocks: dict[int, list[str]] = {}
    for name in weights:
        if name not in input_sq_norms or name not in layer_of:
            raise DeftlabError(f"no input norms or layer index for {name}", "pass them for every weight")
        blocks.setdefault(int(layer_of[name]), []).append(name)

    def score(name: str) -> Tensor:
        W = weights[name].detach()
        sq = input_sq_norms[name].detach().to(device=W.device, dtype=torch.float64)
        if W.ndim != 2 or sq.shape != (W.shape[1],):
            raise DeftlabError(f"{name}: input norms {tuple(sq.shape)} do not match weight {tuple(W.shape)}",
                               "pass diag(XᵀX) of the layer's own inputs")
        if not torch.isfinite(sq).all() or bool((sq < 0).any()) or not torch.isfinite(W).all():
            raise DeftlabError(f"{name}: NaN/Inf or negative input norms", "recollect calibration statistics")
        return W.abs().to(torch.float32) * sq.sqrt().to(torch.float32)[None, :]

    out = {}
    for layer, names in sorted(blocks.items()):
        total, count = 0.0, 0
        for name in names:
            total += float(score(name).sum(dtype=torch.float64))
            count += weights[name].numel()
        thresh = M * total / count
        outliers = sum(int((score(name) > thresh).sum()) for name in names)
        out[layer] = 100.0 * outliers / count
    return out


def owl_ratio_offsets(outlier_ratios: Mapping[int, float], layers: list[int], lamda: float) -> dict[int, float]:
    """OWL's centred map: r_l = (D_l − min)/(max − min)·2λ minus its mean over the given blocks."""
    missing = [b for b in layers if b not in outlier_ratios]
    if missing:
        raise DeftlabError(f"no outlier ratio for block(s) {missing[:5]}", "compute layer_outlier_ratios first")
    D = np.array([float(outlier_ratios[b]) for b in layers])
    if not np.isfinite(D).all():
        raise DeftlabError("outlier ratios contain NaN/Inf", "recollect calibration statistics")
    span = D.max() - D.min()
    r = (D - D.min()) / span * 2 * lamda if span > 0 else np.zeros_like(D)
    return dict(zip(layers, (r - r.mean()).tolist()))


def owl_allocate(spectra, *, err: float | None = None, keep: float | None = None,
                 outlier_ratios: Mapping[int, float], lamda: float = 0.08) -> Allocation:
    """Per-block ratios from OWL's outlier map (λ = ``lamda``), offset so the global target is met."""
    spectra = check_spectra(spectra)
    target = Target.from_kwargs(keep=keep, err=err)
    if not 0 <= lamda < float("inf"):
        raise DeftlabError(f"lamda={lamda!r} is not a non-negative number", "use OWL's default 0.08")
    layers = sorted({s.layer for s in spectra})
    centred = owl_ratio_offsets(outlier_ratios, layers, lamda)
    # keep: more outliers → larger kept ratio; err: more outliers → smaller rank reduction
    sign = 1.0 if target.kind == "keep" else -1.0
    base = np.array([sign * centred[s.layer] for s in spectra])
    ranks, info = fit_offset(spectra, target, base)
    info.update(lamda=lamda, outlier_ratios={int(b): float(outlier_ratios[b]) for b in layers},
                block_ratio={int(b): target.value + sign * centred[b] + info["offset"] for b in layers})
    return make_allocation("owl", spectra, ranks, info=info)
