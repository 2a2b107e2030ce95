"""Named text corpora for perplexity: wikitext2 (test), c4 (validation sample), arith (training text), generated."""

from __future__ import annotations

from deftlab import data
from deftlab.data.generated import generate_arith
from deftlab.errors import UnknownNameError
from deftlab.tasks.templates import ALPACA_PROMPT

CORPORA = ("wikitext2", "c4", "arith", "generated")


def alpaca_text(record: dict) -> str:
    """An arithmetic record as training text: the Alpaca prompt followed by the response."""
    return ALPACA_PROMPT.format(instruction=record["instruction"]) + record["output"]


def corpus_text(name: str, data_dir=None) -> str:
    """The evaluation string for `name`.

    wikitext2: the standard "\\n\\n".join of the test rows (SVD-LLM/OWL convention; WeLore joins with ' ').
    c4: the validation-sample documents joined with "\\n\\n".
    arith: the arithmetic training set formatted with the Alpaca training template (DeFT's "PPL(Train)").
    """
    if name == "wikitext2":
        return data.load_wikitext2_test(data_dir=data_dir)
    if name == "c4":
        return "\n\n".join(data.load_c4_sample(data_dir=data_dir))
    if name in ("arith", "generated"):
        records = data.load_arith_train(data_dir) if name == "arith" else generate_arith(2000, seed=0)
        return "\n\n".join(alpaca_text(r) for r in records)
    raise UnknownNameError("perplexity corpus", name, CORPORA)
