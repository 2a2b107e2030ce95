"""ROUGE on known pairs and train/test overlap detection."""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import pytest

from deftlab.errors import DeftlabError
from deftlab.scoring.overlap import normalize_question, train_test_overlap
from deftlab.scoring.rouge import rouge_scores

REPO = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------- ROUGE


def test_rouge_identical_and_disjoint():
    same = rouge_scores(["the cat sat on the mat"], ["the cat sat on the mat"])
    assert set(same) == {"rouge1", "rouge2", "rougeL", "rougeLsum"}
    assert all(v == pytest.approx(100.0) for v in same.values())
    none = rouge_scores(["alpha beta gamma"], ["delta epsilon zeta"])
    assert all(v == 0.0 for v in none.values())


def test_rouge_hand_computed():
    # pred: the cat sat on the mat / ref: the cat lay on the mat
    # unigrams: 5 of 6 match both ways → F1 = 5/6; bigrams: the-cat, on-the, the-mat = 3 of 5 → 3/5;
    # LCS "the cat on the mat" = 5 → 5/6.
    s = rouge_scores(["the cat sat on the mat"], ["the cat lay on the mat"], percent=False)
    assert s["rouge1"] == pytest.approx(5 / 6)
    assert s["rouge2"] == pytest.approx(3 / 5)
    assert s["rougeL"] == pytest.approx(5 / 6)
    # precision ≠ recall: pred "the cat" vs ref "the cat sat": P=1, R=2/3 → F=0.8 (unigrams)
    s2 = rouge_scores(["the cat"], ["the cat sat"], percent=False, rouge_types=("rouge1",))
    assert s2 == {"rouge1": pytest.approx(0.8)}
    # mean over pairs: (100 + 0) / 2
    assert rouge_scores(["a b", "c"], ["a b", "d"])["rouge1"] == pytest.approx(50.0)


def test_rouge_stemmer_flag_and_errors():
    assert rouge_scores(["running"], ["runs"])["rouge1"] == 0.0
    assert rouge_scores(["running"], ["runs"], use_stemmer=True)["rouge1"] == pytest.approx(100.0)
    with pytest.raises(DeftlabError, match="2 predictions but 1 references"):
        rouge_scores(["a", "b"], ["a"])
    with pytest.raises(DeftlabError):
        rouge_scores([], [])
    with pytest.raises(DeftlabError, match="rouge9"):
        rouge_scores(["a"], ["a"], rouge_types=("rouge9",))


# ----------------------------------------------------------------------------- overlap


def test_normalize_question():
    assert normalize_question("  How many APPLES, does Ann's  bag hold?\n ") == "how many apples does ann s bag hold"
    assert normalize_question("It costs $1,250.75.") == "it costs 1250.75"


def test_overlap_exact_near_and_clean():
    train = [
        "Tom has 3 apples. He eats 1. How many apples are left?",
        "A train travels 60 km in 1 hour. How far does it travel in 5 hours at the same speed?",
        "Sara reads 12 pages a day for a week. How many pages does she read?",
    ]
    test = [
        "tom has 3 apples he eats 1 how many apples are left",  # exact after normalisation
        "A train travels 60 km in 1 hour. How far does it go in 5 hours at the same speed?",  # near
        "What is the capital of France?",  # clean
        "",  # empty: never overlapping
    ]
    rep = train_test_overlap(train, test, near_threshold=0.8)
    assert rep.exact == [0] and rep.near == [1]
    assert rep.matches[0] == (0, 1.0) and rep.matches[1][0] == 1 and 0.8 <= rep.matches[1][1] < 1.0
    assert rep.clean == [2, 3] and rep.overlapping == [0, 1]
    assert "1 exact + 1 near" in rep.summary()
    strict = train_test_overlap(train, test, near_threshold=1.0)
    assert strict.near == []
    with pytest.raises(DeftlabError):
        train_test_overlap(train, test, near_threshold=0.0)


def _brute_force_near(train, test, t):
    T = [frozenset(normalize_question(q).split()) for q in train]
    exact = {normalize_question(q) for q in train if normalize_question(q)}
    out = []
    for i, q in enumerate(test):
        s = frozenset(normalize_question(q).split())
        if not s or normalize_question(q) in exact:
            continue
        if max((len(s & x) / len(s | x) for x in T if x), default=0.0) >= t:
            out.append(i)
    return out


@pytest.mark.parametrize("threshold", [0.5, 0.75, 0.9])
def test_overlap_matches_brute_force(threshold):
    rng = random.Random(threshold)
    vocab = [f"w{i}" for i in range(60)]
    train = [" ".join(rng.choices(vocab, k=rng.randint(3, 15))) for _ in range(300)]
    test = []
    for _ in range(200):  # perturbed copies of training questions and fresh ones
        if rng.random() < 0.5:
            words = rng.choice(train).split()
            for _ in range(rng.randint(0, 2)):
                words[rng.randrange(len(words))] = rng.choice(vocab)
            test.append(" ".join(words))
        else:
            test.append(" ".join(rng.choices(vocab, k=rng.randint(3, 15))))
    rep = train_test_overlap(train, test, near_threshold=threshold)
    assert rep.near == _brute_force_near(train, test, threshold)
    assert rep.near  # the perturbed copies make the check non-trivial


def test_real_math10k_overlap_counts():
    env = os.environ.get("DEFTLAB_DATA_DIR")
    d = Path(env) if env else REPO.parent / "shared" / "data"
    d = d if d.is_absolute() else Path.cwd() / d
    if not (d / "arith" / "math_10k.json").is_file():
        pytest.skip("real data directory not available (set DEFTLAB_DATA_DIR)")
    from deftlab.data import load_arith_test, load_arith_train

    train = [r["instruction"] for r in load_arith_train(data_dir=d)]
    t0 = time.perf_counter()
    counts = {}
    for name in ("AddSub", "SVAMP", "gsm8k", "mawps"):
        rep = train_test_overlap(train, [r["instruction"] for r in load_arith_test(name, data_dir=d)])
        counts[name] = (len(rep.exact), len(rep.near))
    assert time.perf_counter() - t0 < 20
    # measured once on the real files (see the data report); GSM8K/SVAMP test questions are not in math_10k
    assert counts == {"AddSub": (331, 12), "SVAMP": (0, 0), "gsm8k": (0, 0), "mawps": (165, 15)}
