"""Answer extraction and correctness for the arithmetic benchmarks, AQuA and MATH.

Arithmetic (AddSub, SingleEq, MultiArith, SVAMP, GSM8K, MAWPS) follows LLM-Adapters'
``extract_answer_number`` exactly: drop commas, find ``-?\\d+\\.?\\d*``, take the LAST match,
correct iff ``|label - pred| <= 0.001``. AQuA uses a safer letter rule than LLM-Adapters (see
``extract_choice``). MATH uses a hendrycks/PRM800K-style normaliser written for deftlab.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

from deftlab.errors import DeftlabError

# ----------------------------------------------------------------------------- arithmetic

_NUMBER = re.compile(r"-?\d+\.?\d*")


def extract_number(text: str) -> float | None:
    """The last number in ``text`` (LLM-Adapters rule), or None when there is none.

    - Commas are removed first, so "1,000" is 1000 (and "3,4" becomes 34, as in LLM-Adapters).
    - "$" and other symbols are ignored because the pattern only matches digits: "$5" → 5.
    - A trailing sentence period is harmless: "The answer is 5." matches "5." → 5.0.
    - A hyphen directly before digits is read as a minus sign ("pages 3-4" → -4), as in LLM-Adapters.
    - None replaces LLM-Adapters' ``float('inf')`` for "no number"; it is never correct.
    """
    matches = _NUMBER.findall(text.replace(",", ""))
    if not matches:
        return None
    return float(matches[-1])


def _gold_number(answer: str | float | int) -> float:
    try:
        return float(str(answer).replace(",", ""))
    except ValueError:
        raise DeftlabError(
            f"gold answer {answer!r} is not a number", "score multiple-choice sets (AQuA) with choice_correct"
        ) from None


def arith_correct(pred_text: str, answer: str | float | int, tol: float = 1e-3) -> bool:
    """True when the last number of ``pred_text`` is within ``tol`` of the numeric gold ``answer``."""
    gold = _gold_number(answer)
    pred = extract_number(pred_text)
    return pred is not None and abs(gold - pred) <= tol


# ----------------------------------------------------------------------------- AQuA

# "answer is (C)", "answer: C", "Answer is option C", "correct option is (C)", "answer choice is C"
_CHOICE_ANSWER = re.compile(
    r"(?:answer|option|choice)\s*(?:is|:|=)?\s*(?:option|choice)?\s*(?:is|:)?\s*\(?\s*([A-E])\s*\)?(?![A-Za-z])",
    re.IGNORECASE,
)
_CHOICE_PAREN = re.compile(r"\(([A-E])\)")
_CHOICE_LEADING = re.compile(r"^\s*\(?([A-E])(?:[).:]|$|\s+(?![a-z]))")
# A standalone capital letter; "A" followed by a lowercase word is the article, not a choice.
_CHOICE_STANDALONE = re.compile(r"(?<![A-Za-z])([B-E]|A(?!\s+[a-z]))(?![A-Za-z'])")


def extract_choice(text: str) -> str | None:
    """The option letter A–E that ``text`` answers with, or None.

    Rules, first that matches wins:
    1. the first "answer/option/choice (is|:) (X)" phrase (the letter must be a capital A–E);
    2. the text starting with a letter: "C", "(C) 12", "C. 12";
    3. the first parenthesised letter "(X)";
    4. the first standalone capital B–E, or A not followed by a lowercase word (the article).

    Deviation from LLM-Adapters, which takes the first A–E character anywhere: there "Because…"
    gives "B" and "A train…" gives "A". On ordinary outputs ("The answer is (D).", "D", "(D)")
    both rules agree; on prose with capitals before the answer this one finds the stated answer.
    """
    for m in _CHOICE_ANSWER.finditer(text):
        letter = m.group(1)
        if letter.isupper():
            return letter
    for pattern in (_CHOICE_LEADING, _CHOICE_PAREN, _CHOICE_STANDALONE):
        m = pattern.search(text)
        if m:
            return m.group(1)
    return None


def choice_correct(pred_text: str, answer: str) -> bool:
    """True when the extracted option letter equals the gold letter."""
    gold = str(answer).strip().upper()
    if gold not in ("A", "B", "C", "D", "E"):
        raise DeftlabError(
            f"gold answer {answer!r} is not an option letter A-E", "score numeric sets with arith_correct"
        )
    return extract_choice(pred_text) == gold


def answer_correct(dataset: str, pred_text: str, answer: str) -> bool:
    """Dispatch by dataset name: AQuA → ``choice_correct``, MATH/MATH-500 → ``math_equal`` on the
    last \\boxed{} answer, every other arithmetic set → ``arith_correct``."""
    key = dataset.lower()
    if key == "aqua":
        return choice_correct(pred_text, answer)
    if key in ("math", "math500", "math-500"):
        return math_equal(extract_boxed(pred_text), answer)
    return arith_correct(pred_text, answer)


# ----------------------------------------------------------------------------- MATH


def _braced(text: str, start: int) -> tuple[str, int] | None:
    """Content of the brace group opening at ``text[start] == '{'`` and the index after it."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i], i + 1
    return None


