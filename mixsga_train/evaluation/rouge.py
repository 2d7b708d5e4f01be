"""ROUGE-L as MiniLLM reports it: rouge_score's rougeL with the Porter stemmer, F-measure x100,
the best reference per example, the mean over examples. (``evaluate.load("rouge")`` needs the Hub.)
"""

from __future__ import annotations

from functools import lru_cache

from rouge_score import rouge_scorer


@lru_cache(maxsize=1)
def _scorer() -> rouge_scorer.RougeScorer:
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, references: list[str]) -> float:
    """ROUGE-L F-measure x100 of one prediction against its best reference, in [0, 100]."""
    if not references:
        raise ValueError("rouge_l needs at least one reference")
    return 100.0 * max(_scorer().score(ref, prediction)["rougeL"].fmeasure for ref in references)


def mean_rouge_l(predictions: list[str], references: list[list[str]]) -> float:
    """Mean of ``rouge_l`` over examples (predictions[i] scored against references[i])."""
    if len(predictions) != len(references) or not predictions:
        raise ValueError(
            f"need as many predictions as reference lists (> 0), got {len(predictions)} and {len(references)}"
        )
    return sum(rouge_l(p, r) for p, r in zip(predictions, references)) / len(predictions)
