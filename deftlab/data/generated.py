"""Deterministic synthetic data for tests and the no-data demo.

``generate_arith(n, seed)`` makes arithmetic word problems in LLM-Adapters' record format
(``instruction`` = question, ``input`` = "", ``output`` = worked steps ending "The answer is N.",
``answer`` = str(N)); ``generated_text_corpus`` makes plain English-like text for perplexity
tests. Both use only ``random.Random(seed)``: same arguments → same data, on every platform.
"""

from __future__ import annotations

import random
from typing import Callable

from deftlab.errors import DeftlabError

_NAMES = ("Ava", "Ben", "Chloe", "Dan", "Ella", "Finn", "Grace", "Hugo", "Iris", "Jack", "Lena", "Omar",
          "Priya", "Sam", "Tara", "Yusuf")
_ITEMS = ("apples", "books", "marbles", "pencils", "stickers", "cookies", "shells", "cards", "coins", "stamps",
          "balloons", "toy cars")
_PLACES = ("box", "bag", "basket", "jar", "shelf", "drawer")
_PLURAL = {"box": "boxes", "shelf": "shelves"}  # the rest take "s"

Problem = tuple[str, list[str], int]  # question, steps, answer


def _add(r: random.Random) -> Problem:
    a, b = r.randint(2, 99), r.randint(2, 99)
    name, item = r.choice(_NAMES), r.choice(_ITEMS)
    q = f"{name} has {a} {item}. A friend gives {name} {b} more {item}. How many {item} does {name} have now?"
    return q, [f"{name} starts with {a} {item} and gets {b} more, so {a} + {b} = {a + b}."], a + b


def _sub(r: random.Random) -> Problem:
    a = r.randint(10, 120)
    b = r.randint(1, a - 1)
    name, item, place = r.choice(_NAMES), r.choice(_ITEMS), r.choice(_PLACES)
    q = f"There are {a} {item} in the {place}. {name} takes {b} of them out. How many {item} are left in the {place}?"
    return q, [f"There were {a} {item} and {b} were taken out, so {a} - {b} = {a - b}."], a - b


def _mul(r: random.Random) -> Problem:
    a, b = r.randint(2, 12), r.randint(2, 25)
    name, item, place = r.choice(_NAMES), r.choice(_ITEMS), r.choice(_PLACES)
    places = _PLURAL.get(place, place + "s")
    q = f"{name} fills {a} {places} with {b} {item} each. How many {item} does {name} use in total?"
    return q, [f"Each of the {a} {places} holds {b} {item}, so {a} * {b} = {a * b}."], a * b


def _div(r: random.Random) -> Problem:
    each, groups = r.randint(2, 15), r.randint(2, 12)
    total = each * groups  # built from the quotient so the answer is always a whole number
    name, item = r.choice(_NAMES), r.choice(_ITEMS)
    q = f"{name} shares {total} {item} equally among {groups} friends. How many {item} does each friend get?"
    return q, [f"{total} {item} split among {groups} friends is {total} / {groups} = {each}."], each


def _add_then_mul(r: random.Random) -> Problem:
    a, b, k = r.randint(2, 30), r.randint(2, 30), r.randint(2, 6)
    name, item = r.choice(_NAMES), r.choice(_ITEMS)
    q = (f"{name} buys {a} {item} on Monday and {b} {item} on Tuesday. On Wednesday {name} buys {k} times "
         f"as many as on the first two days together. How many {item} does {name} buy on Wednesday?")
    s = a + b
    return q, [f"On Monday and Tuesday {name} buys {a} + {b} = {s} {item}.",
               f"On Wednesday {name} buys {k} times that, so {k} * {s} = {k * s}."], k * s