def extract_boxed(text: str | None) -> str | None:
    """Content of the last ``\\boxed{...}`` or ``\\fbox{...}`` (balanced braces), or None.

    The brace-less form ``\\boxed 5`` (used in some MATH solutions) yields the token after it.
    """
    if not text:
        return None
    starts = [m for m in re.finditer(r"\\(?:boxed|fbox)\s*", text)]
    for m in reversed(starts):
        j = m.end()
        if j < len(text) and text[j] == "{":
            got = _braced(text, j)
            if got is not None:
                return got[0]
        elif j > m.start() + len("\\boxed") and j < len(text):  # "\boxed 5": whitespace then a token
            tok = re.match(r"[^\s$]+", text[j:])
            if tok:
                return tok.group(0)
    return None


def _unwrap_command(s: str, command: str) -> str:
    """Replace every ``\\command{X}`` by ``X`` (balanced braces)."""
    out, i, tag = [], 0, "\\" + command + "{"
    while True:
        k = s.find(tag, i)
        if k < 0:
            out.append(s[i:])
            return "".join(out)
        got = _braced(s, k + len(tag) - 1)
        if got is None:
            out.append(s[i:])
            return "".join(out)
        out.append(s[i:k])
        out.append(got[0])
        i = got[1]


def _fix_fracs(s: str) -> str:
    r"""``\frac12`` → ``\frac{1}{2}``, ``\frac1{b}`` → ``\frac{1}{b}``, ``\frac{a}b`` → ``\frac{a}{b}``."""
    parts = s.split("\\frac")
    out = parts[0]
    for p in parts[1:]:
        args = []
        rest = p
        for _ in range(2):
            if rest.startswith("{"):
                got = _braced(rest, 0)
                if got is None:
                    break
                args.append(got[0])
                rest = rest[got[1]:]
            elif rest:
                args.append(rest[0])
                rest = rest[1:]
        if len(args) == 2:
            out += "\\frac{" + args[0] + "}{" + args[1] + "}" + rest
        else:
            out += "\\frac" + p
    return out


def _fix_sqrt(s: str) -> str:
    r"""``\sqrt2`` → ``\sqrt{2}``."""
    return re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s)


_UNIT_TEXT = re.compile(r"^(.*?[\d}])\s*\\(?:text|mbox|mathrm)\{\s*[A-Za-z][^{}]*\}(\^\{?\d\}?)?$")


