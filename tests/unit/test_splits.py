"""The training subset and PPL(Train)'s held-out examples: never an example trained or calibrated on."""

from __future__ import annotations

import random

import pytest

from deftlab.data.calibration import calibration_picks, sample_calibration
from deftlab.recipes.finetune import FinetuneConfig, heldout_train_text
from deftlab.tasks import Example, Task
from deftlab.tasks.splits import heldout_order, train_subset
from deftlab.train.profiles import load_profile


def test_train_subset_is_the_seeded_sample_or_everything():
    assert train_subset(10, None, 0) == list(range(10)) == train_subset(10, 10, 0) == train_subset(10, 50, 3)
    sub = train_subset(100, 7, 42)
    assert sub == sorted(random.Random(42).sample(range(100), 7)) and len(set(sub)) == 7
    assert train_subset(100, 7, 43) != sub


def test_heldout_order_is_the_complement_in_a_seeded_order():
    order = heldout_order(20, [0, 5, 7], seed=1)
    assert sorted(order) == [i for i in range(20) if i not in (0, 5, 7)]
    assert order == heldout_order(20, {7, 5, 0}, seed=1) and order != sorted(order)
    assert heldout_order(3, range(3), seed=0) == []


def test_calibration_picks_are_what_sample_calibration_takes():
    items = [f"t{i}" for i in range(50)]
    assert sample_calibration(items, 6, seed=3) == [items[i] for i in calibration_picks(50, 6, 3)]


class _Numbered(Task):
    name = "numbered"

    def __init__(self, n):
        self.n = n

    def train_examples(self):
        return [Example(prompt=f"<q{i}>", response=f"<a{i}>") for i in range(self.n)]


@pytest.mark.parametrize("decomposed", [False, True])
def test_heldout_text_excludes_trained_and_calibration_examples(decomposed):
    n, limit = 60, 20
    params = dict(model="tiny", task="numbered", profile="smoke", train_limit=limit)
    if decomposed:
        params.update(method="deft", keep=0.8, calib="numbered", calib_n=15, calib_seed=7)
    else:
        params.update(method="dense")
    cfg = FinetuneConfig.from_params(params)
    profile = load_profile("smoke", train_limit=limit)
    text = heldout_train_text(cfg, _Numbered(n), profile)
    used = [int(chunk.split(">")[0][2:]) for chunk in text.split("\n\n")]
    assert all(chunk == f"<q{i}><a{i}>" for chunk, i in zip(text.split("\n\n"), used))  # prompt + response
    trained = set(train_subset(n, limit, profile.seed))
    calibrated = set(calibration_picks(n, 15, 7)) if decomposed else set()
    assert set(used) == set(range(n)) - trained - calibrated and len(used) == len(set(used))
    if decomposed:  # the calibration exclusion removes examples the training one does not
        assert calibrated - trained


def test_heldout_text_is_none_when_every_example_is_trained_on():
    cfg = FinetuneConfig.from_params(dict(model="tiny", task="numbered", profile="smoke", method="dense"))
    assert heldout_train_text(cfg, _Numbered(10), load_profile("smoke", train_limit=None)) is None


def test_heldout_text_is_capped_near_the_token_budget():
    cfg = FinetuneConfig.from_params(dict(model="tiny", task="numbered", profile="smoke", method="dense",
                                          ppl_max_tokens=10))
    text = heldout_train_text(cfg, _Numbered(5000), load_profile("smoke", train_limit=10))
    assert 80 <= len(text) < 120  # 10 tokens × 8 chars, one example over at most