def _mul_then_sub(r: random.Random) -> Problem:
    packs, per = r.randint(2, 10), r.randint(3, 12)
    total = packs * per
    used = r.randint(1, total - 1)
    name, item = r.choice(_NAMES), r.choice(_ITEMS)
    q = (f"{name} has {packs} packs of {item} with {per} {item} in each pack. {name} gives away {used} {item}. "
         f"How many {item} does {name} have left?")
    return q, [f"{name} has {packs} * {per} = {total} {item}.",
               f"After giving away {used}, {name} has {total} - {used} = {total - used} {item}."], total - used


def _sub_then_div(r: random.Random) -> Problem:
    groups, each = r.randint(2, 8), r.randint(2, 12)
    kept = r.randint(1, 20)
    total = groups * each + kept
    name, item = r.choice(_NAMES), r.choice(_ITEMS)
    q = (f"{name} has {total} {item}. {name} keeps {kept} and shares the rest equally among {groups} friends. "
         f"How many {item} does each friend get?")
    rest = total - kept
    return q, [f"{name} shares {total} - {kept} = {rest} {item}.",
               f"Each friend gets {rest} / {groups} = {each} {item}."], each


TEMPLATES: dict[str, Callable[[random.Random], Problem]] = {
    "add": _add, "sub": _sub, "mul": _mul, "div": _div,
    "add_mul": _add_then_mul, "mul_sub": _mul_then_sub, "sub_div": _sub_then_div,
}


def generate_arith(n: int, seed: int = 0, kinds: tuple[str, ...] | None = None) -> list[dict[str, str]]:
    """``n`` arithmetic word problems with chain-of-thought answers, deterministic in ``seed``.

    Templates cycle through ``kinds`` (default: all of add, sub, mul, div and three two-step
    kinds) so every kind appears once n ≥ len(kinds); numbers and names come from the seed.
    """
    if n < 0:
        raise DeftlabError(f"n={n} generated problems requested", "pass n >= 0")
    kinds = tuple(kinds) if kinds else tuple(TEMPLATES)
    unknown = [k for k in kinds if k not in TEMPLATES]
    if unknown:
        raise DeftlabError(f"unknown problem kind(s) {unknown}", f"choose from {', '.join(TEMPLATES)}")
    r = random.Random(seed)
    records = []
    for i in range(n):
        question, steps, answer = TEMPLATES[kinds[i % len(kinds)]](r)
        output = " ".join(steps) + f" The answer is {answer}."
        records.append({"instruction": question, "input": "", "output": output, "answer": str(answer)})
    return records


_SUBJECTS = ("The river", "A small village", "The old library", "Our team", "The committee", "A young painter",
             "The museum", "The company", "The garden", "An engineer", "The orchestra", "The island")
_VERBS = ("built", "found", "opened", "described", "visited", "changed", "studied", "painted", "measured",
          "remembered", "celebrated", "designed")
_OBJECTS = ("a new bridge", "the northern road", "several letters", "a quiet harbour", "the first report",
            "an unusual map", "the winter festival", "a stone tower", "the market square", "two small boats")
_TAILS = ("in the spring", "after the storm", "during the long war", "before the election", "with great care",
          "for the first time", "in 1894", "near the coast", "at the end of the season", "without any help")


def generated_text_corpus(n_tokens_approx: int, seed: int = 0) -> str:
    """English-like text of about ``n_tokens_approx`` whitespace-separated words, in paragraphs
    separated by blank lines (like WikiText), deterministic in ``seed``."""
    if n_tokens_approx < 0:
        raise DeftlabError(f"n_tokens_approx={n_tokens_approx}", "pass a non-negative word count")
    r = random.Random(seed)
    paragraphs, words, para = [], 0, []
    while words < n_tokens_approx:
        sentence = f"{r.choice(_SUBJECTS)} {r.choice(_VERBS)} {r.choice(_OBJECTS)} {r.choice(_TAILS)}."
        para.append(sentence)
        words += len(sentence.split())
        if len(para) >= r.randint(3, 7):
            paragraphs.append(" ".join(para))
            para = []
    if para:
        paragraphs.append(" ".join(para))
    return "\n\n".join(paragraphs)
