"""Tasks: byte-exact templates, examples, scoring, overlap; tokenisation with the loss on the response only."""

from __future__ import annotations

import pytest

from deftlab.errors import DeftlabError, UnknownNameError
from deftlab.models.tiny import TinyTokenizer
from deftlab.tasks import Example, get_task, task_names
from deftlab.tasks import templates as T
from deftlab.tasks.arithmetic import ArithmeticTask
from deftlab.tasks.math import MathTask
from deftlab.tasks.text import TextTask
from deftlab.tasks.xsum import XSumTask
from deftlab.tasks.encoding import IGNORE_INDEX, PaddingCollator, encode_example
from deftlab.train.datamodule import SeededBatchSampler

HEADER = "Below is an instruction that describes a task. Write a response that appropriately completes the request."


def _rec(q, out, ans):
    return {"instruction": q, "input": "", "output": out, "answer": ans}


TRAIN = [_rec("Tom has 3 apples and buys 4 more. How many apples?", "3 + 4 = 7. The answer is 7.", "7"),
         _rec("Ann has 10 pens and loses 2. How many pens?", "10 - 2 = 8. The answer is 8.", "8")]
TEST = [_rec("Tom has 3 apples and buys 4 more. How many apples?", "", "7.0"),  # duplicates a training question
        _rec("A box holds 6 eggs. How many eggs in 2 boxes?", "", "12"),
        _rec("Sam reads 5 pages a day for 3 days. How many pages?", "", "15")]
AQUA = [_rec("Pick one. Answer Choices: (A)1 (B)2 (C)3 (D)4 (E)5", "", "C")]


def _arith(**kw):
    return ArithmeticTask(train_source=lambda: TRAIN, test_source=lambda n: AQUA if n == "AQuA" else TEST, **kw)


# --- templates -------------------------------------------------------------------------------------------------
def test_alpaca_template_is_the_plain_deft_appendix_one():
    assert T.alpaca_prompt("Add 2 and 3.") == (
        HEADER + "\n\n### Instruction:\nAdd 2 and 3.\n\n### Response:\n")
    assert T.alpaca_prompt("Q", "ctx").endswith("### Instruction:\nQ\n\n### Input:\nctx\n\n### Response:\n")


def test_llm_adapters_templates_byte_exact():
    sp = " " * 16
    assert T.llm_adapters_prompt("Q?", "eval") == (
        HEADER + " \n\n" + sp + "### Instruction:\n" + sp + "Q?\n\n" + sp + "### Response:\n" + sp)
    assert T.llm_adapters_prompt("Q?", "train") == (
        HEADER + "  \n\n" + sp + "### Instruction:\n" + sp + "Q?\n" + sp + "\n" + sp + "### Response:\n" + sp)
    assert T.llm_adapters_prompt("Q?", "eval") != T.llm_adapters_prompt("Q?", "train")  # their mismatch
    with pytest.raises(ValueError):
        T.llm_adapters_prompt("Q?", "test")


def test_xsum_and_math_formats():
    joined = T.xsum_prompt("Some text.") + T.xsum_response("A summary.")
    assert joined == "original text: Some text.\nsummary: A summary."
    assert T.math_response("So x = 2.", "2") == "So x = 2. The final answer is $\\boxed{2}$."
    assert T.math_response("Thus $\\boxed{2}$.", "2") == "Thus $\\boxed{2}$."


# --- registry --------------------------------------------------------------------------------------------------
def test_registry_names_and_errors():
    assert task_names() == ["arith", "generated", "math", "text", "xsum"]
    with pytest.raises(UnknownNameError, match="unknown task 'nope'"):
        get_task("nope")
    with pytest.raises(DeftlabError, match="no option"):
        get_task("arith", bogus=1)
    assert get_task("arith", max_new_tokens=64).max_new_tokens == 64