def normalize_math_answer(s: str | None) -> str | None:
    r"""Canonical string form of a MATH answer, for string comparison.

    Removes: whitespace, ``\left``/``\right``, ``\!`` and other spacing commands, ``^\circ``,
    dollar signs, ``\%``, trailing units written as ``\text{...}`` after a number, a trailing
    period, a leading ``x =`` (short left-hand side), ``\displaystyle``; unwraps ``\boxed{}``,
    ``\text{}``; maps ``\dfrac``/``\tfrac`` → ``\frac``, ``\frac12`` → ``\frac{1}{2}``,
    ``a/b`` (integers) → ``\frac{a}{b}``, ``.5`` → ``0.5``, ``1,000`` → ``1000``.
    """
    if s is None:
        return None
    s = str(s).strip()
    boxed = extract_boxed(s)
    if boxed is not None:
        s = boxed
    s = s.replace("\n", " ").replace("\\displaystyle", "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = s.replace("\\left", "").replace("\\right", "")
    for sp in ("\\!", "\\,", "\\;", "\\:", "\\ ", "\\quad", "\\qquad"):
        s = s.replace(sp, " ")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "").replace("\\circ", "")
    s = s.replace("\\$", "").replace("$", "")
    s = s.replace("\\%", "").replace("%", "")
    s = s.strip()
    m = _UNIT_TEXT.match(s)
    if m:  # "5 \text{ cm}^2" → "5"
        s = m.group(1)
    for cmd in ("text", "textbf", "mbox", "mathrm", "boxed"):
        s = _unwrap_command(s, cmd)
    s = s.strip().rstrip(".").strip()
    # "x = 5", "k=3": drop a left-hand side of at most two characters (as hendrycks' normaliser).
    if s.count("=") == 1:
        lhs, rhs = s.split("=")
        if len(lhs.strip()) <= 2 and rhs.strip():
            s = rhs
    s = s.replace(" ", "")
    s = _fix_sqrt(_fix_fracs(s))
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    if re.fullmatch(r"-?\d+/\d+", s):
        a, b = s.split("/")
        sign = "-" if a.startswith("-") else ""
        s = f"{sign}\\frac{{{a.lstrip('-')}}}{{{b}}}"
    s = re.sub(r"(^|[^\d])\.(\d)", r"\g<1>0.\2", s)  # ".5" → "0.5"
    if s.startswith("+"):
        s = s[1:]
    return s


_FRAC = re.compile(r"(-?)\\frac\{(-?\d+(?:\.\d+)?)\}\{(-?\d+(?:\.\d+)?)\}")


def _as_number(s: str) -> float | None:
    """Value of a normalised plain number or simple fraction (``3``, ``-0.5``, ``\\frac{1}{2}``, ``-\\frac{3}{4}``)."""
    if re.fullmatch(r"-?\d+(\.\d+)?", s):
        return float(s)
    m = _FRAC.fullmatch(s)
    if m:
        num, den = float(m.group(2)), float(m.group(3))
        if den == 0:
            return None
        v = num / den
        return -v if m.group(1) else v
    m = re.fullmatch(r"(-?\d+)\\frac\{(\d+)\}\{(\d+)\}", s)  # mixed number "2\frac{1}{3}"
    if m and int(m.group(3)) != 0:
        whole = abs(int(m.group(1)))
        v = float(whole + Fraction(int(m.group(2)), int(m.group(3))))
        return -v if m.group(1).startswith("-") else v
    return None


def _split_top_level(s: str) -> list[str] | None:
    """Items of a tuple/list/interval ``(a,b)``/``[a,b)``/``a,b``, split at top-level commas."""
    body = s
    if len(s) >= 2 and s[0] in "([{" and s[-1] in ")]}":
        body = s[1:-1]
    items, depth, cur = [], 0, ""
    for ch in body:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            items.append(cur)
            cur = ""
        else:
            cur += ch
    items.append(cur)
    return items if len(items) > 1 else None


def math_equal(pred: str | None, gold: str | None, rel_tol: float = 1e-6) -> bool:
    """True when ``pred`` and ``gold`` are the same MATH answer.

    Equal after ``normalize_math_answer``; or both simple numbers/fractions with the same value
    (``0.5`` = ``\\frac{1}{2}`` = ``1/2``); or tuples/intervals with the same brackets whose items
    are pairwise equal in order.
    """
    a, b = normalize_math_answer(pred), normalize_math_answer(gold)
    if a is None or b is None or a == "" or b == "":
        return False
    if a == b:
        return True
    x, y = _as_number(a), _as_number(b)
    if x is not None and y is not None:
        return math.isclose(x, y, rel_tol=rel_tol, abs_tol=1e-9)
    ia, ib = _split_top_level(a), _split_top_level(b)
    if ia is not None and ib is not None and len(ia) == len(ib):
        same_brackets = (a[0], a[-1]) == (b[0], b[-1]) if a[0] in "([{" or b[0] in "([{" else True
        return same_brackets and all(math_equal(p, q, rel_tol) for p, q in zip(ia, ib))
    return False
