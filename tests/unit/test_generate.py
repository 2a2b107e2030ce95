"""Batched greedy generation (left padding, KV cache, stop strings) and evaluate_task's files."""

from __future__ import annotations

import json

import pytest
import torch

from deftlab.data.generated import generate_arith
from deftlab.eval.generate import (cut_at_stop, evaluate_sets, evaluate_task, generate, generate_ids,
                                    response_nll)
from deftlab.models.tiny import TinyTokenizer, tiny_llama
from deftlab.tasks.arithmetic import ArithmeticTask
from deftlab.tasks.text import TextTask

PROMPTS = ["What is 2 + 3?", "A much longer prompt about apples and oranges: 4 apples and 7 oranges.", "Hi",
           "Solve: 12 * 7 = ?", "x" * 40]


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    # a larger init scale than the default 0.02, so greedy outputs vary token to token (0.02 repeats one token)
    return tiny_llama(max_position_embeddings=512, initializer_range=0.3)


@pytest.fixture(scope="module")
def tok():
    return TinyTokenizer()


def test_batched_left_padded_greedy_equals_one_by_one(model, tok):
    batched = generate_ids(model, tok, PROMPTS, max_new_tokens=20, batch_size=5, progress=False)
    single = [generate_ids(model, tok, [p], max_new_tokens=20, batch_size=1, progress=False)[0] for p in PROMPTS]
    assert batched == single
    assert len({tuple(x) for x in single}) == len(PROMPTS) and max(len(set(x)) for x in single) > 5
    # negative control: letting rows attend to their padding changes the tokens, so the check above has teeth
    ids = [tok.encode(p) for p in PROMPTS]
    n = max(map(len, ids))
    padded = torch.tensor([[0] * (n - len(x)) + x for x in ids])
    out = model.generate(input_ids=padded, attention_mask=torch.ones_like(padded), max_new_tokens=20,
                         do_sample=False, pad_token_id=0, eos_token_id=2)
    assert out[:, n:].tolist()[2][: len(single[2])] != single[2]


def test_stop_strings_cut_output_and_stop_early(model, tok):
    full = generate(model, tok, [PROMPTS[0]], max_new_tokens=20, progress=False)[0]
    stop = full[6:9]
    assert full.find(stop) == 6  # the stop string first appears at character 6
    ids = generate_ids(model, tok, [PROMPTS[0]], max_new_tokens=20, stop_strings=[stop], progress=False)[0]
    assert len(ids) == 9  # byte tokenizer: one token per character → generation stopped at the stop string
    assert generate(model, tok, [PROMPTS[0]], max_new_tokens=20, stop_strings=[stop], progress=False) == [full[:6]]


def test_cut_at_stop_rules():
    assert cut_at_stop("7. ### Instruction: more", ["### Instruction"]) == "7. "
    assert cut_at_stop("\n\n A summary.\nNext", ["\n"]) == "\n\n A summary."  # leading whitespace is not a stop
    assert cut_at_stop("abc", ["x"]) == "abc"


def test_evaluate_task_writes_predictions_and_metrics(model, tok, tmp_path):
    from deftlab.data.generated import generate_arith

    train, test = generate_arith(20, seed=0), generate_arith(6, seed=1)
    test[0] = dict(train[3])  # one test question also in training → overlap count 1
    task = ArithmeticTask(train_source=lambda: train, test_source=lambda n: test, eval_sets=("generated",))
    m = evaluate_task(model, tok, task, "generated", limit=5, batch_size=2, out_dir=tmp_path, max_new_tokens=8,
                      progress=False)
    lines = [json.loads(x) for x in (tmp_path / "generated.predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 5 and m["n"] == 5 and m["n_overlap"] == 1 and m["n_non_overlap"] == 4
    assert {"question", "gold", "output", "raw_output", "extracted", "correct", "overlaps_train"} <= set(lines[0])
    assert [x["gold"] for x in lines] == [r["answer"] for r in test[:5]] and lines[0]["overlaps_train"]
    saved = json.loads((tmp_path / "generated.metrics.json").read_text())
    assert saved["n"] == 5 and saved["correct"] == sum(x["correct"] for x in lines) and saved["max_new_tokens"] == 8
    allm = evaluate_sets(model, tok, task, tmp_path / "all", limit=2, batch_size=2, max_new_tokens=4, progress=False)
    assert list(allm) == ["generated"] and allm["generated"]["n"] == 2
    assert json.loads((tmp_path / "all" / "metrics.json").read_text())["generated"]["n"] == 2


def test_evaluate_text_task_reports_perplexity(model, tok, tmp_path):
    texts = [f"line {i} of some text" for i in range(6)]
    m = evaluate_task(model, tok, TextTask(source=lambda: texts, n_eval=2), "heldout", batch_size=2,
                      out_dir=tmp_path, cutoff_len=32, progress=False)
    assert m["n"] == 2 and m["perplexity"] > 1
    assert len((tmp_path / "heldout.predictions.jsonl").read_text().splitlines()) == 2
    # token count: each text + EOS, first token (BOS) never predicted
    assert m["tokens"] == sum(len(t) + 1 for t in texts[4:])


def test_beam_search_matches_hf_beam_search_and_ignores_the_stop_criterion(model, tok):
    """num_beams > 1 (LLM-Adapters' 4-beam protocol): same tokens as HF's own beam search on the unpadded prompt,
    batched or one by one, with stop strings applied to the text afterwards rather than per row."""
    ids = tok.encode(PROMPTS[1])
    ref = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=12, do_sample=False, num_beams=4,
                         pad_token_id=0, eos_token_id=2)[0, len(ids):].tolist()
    greedy = generate_ids(model, tok, [PROMPTS[1]], max_new_tokens=12, progress=False)[0]
    beam = generate_ids(model, tok, [PROMPTS[1]], max_new_tokens=12, num_beams=4, progress=False)[0]
    assert beam == ref[: len(beam)] and beam != greedy
    stopped = generate_ids(model, tok, [PROMPTS[1]], max_new_tokens=12, num_beams=4, stop_strings=["x"],
                           progress=False)[0]
    assert stopped == beam
    with pytest.raises(Exception, match="num_beams"):
        generate_ids(model, tok, [PROMPTS[1]], max_new_tokens=4, num_beams=0, progress=False)


def test_answer_nll_is_the_teacher_forced_loss_of_the_reference_answers(model, tok, tmp_path):
    task = ArithmeticTask(eval_sets=("generated",))
    recs = generate_arith(6, seed=1)
    task._test_source = lambda name: recs
    task._train_source = lambda: recs[:2]  # two test questions overlap the training data
    m = evaluate_task(model, tok, task, "generated", out_dir=tmp_path, max_new_tokens=4, cutoff_len=1024,
                      progress=False, answer_nll=True)
    examples = task.eval_examples("generated")
    rows = response_nll(model, tok, examples, cutoff_len=1024, progress=False)
    assert m["answer_nll"] == pytest.approx(sum(r["nll"] for r in rows) / sum(r["tokens"] for r in rows))
    clean = rows[2:]
    assert m["answer_nll_non_overlap"] == pytest.approx(sum(r["nll"] for r in clean) / sum(r["tokens"] for r in clean))
    assert m["answer_nll"] != m["answer_nll_non_overlap"]
    lines = [json.loads(x) for x in (tmp_path / "generated.predictions.jsonl").read_text().splitlines()]
    assert all(line["answer_tokens"] > 0 for line in lines)
    assert "answer_nll" not in evaluate_task(model, tok, task, "generated", out_dir=tmp_path / "b", max_new_tokens=4,
                                             progress=False)
