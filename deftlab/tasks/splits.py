"""Which training examples a run trains on, and which of the rest are held out for PPL(Train).

Index lists only (pure functions): the datamodule and the fine-tuning recipe both call `train_subset`, so the
examples held out are exactly the ones never trained on.
"""

from __future__ import annotations

import random
from typing import Iterable


def train_subset(n: int, limit: int | None, seed: int) -> list[int]:
    """Sorted indices of the examples trained on: all n, or a `random.Random(seed)` sample of `limit`."""
    if not limit or limit >= n:
        return list(range(n))
    return sorted(random.Random(seed).sample(range(n), limit))


def heldout_order(n: int, exclude: Iterable[int], seed: int) -> list[int]:
    """The indices not in `exclude`, in a seeded random order (so a token-capped prefix is a random sample)."""
    excluded = set(exclude)
    rest = [i for i in range(n) if i not in excluded]
    random.Random(seed).shuffle(rest)
    return rest
