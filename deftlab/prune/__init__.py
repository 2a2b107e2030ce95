"""Unstructured pruning baselines (pruning + LoRA at DeFT's parameter count): Wanda scores, per-row masks, OWL's
per-block sparsities."""

from deftlab.prune.wanda import Pruning, apply_masks, block_sparsities, wanda_mask, wanda_scores

__all__ = ["Pruning", "apply_masks", "block_sparsities", "wanda_mask", "wanda_scores"]
