"""Prompt templates, stored byte-exact as constants.

deftlab uses the plain Alpaca template (as printed in the DeFT appendix) for BOTH training and evaluation.
Deliberate deviation from LLM-Adapters (AGI-Edgerunners/LLM-Adapters @ 8166572, anchors §6): there the
prompts come from triple-quoted f-strings inside functions, so they carry 16-space indentation, and the
training and evaluation prompts differ:

- evaluate.py: "request. " (one trailing space), blank lines empty, every other line indented by 16 spaces,
  and the prompt ends with 16 spaces after "### Response:\n";
- finetune.py: "request.  " (two trailing spaces) and the blank line holds 16 spaces.

Training on one and testing on the other is a train/eval mismatch; we keep both LLM-Adapters strings here
as reference fixtures (``LLM_ADAPTERS_*``, selectable with ``prompt_style="llm-adapters"`` on the
arithmetic task) but default to the plain template everywhere.
"""

from __future__ import annotations

# --- Alpaca (plain), DeFT appendix -------------------------------------------------------------------------
ALPACA_HEADER = ("Below is an instruction that describes a task. "
                 "Write a response that appropriately completes the request.")
ALPACA_PROMPT = ALPACA_HEADER + "\n\n### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_INPUT_HEADER = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)
ALPACA_PROMPT_WITH_INPUT = (ALPACA_INPUT_HEADER
                            + "\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")

# --- LLM-Adapters, byte-exact reference fixtures (no-input variants) ---------------------------------------
_IND = " " * 16
LLM_ADAPTERS_EVAL_PROMPT = (
    ALPACA_HEADER + " \n\n"
    + _IND + "### Instruction:\n"
    + _IND + "{instruction}\n\n"
    + _IND + "### Response:\n"
    + _IND
)
LLM_ADAPTERS_TRAIN_PROMPT = (  # the response ({output}) follows directly, with no EOS in the text
    ALPACA_HEADER + "  \n\n"
    + _IND + "### Instruction:\n"
    + _IND + "{instruction}\n"
    + _IND + "\n"
    + _IND + "### Response:\n"
    + _IND
)

# --- XSum: "original text: {text}" / "summary: {summary}" with one newline between --------------------------
# The space after "summary:" belongs to the response, so BPE tokenisers see " word" as in running text.
XSUM_PROMPT = "original text: {document}\nsummary:"
XSUM_RESPONSE = " {summary}"

# Stop strings. "### Instruction" catches the LLM-Adapters #48 failure mode (the model writes a new example and
# the last-number rule then reads a number from it); the header catches a new example that starts without it.
ALPACA_STOPS = ("### Instruction", "Below is an instruction")
XSUM_STOPS = ("\n", "original text:")


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """Plain Alpaca prompt; the with-input variant only when `input` is non-empty (as Alpaca does)."""
    if input:
        return ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return ALPACA_PROMPT.format(instruction=instruction)


def llm_adapters_prompt(instruction: str, stage: str) -> str:
    """LLM-Adapters' indented prompt for `stage` "train" or "eval" (byte-exact, no-input variant)."""
    if stage == "train":
        return LLM_ADAPTERS_TRAIN_PROMPT.format(instruction=instruction)
    if stage == "eval":
        return LLM_ADAPTERS_EVAL_PROMPT.format(instruction=instruction)
    raise ValueError(f"stage must be 'train' or 'eval', got {stage!r}")


def xsum_prompt(document: str) -> str:
    return XSUM_PROMPT.format(document=document)


def xsum_response(summary: str) -> str:
    return XSUM_RESPONSE.format(summary=summary)


def math_prompt(problem: str) -> str:
    """MATH uses the same plain Alpaca template; the response is the worked solution ending in \\boxed{}."""
    return ALPACA_PROMPT.format(instruction=problem)


def math_response(solution: str, answer: str | None = None) -> str:
    """The solution, with "The final answer is $\\boxed{answer}$." appended when it has no \\boxed{}."""
    if "\\boxed" in solution or answer is None:
        return solution
    return f"{solution.rstrip()} The final answer is $\\boxed{{{answer}}}$."