# --- arithmetic -------------------------------------------------------------------------------------------------
def test_arith_examples_use_the_plain_template():
    task = _arith()
    ex = task.train_examples()[0]
    assert ex.prompt == T.alpaca_prompt(TRAIN[0]["instruction"]) and ex.response == TRAIN[0]["output"]
    ev = task.eval_examples("AddSub", limit=2)
    assert [e.gold for e in ev] == ["7.0", "12"] and len(task.eval_examples("AddSub")) == 3
    assert task.max_new_tokens == 256 and "### Instruction" in task.stop_strings
    la = _arith(prompt_style="llm-adapters")
    assert la.train_examples()[0].prompt == T.llm_adapters_prompt(TRAIN[0]["instruction"], "train")
    assert la.eval_examples("AddSub")[0].prompt == T.llm_adapters_prompt(TEST[0]["instruction"], "eval")
    # LLM-Adapters scores the uncut output; a small greedy model can opt back into the stop strings
    assert la.stop_strings == () and _arith(stop_at_new_example=False).stop_strings == ()
    assert _arith(prompt_style="llm-adapters", stop_at_new_example=True).stop_strings == T.ALPACA_STOPS
    with pytest.raises(DeftlabError):
        _arith(prompt_style="fancy")


def test_arith_trains_on_a_seeded_split_of_a_test_set(tmp_path):
    """WeLore Table 9: train on 700 SVAMP problems, test on the other 300, the bare answer as the response."""
    import json

    from deftlab.tasks.splits import two_way_split

    (tmp_path / "arith" / "SVAMP").mkdir(parents=True)
    recs = [_rec(f"Problem {i}: how many?", f"Reasoning {i}. The answer is {i + 1}.", f"{i + 1}.0") for i in range(10)]
    (tmp_path / "arith" / "SVAMP" / "test.json").write_text(json.dumps(recs))
    task = ArithmeticTask(data_dir=tmp_path, train_set="svamp", answer_only=True)
    train, test = task.train_examples(), task.eval_examples("SVAMP")
    assert len(train) == 7 and len(test) == 3  # round(10 · 0.7)
    assert {e.question for e in train} | {e.question for e in test} == {r["instruction"] for r in recs}
    assert not {e.question for e in train} & {e.question for e in test}
    idx, _ = two_way_split(10, 0.7, 0)
    assert [e.response for e in train] == [str(i + 1) for i in idx]  # "8.0" is written "8"
    assert ArithmeticTask(data_dir=tmp_path, train_set="SVAMP").train_examples()[0].response.startswith("Reasoning")
    assert two_way_split(10, 0.7, 1) != two_way_split(10, 0.7, 0)
    assert two_way_split(1000, 0.7, 0)[0] == two_way_split(1000, 0.7, 0)[0] and len(two_way_split(1000, 0.7, 0)[1]) == 300
    with pytest.raises(DeftlabError, match="train_fraction"):
        ArithmeticTask(data_dir=tmp_path, train_set="SVAMP", train_fraction=1.0)
    with pytest.raises(UnknownNameError):
        ArithmeticTask(data_dir=tmp_path, train_set="CoinFlip")


def test_arith_score_last_number_and_overlap():
    task = _arith()
    ex = task.eval_examples("AddSub")
    outputs = ["3 + 4 = 7. The answer is 7.", "6 * 2 = 12 eggs, or 13.", "5 * 3 = 15. The answer is 15"]
    items, m = task.score("AddSub", ex, outputs)
    assert [it["extracted"] for it in items] == [7.0, 13.0, 15.0]  # LAST number (LLM-Adapters)
    assert [it["correct"] for it in items] == [True, False, True]
    assert m["n"] == 3 and m["correct"] == 2 and m["accuracy"] == pytest.approx(2 / 3)
    assert m["n_overlap"] == 1 and [it["overlaps_train"] for it in items] == [True, False, False]
    assert m["accuracy_non_overlap"] == pytest.approx(1 / 2)  # the duplicated (correct) item is excluded


