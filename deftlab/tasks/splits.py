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


def two_way_split(n: int, train_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, test) sorted indices of a seeded random split of n items, round(n · train_fraction) to train
    (WeLore Table 9's 700/300 split of SVAMP's 1,000 problems at 0.7)."""
    if not 0 < train_fraction < 1:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    k = round(n * train_fraction)
    return sorted(order[:k]), sorted(order[k:])
