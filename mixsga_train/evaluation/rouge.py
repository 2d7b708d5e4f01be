"""ROUGE-L as MiniLLM reports it: rougeL with the Porter stemmer, F-measure x100, the best
reference per example (``score_multi``), the mean over examples.

Computed by the ``evaluate`` library's ``rouge`` metric when it can be loaded (it lives on the
Hub), otherwise by the same ``rouge_score`` computation that metric wraps: one
``RougeScorer(["rougeL"], use_stemmer=True)``, ``score_multi`` per example, no bootstrap
aggregation (``use_aggregator=False``), so both give the same numbers (tests/test_rouge.py).
"""

from __future__ import annotations

import logging
from functools import lru_cache

from rouge_score import rouge_scorer

log = logging.getLogger(__name__)

ROUGE_TYPE = "rougeL"


@lru_cache(maxsize=1)
def _scorer() -> rouge_scorer.RougeScorer:
    return rouge_scorer.RougeScorer([ROUGE_TYPE], use_stemmer=True)


@lru_cache(maxsize=1)
def hub_metric():
    """``evaluate.load("rouge")``, or None when the Hub (or its cached copy) is not reachable."""
    import evaluate

    try:
        return evaluate.load("rouge")
    except (OSError, ImportError) as err:  # offline (ConnectionError, FileNotFoundError) or a missing extra
        log.info("evaluate's rouge metric is unavailable (%s); using rouge_score directly", type(err).__name__)
        return None


def rouge_l_scores(predictions: list[str], references: list[list[str]]) -> list[float]:
    """ROUGE-L F-measure x100 of each prediction against its best reference, each in [0, 100]."""
    if len(predictions) != len(references) or not predictions:
        raise ValueError(
            f"need as many predictions as reference lists (> 0), got {len(predictions)} and {len(references)}"
        )
    if any(not refs for refs in references):
        raise ValueError("every prediction needs at least one reference")
    metric = hub_metric()
    if metric is not None:
        scores = metric.compute(predictions=predictions, references=[list(r) for r in references],
                                rouge_types=[ROUGE_TYPE], use_stemmer=True, use_aggregator=False)[ROUGE_TYPE]
        return [100.0 * s for s in scores]
    return [100.0 * _scorer().score_multi(refs, pred)[ROUGE_TYPE].fmeasure for pred, refs in zip(predictions, references)]


def rouge_l(prediction: str, references: list[str]) -> float:
    """ROUGE-L F-measure x100 of one prediction against its best reference, in [0, 100]."""
    if not references:
        raise ValueError("rouge_l needs at least one reference")
    return rouge_l_scores([prediction], [references])[0]


def mean_rouge_l(predictions: list[str], references: list[list[str]]) -> float:
    """Mean of ``rouge_l`` over examples (predictions[i] scored against references[i])."""
    scores = rouge_l_scores(predictions, references)
    return sum(scores) / len(scores)
