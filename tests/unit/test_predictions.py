"""Reading per-item answer losses back from a run's prediction files."""

import json

import pytest

from deftlab.eval.predictions import answer_losses


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_answer_losses_recover_summed_nll_per_item_and_filter_by_set_and_overlap(tmp_path):
    _write(tmp_path / "SVAMP.predictions.jsonl", [
        {"index": 0, "answer_nll": 1.5, "answer_tokens": 4, "overlaps_train": False},
        {"index": 1, "answer_nll": 0.5, "answer_tokens": 2, "overlaps_train": True},
        {"index": 2, "answer_nll": None, "answer_tokens": 0}])  # no scored reference: left out
    _write(tmp_path / "gsm8k.predictions.jsonl", [{"index": 0, "answer_nll": 2.0, "answer_tokens": 3}])
    everything = answer_losses(tmp_path)
    assert everything == {("svamp", 0): (6.0, 4), ("svamp", 1): (1.0, 2), ("gsm8k", 0): (6.0, 3)}
    assert answer_losses(tmp_path, "answer_nll_svamp") == {("svamp", 0): (6.0, 4), ("svamp", 1): (1.0, 2)}
    assert answer_losses(tmp_path, "answer_nll_svamp_non_overlap") == {("svamp", 0): (6.0, 4)}
    assert set(answer_losses(tmp_path, "answer_nll_non_overlap")) == {("svamp", 0), ("gsm8k", 0)}
    # the recorded aggregate is the token-weighted mean
    assert sum(v for v, _ in everything.values()) / sum(t for _, t in everything.values()) == pytest.approx(13 / 9)
    assert answer_losses(tmp_path / "absent") == {}
    with pytest.raises(ValueError):
        answer_losses(tmp_path, "acc_svamp")


def test_text_losses_pair_documents_for_a_held_out_perplexity(tmp_path):
    import math

    from deftlab.eval.predictions import item_losses, text_losses

    _write(tmp_path / "heldout.predictions.jsonl", [{"index": 0, "nll": 20.0, "tokens": 10},
                                                     {"index": 1, "nll": 6.0, "tokens": 2}])
    got = text_losses(tmp_path)
    assert got == {("heldout", 0): (20.0, 10), ("heldout", 1): (6.0, 2)} == item_losses(tmp_path, "ppl_heldout")
    # the perplexity is exp of the token-weighted mean NLL
    assert math.exp(sum(v for v, _ in got.values()) / sum(t for _, t in got.values())) == pytest.approx(math.exp(26 / 12))
    assert text_losses(tmp_path, "other") == {}