def test_aqua_scores_option_letters():
    task = _arith()
    ex = task.eval_examples("AQuA")
    assert task.score("AQuA", ex, ["the answer is (C)"])[0][0]["correct"] is True
    assert task.score("AQuA", ex, ["the answer is (D)"])[0][0]["correct"] is False


def test_generated_task_has_disjoint_seeds():
    task = get_task("generated", n_train=20, n_test=5)
    assert len(task.train_examples()) == 20 and len(task.eval_examples("generated")) == 5
    assert task.eval_examples("generated")[0].question != task.train_examples()[0].question


# --- xsum, math, text -------------------------------------------------------------------------------------------
def test_xsum_task_clips_and_scores_rouge():
    data = {"test": [{"document": "w " * 10, "summary": "the cat sat", "id": 1}]}
    task = XSumTask(source=lambda s: data[s], max_document_words=4)
    ex = task.eval_examples("test")[0]
    assert ex.prompt == "original text: w w w w\nsummary:" and ex.meta["document_clipped"]
    _, m = task.score("test", [ex], ["the cat sat"])
    assert m["rouge1"] == pytest.approx(100.0) and m["n"] == 1
    _, m0 = task.score("test", [ex], ["dogs run"])
    assert m0["rouge1"] == 0.0


def test_math_task_boxed_scoring():
    recs = [{"problem": "What is 1+1?", "solution": "1+1 = $\\boxed{2}$.", "answer": "2"}]
    task = MathTask(source=lambda s: recs)
    ex = task.eval_examples("math500")
    assert ex[0].prompt == T.math_prompt("What is 1+1?") and ex[0].gold == "2"
    items, m = task.score("math500", ex, ["so it is \\boxed{2}"])
    assert items[0]["correct"] and m["accuracy"] == 1.0
    assert not task.score("math500", ex, ["\\boxed{3}"])[0][0]["correct"]


def test_text_task_holds_out_documents():
    texts = [f"document number {i}" for i in range(10)]
    task = TextTask(source=lambda: texts, n_eval=3)
    assert [e.response for e in task.train_examples()] == texts[:7]
    assert [e.response for e in task.eval_examples("heldout")] == texts[7:]
    assert all(e.prompt == "" for e in task.train_examples()) and not task.generative
    with pytest.raises(DeftlabError):
        TextTask(source=lambda: texts, n_eval=10).train_examples()


# --- tokenisation: loss on the response only ---------------------------------------------------------------------
def test_labels_mask_the_prompt():
    tok = TinyTokenizer()
    ex = Example(prompt="Q: 2+2?\nA:", response=" 4")
    enc = encode_example(tok, ex, cutoff_len=64)
    p = tok.encode("Q: 2+2?\nA:")  # with BOS
    r = tok.encode(" 4", add_special_tokens=False) + [tok.eos_token_id]
    assert enc["input_ids"] == p + r
    assert enc["labels"] == [IGNORE_INDEX] * len(p) + r  # prompt masked, response + EOS supervised
    cut = encode_example(tok, ex, cutoff_len=len(p) + 1)
    assert cut["labels"] == [IGNORE_INDEX] * len(p) + r[:1]
    assert encode_example(tok, ex, cutoff_len=len(p)) is None  # no response token left → dropped


def test_collator_pads_labels_with_ignore_index():
    batch = PaddingCollator(pad_id=0)([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
                                      {"input_ids": [5], "labels": [5]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [5, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_seeded_batch_sampler_is_deterministic_and_resumable():
    s = SeededBatchSampler(10, 3, seed=7)
    e0 = list(s)
    assert e0 == list(SeededBatchSampler(10, 3, seed=7)) and len(e0) == len(s) == 4
    assert sorted(i for b in e0 for i in b) == list(range(10))
    s.set_epoch(1)
    e1 = list(s)
    assert e1 != e0
    s.resume_at(1, 2)
    assert list(s) == e1[2:]  # skips the batches already trained on, once
    assert list(s) == e1
