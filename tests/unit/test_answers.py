"""Answer extraction and equivalence tables (hand-written)."""

from __future__ import annotations

import pytest

from deftlab.errors import DeftlabError
from deftlab.scoring.answers import (
    answer_correct,
    arith_correct,
    choice_correct,
    extract_boxed,
    extract_choice,
    extract_number,
    math_equal,
    normalize_math_answer,
)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The answer is 5.", 5.0),
        ("There are 1,234 apples.", 1234.0),
        ("She pays $12.50 in total.", 12.5),
        ("It drops to -7 degrees.", -7.0),
        ("3 + 4 = 7, then 7 * 2 = 14. The answer is 14", 14.0),  # the LAST number
        ("First 14, then later 3", 3.0),
        ("0.5 of the cake", 0.5),
        ("answer: 5.", 5.0),
        ("I do not know.", None),
        ("", None),
        ("pages 3-4", -4.0),  # LLM-Adapters reads the hyphen as a minus sign; kept
        ("1,000,000 dollars", 1_000_000.0),
    ],
)
def test_extract_number(text, expected):
    assert extract_number(text) == expected


@pytest.mark.parametrize(
    "pred, gold, ok",
    [
        ("The answer is 576.", "576.0", True),
        ("The answer is 576.0004", "576.0", True),  # within 1e-3
        ("The answer is 576.01", "576.0", False),
        ("so 18 in total. The answer is 18", "18", True),
        ("The answer is 1,319.", "1319.0", True),
        ("no idea", "3", False),
        ("The answer is -2", "-2.0", True),
        ("The answer is 1.8333", "1.8333333333333335", True),
    ],
)
def test_arith_correct(pred, gold, ok):
    assert arith_correct(pred, gold) is ok


def test_arith_correct_rejects_letter_gold():
    with pytest.raises(DeftlabError, match="choice_correct"):
        arith_correct("The answer is 3", "B")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The answer is (D).", "D"),
        ("D", "D"),
        ("(C) 12", "C"),
        ("C. 12 km", "C"),
        ("Because the train is faster, the answer is (C).", "C"),  # LLM-Adapters: "B"
        ("A train covers 60 km. So the answer is E", "E"),  # LLM-Adapters: "A"
        ("Answer: B", "B"),
        ("The correct option is (A)", "A"),
        ("Answer Choices: (A) 1 (B) 2 (C) 3. The answer is (B).", "B"),
        ("I think it is B.", "B"),
        ("Because it is large.", None),  # LLM-Adapters: "B"
        ("A train travels far.", None),  # the article, not an option
        ("", None),
    ],
)
def test_extract_choice(text, expected):
    assert extract_choice(text) == expected


def test_choice_correct_and_dispatch():
    assert choice_correct("The answer is (d).", "D") is False  # lowercase letters are not options
    assert choice_correct("The answer is (D).", "d") is True
    assert answer_correct("AQuA", "so the answer is (A)", "A")
    assert answer_correct("gsm8k", "The answer is 72.", "72.0")
    assert not answer_correct("SVAMP", "The answer is 71.", "72.0")
    assert answer_correct("math", "so $x = \\boxed{\\dfrac{1}{2}}$.", "\\frac12")
    with pytest.raises(DeftlabError):
        choice_correct("A", "12")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so $\\boxed{5}$.", "5"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("first \\boxed{1} then \\boxed{x^{2}+1}", "x^{2}+1"),  # the last one
        ("\\fbox{7}", "7"),
        ("the answer is \\boxed 3$", "3"),
        ("\\boxed{\\text{(C)}}", "\\text{(C)}"),
        ("\\boxed{unbalanced", None),
        ("no box here", None),
        (None, None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize(
    "pred, gold",
    [
        ("\\frac12", "\\frac{1}{2}"),
        ("1/2", "\\frac{1}{2}"),
        ("0.5", "\\frac{1}{2}"),
        ("\\dfrac{3}{4}", "\\tfrac34"),
        ("-\\frac{1}{2}", "-0.5"),
        ("\\frac{-1}{2}", "-\\frac{1}{2}"),
        ("x = 3", "3"),
        ("5 \\text{ cm}", "5"),
        ("5\\text{ cm}^2", "5"),
        ("\\text{(C)}", "(C)"),
        ("90^\\circ", "90"),
        ("90^{\\circ}", "90"),
        ("\\$10", "10"),
        ("25\\%", "25"),
        ("10,000", "10000"),
        ("7.", "7"),
        (".5", "0.5"),
        ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})"),
        ("(3, 0.5)", "(3,\\frac12)"),
        ("2 \\sqrt{3}", "2\\sqrt3"),
        ("\\boxed{4}", "4"),
        ("6\\!", "6"),
        ("\\frac{1}{3}", "0.333333333333"),
    ],
)
def test_math_equal_true(pred, gold):
    assert math_equal(pred, gold), (normalize_math_answer(pred), normalize_math_answer(gold))


@pytest.mark.parametrize(
    "pred, gold",
    [
        ("3", "4"),
        ("\\frac{1}{2}", "\\frac{1}{3}"),
        ("0.33", "\\frac{1}{3}"),
        ("(1,2)", "[1,2]"),  # open vs closed interval
        ("(1,2)", "(2,1)"),
        ("(1,2)", "(1,2,3)"),
        ("x^2", "x^3"),
        ("", "0"),
        (None, "1"),
        ("\\text{Devon}", "\\text{Evan}"),
    ],
)
def test_math_equal_false(pred, gold):
    assert not math_equal(pred, gold)


def test_normalize_math_answer_examples():
    assert normalize_math_answer(" \\left( 1, \\dfrac{2}{3} \\right) ") == "(1,\\frac{2}{3})"
    assert normalize_math_answer("k = 12") == "12"
    assert normalize_math_answer("3/4") == "\\frac{3}{4}"
    assert normalize_math_answer("\\text{Devon}") == "Devon"
