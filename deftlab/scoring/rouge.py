"""ROUGE for XSum, computed offline with Google's ``rouge_score`` package.

``evaluate.load("rouge")`` wraps the same scorer but needs the hub to fetch the metric script,
so it is not used. Differences from ``evaluate``'s defaults, both deliberate: scores are the
plain mean of per-example F-measures (``evaluate`` reports the median of a bootstrap
resampling of that mean, which is close but random), and ``use_stemmer`` is an explicit
argument (default False, as in ``evaluate``). ``rougeLsum`` splits sentences on newlines.
"""

from __future__ import annotations

from typing import Sequence

from deftlab.errors import DeftlabError

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")


def rouge_scores(
    predictions: Sequence[str],
    references: Sequence[str],
    *,
    use_stemmer: bool = False,
    percent: bool = True,
    rouge_types: Sequence[str] = ROUGE_TYPES,
) -> dict[str, float]:
    """Mean ROUGE F-measure per type over the pairs (×100 when ``percent``)."""
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise DeftlabError(f"{len(predictions)} predictions but {len(references)} references",
                           "pass one prediction per reference")
    if not predictions:
        raise DeftlabError("no predictions to score", "pass at least one prediction/reference pair")
    unknown = [t for t in rouge_types if t not in ROUGE_TYPES]
    if unknown:
        raise DeftlabError(f"unknown ROUGE type(s) {unknown}", f"choose from {', '.join(ROUGE_TYPES)}")
    scorer = rouge_scorer.RougeScorer(list(rouge_types), use_stemmer=use_stemmer)
    totals = dict.fromkeys(rouge_types, 0.0)
    for pred, ref in zip(predictions, references):
        scores = scorer.score(ref, pred)  # rouge_score's order is (target, prediction)
        for t in rouge_types:
            totals[t] += scores[t].fmeasure
    scale = 100.0 if percent else 1.0
    return {t: scale * v / len(predictions) for t, v in totals.items()}
