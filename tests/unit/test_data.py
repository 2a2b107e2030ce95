"""Data loaders, hub fallback, generated data and calibration sampling."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from pathlib import Path

import pytest

from deftlab.data import (
    ARITH_TEST_SETS,
    HubSource,
    calibration_texts,
    fingerprint,
    generate_arith,
    generated_text_corpus,
    load_arith_test,
    load_arith_train,
    load_c4_sample,
    load_math,
    load_math500,
    load_wikitext2,
    load_wikitext2_test,
    load_xsum,
    sample_calibration,
)
from deftlab.data import arithmetic, source
from deftlab.errors import DataNotFoundError, DeftlabError, MalformedDataError, UnknownNameError
from deftlab.scoring.answers import extract_number

REPO = Path(__file__).resolve().parents[2]
OFFLINE_FLAGS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "DEFTLAB_OFFLINE")
WIKI_SHA256 = "696cca6b65a171b0a358a4be6732cdfdf2dd6164a32e20fd70e3c13fc4dfae83"


@pytest.fixture
def real_data(monkeypatch) -> Path:
    env = os.environ.get("DEFTLAB_DATA_DIR")
    d = Path(env) if env else REPO.parent / "shared" / "data"
    d = d if d.is_absolute() else Path.cwd() / d
    if not (d / "arith").is_dir():
        pytest.skip("real data directory not available (set DEFTLAB_DATA_DIR)")
    monkeypatch.setenv("DEFTLAB_DATA_DIR", str(d))
    return d


@pytest.fixture
def online(monkeypatch):
    """No data dir from the environment and no offline flags (hub calls go to the injected loader)."""
    monkeypatch.delenv("DEFTLAB_DATA_DIR", raising=False)
    for k in OFFLINE_FLAGS:
        monkeypatch.delenv(k, raising=False)


def write_json(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


ARITH_ROW = {"instruction": "What is 2 + 3?", "input": "", "output": "2 + 3 = 5. The answer is 5.", "answer": "5"}


# ----------------------------------------------------------------------------- real data


EXPECTED_SIZES = {"AddSub": 395, "SingleEq": 508, "MultiArith": 600, "SVAMP": 1000, "gsm8k": 1319, "AQuA": 254,
                  "mawps": 238}


def test_real_arith_test_sets(real_data):
    for name in ARITH_TEST_SETS:
        rows = load_arith_test(name.upper())  # names are case-insensitive
        assert rows.name == name and len(rows) == EXPECTED_SIZES[name]
        assert rows.path == real_data / "arith" / name / "test.json"
        assert all(isinstance(r["answer"], str) and set(r) == {"instruction", "input", "output", "answer"}
                   for r in rows)
    assert load_arith_test("aqua")[0]["answer"] == "A"
    assert load_arith_test("gsm8k")[0]["answer"] == "576.0"


def test_real_arith_train_prefers_math_10k(real_data):
    rows = load_arith_train()
    assert rows.name == "math_10k" and len(rows) == 9919
    assert rows[0]["instruction"].startswith("At the arcade Dave won 11 tickets") and rows[0]["answer"] == "16.0"
    old = load_arith_train(source="math_data")
    assert old.name == "math_data" and len(old) == 3260
    with pytest.raises(UnknownNameError):
        load_arith_train(source="math_50k")


def test_real_text_corpora(real_data):
    wiki = load_wikitext2_test()
    assert hashlib.sha256(wiki.encode("utf-8")).hexdigest() == WIKI_SHA256
    c4 = load_c4_sample(3)
    assert len(c4) == 3 and c4[0].startswith("We offer valet parking")
    assert len(load_c4_sample()) == 2000


def test_real_xsum_and_math(real_data):
    test, val = load_xsum("test"), load_xsum("validation")
    assert len(test) == len(val) == 1000
    assert all(isinstance(r["id"], str) for r in test)
    assert not {r["id"] for r in test} & {r["id"] for r in val}
    m500, m500p = load_math500(), load_math500(original=False)
    assert len(m500) == 500 and m500[0]["answer"] == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert m500p[0]["problem"].startswith("Return your final response within \\boxed{}. ")
    assert m500[0]["type"] == "Precalculus" and m500[0]["level"] == 2
    train = load_math("train")
    assert len(train) == 7500 and all(r["answer"] is not None for r in train)
    assert sum(r["level"] is None for r in train) == 2  # the two "Level ?" problems
    by_id = {r["unique_id"]: r for r in load_math("test")}
    assert len(by_id) == 5000
    # MATH-500 answers equal the \boxed{} of the matching full-test solution
    assert all(by_id[r["unique_id"]]["answer"] == r["answer"] for r in m500)


def test_relative_data_dir_resolves_against_cwd(real_data, monkeypatch):
    monkeypatch.chdir(real_data.parent)
    monkeypatch.setenv("DEFTLAB_DATA_DIR", real_data.name)
    assert len(load_arith_test("mawps")) == 238


# ----------------------------------------------------------------------------- errors


def test_missing_data_dir(online, tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataNotFoundError, match="does not exist.*DEFTLAB_DATA_DIR"):
        load_arith_test("gsm8k", data_dir=missing)
    with pytest.raises(DataNotFoundError, match=re.escape(str(missing))):
        load_wikitext2_test(data_dir=missing)


def test_malformed_json_names_file_and_line(online, tmp_path):
    p = tmp_path / "arith" / "AddSub" / "test.json"
    p.parent.mkdir(parents=True)
    p.write_text('[\n  {"instruction": "x",\n  "output": }\n]', encoding="utf-8")
    with pytest.raises(MalformedDataError, match=r"test\.json: invalid JSON at line 3"):
        load_arith_test("addsub", data_dir=tmp_path)


def test_missing_field_names_record_and_field(online, tmp_path):
    bad = dict(ARITH_ROW)
    del bad["answer"]
    write_json(tmp_path / "arith" / "SVAMP" / "test.json", [ARITH_ROW, bad])
    with pytest.raises(MalformedDataError, match=r"record 1 has no field 'answer'"):
        load_arith_test("svamp", data_dir=tmp_path)


def test_jsonl_errors_name_the_line(online, tmp_path):
    p = tmp_path / "xsum" / "test.jsonl"
    p.parent.mkdir(parents=True)
    good = json.dumps({"document": "d", "summary": "s", "id": 1})
    p.write_text(good + "\n\n" + json.dumps({"document": "d", "id": 2}) + "\n", encoding="utf-8")
    with pytest.raises(MalformedDataError, match=r"record 1 \(line 3\) has no field 'summary'"):
        load_xsum("test", data_dir=tmp_path)
    p.write_text(good + "\n{not json\n", encoding="utf-8")
    with pytest.raises(MalformedDataError, match=r"line 2\): invalid JSON"):
        load_xsum("test", data_dir=tmp_path)


def test_unknown_names():
    with pytest.raises(UnknownNameError, match="gsm8k"):
        load_arith_test("gsm9k")
    with pytest.raises(UnknownNameError):
        load_xsum("dev")
    with pytest.raises(UnknownNameError):
        calibration_texts("imagenet", n=2)


# ----------------------------------------------------------------------------- hub fallback


def test_missing_file_and_failing_hub(online, tmp_path):
    (tmp_path / "arith").mkdir()
    calls = []

    def failing(src: HubSource):
        calls.append(src)
        raise ConnectionError("no network")

    with pytest.raises(DataNotFoundError) as e:
        load_arith_test("gsm8k", data_dir=tmp_path, hub_loader=failing)
    msg = str(e.value)
    assert str(tmp_path / "arith/gsm8k/test.json") in msg and "openai/gsm8k" in msg and "DEFTLAB_DATA_DIR" in msg
    assert "no network" in msg and len(calls) == 1


def test_hub_fallback_returns_converted_rows(online, tmp_path):
    def fake(src: HubSource):
        assert (src.path, src.split, src.configs) == ("openai/gsm8k", "test", ("main",))
        return [src.convert({"question": "Q?", "answer": "3 + 4 = <<3+4=7>>7 apples\n#### 1,007"})]

    rows = load_arith_test("GSM8K", hub_loader=fake)  # no data dir at all
    assert rows.source == "hub:openai/gsm8k" and rows.path is None
    assert rows[0] == {"instruction": "Q?", "input": "", "output": "3 + 4 = 7 apples The answer is 1007.",
                       "answer": "1007"}


def test_hub_module_function_can_be_monkeypatched(online, tmp_path, monkeypatch):
    monkeypatch.setattr(source, "load_from_hub", lambda src: [{"text": "a"}, {"text": ""}, {"text": "b"}])
    assert load_wikitext2("test", data_dir=tmp_path) == "a\n\n\n\nb"


def test_default_hub_loader_fails_fast_when_unreachable(online, monkeypatch):
    monkeypatch.setattr(source, "_hub_reachable", lambda timeout=3.0: "cannot reach huggingface.co:443 (test)")
    with pytest.raises(DataNotFoundError, match="cannot reach huggingface.co"):
        load_xsum("train")


def test_offline_flag_skips_hub(online, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")

    def must_not_run(src):
        raise AssertionError("hub called while offline")

    with pytest.raises(DataNotFoundError, match="EdinburghNLP/xsum"):
        load_xsum("train", data_dir=tmp_path, hub_loader=must_not_run)


def test_no_hub_copy_is_said(online, tmp_path):
    with pytest.raises(DataNotFoundError, match="no official hub copy"):
        load_arith_train(data_dir=tmp_path)
    with pytest.raises(DataNotFoundError, match="no hub copy"):
        load_arith_test("AddSub", data_dir=tmp_path, hub_loader=lambda s: [])


def test_train_auto_falls_back_to_math_data(online, tmp_path):
    write_json(tmp_path / "arith" / "math_data.json", [ARITH_ROW, {**ARITH_ROW, "answer": 7}])
    rows = load_arith_train(data_dir=tmp_path)
    assert rows.name == "math_data" and rows[1]["answer"] == "7"  # numbers become strings
    write_json(tmp_path / "arith" / "math_10k.json", [ARITH_ROW])
    assert load_arith_train(data_dir=tmp_path).name == "math_10k"


def test_wikitext_rows_file_is_joined(online, tmp_path):
    p = tmp_path / "wikitext2" / "test.jsonl"
    p.parent.mkdir()
    p.write_text("\n".join(json.dumps({"text": t}) for t in ["", " = A = \n", "", " b \n"]) + "\n")
    assert load_wikitext2_test(data_dir=tmp_path) == "\n\n = A = \n" + "\n\n" + "\n\n" + " b \n"


def test_real_wikitext_rows_join_to_the_joined_file(real_data, tmp_path, monkeypatch):
    (tmp_path / "wikitext2").mkdir()
    (tmp_path / "wikitext2" / "test.jsonl").symlink_to(real_data / "wikitext2" / "test.jsonl")
    monkeypatch.delenv("DEFTLAB_DATA_DIR")
    text = load_wikitext2_test(data_dir=tmp_path)  # no wiki.test.txt there: rows are joined
    assert hashlib.sha256(text.encode("utf-8")).hexdigest() == WIKI_SHA256


def test_aqua_hub_conversion():
    row = {"question": "Pick one.", "options": ["A)21", "B)22", "C)23", "D)24", "E)25"], "rationale": "Because.",
           "correct": "C"}
    rec = arithmetic._aqua_from_hub(row)
    assert rec["instruction"] == "Pick one. Answer Choices: (A) 21 (B) 22 (C) 23 (D) 24 (E) 25"
    assert rec["answer"] == "C" and rec["output"].endswith("The answer is (C).")


# ----------------------------------------------------------------------------- generated data


def test_generated_is_deterministic_and_correct():
    a, b, c = generate_arith(70, seed=3), generate_arith(70, seed=3), generate_arith(70, seed=4)
    assert a == b and a != c
    for r in a:
        assert set(r) == {"instruction", "input", "output", "answer"} and r["input"] == ""
        assert r["output"].endswith(f"The answer is {r['answer']}.")
        assert extract_number(r["output"]) == float(r["answer"])
        # every "x op y = z" step in the chain of thought is true arithmetic
        steps = re.findall(r"(\d+) ([-+*/]) (\d+) = (\d+)", r["output"])
        assert steps
        for x, op, y, z in steps:
            x, y, z = int(x), int(y), int(z)
            assert {"+": x + y, "-": x - y, "*": x * y, "/": x / y}[op] == z
    ops = {op for r in a for _, op, _, _ in re.findall(r"(\d+) ([-+*/]) (\d+) = (\d+)", r["output"])}
    assert ops == {"+", "-", "*", "/"}
    assert any(r["output"].count("=") == 2 for r in a)  # two-step problems


def test_generated_text_corpus():
    t = generated_text_corpus(500, seed=1)
    assert t == generated_text_corpus(500, seed=1) != generated_text_corpus(500, seed=2)
    assert 500 <= len(t.split()) < 520 and "\n\n" in t


# ----------------------------------------------------------------------------- calibration


def test_sample_calibration_uses_its_own_rng():
    items = [f"text {i}" for i in range(100)]
    random.seed(1)
    first = sample_calibration(items, n=10, seed=5)
    random.seed(2)
    assert sample_calibration(items, n=10, seed=5) == first
    assert sample_calibration(items, n=10, seed=6) != first
    assert len(set(first)) == 10 and set(first) <= set(items)
    with pytest.raises(DeftlabError, match="only 100 available"):
        sample_calibration(items, n=101)


def test_sample_calibration_formats_records():
    recs = generate_arith(20, seed=0)
    texts = sample_calibration(recs, n=3, seed=0)
    assert all("\n" in t and t.split("\n")[0] in {r["instruction"] for r in recs} for t in texts)
    custom = sample_calibration(recs, n=3, seed=0, formatter=lambda r: "### " + r["answer"])
    assert all(t.startswith("### ") for t in custom)
    with pytest.raises(DeftlabError, match="formatter"):
        sample_calibration([{"foo": 1}], n=1)


def test_fingerprint():
    assert fingerprint(["ab", "c"]) != fingerprint(["a", "bc"])
    assert fingerprint(["x"]) == fingerprint(["x"]) != fingerprint(["x", ""])
    assert re.fullmatch(r"[0-9a-f]{64}", fingerprint([]))


def test_calibration_texts_generated(online):
    g = calibration_texts("generated", n=8, seed=1)
    assert len(g) == 8 and g == calibration_texts("generated", n=8, seed=1)
    assert g != calibration_texts("generated", n=8, seed=2)


def test_calibration_texts_real(real_data):
    arith = calibration_texts("arith", n=4, seed=0, formatter=lambda r: "Q: " + r["instruction"])
    assert len(arith) == 4 and all(t.startswith("Q: ") for t in arith)
    windows = calibration_texts("wikitext2", n=3, seed=0, split="test", window_words=50)
    assert len(windows) == 3 and all(len(w.split()) == 50 and w in " ".join(load_wikitext2_test().split())
                                     for w in windows)
    c4 = calibration_texts("c4", n=5, seed=2)
    assert fingerprint(c4) == fingerprint(calibration_texts("c4", n=5, seed=2))
    assert set(c4) <= set(load_c4_sample())
