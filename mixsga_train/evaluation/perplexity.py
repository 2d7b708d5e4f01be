"""Perplexity over non-overlapping token blocks, token- and word-level, under a chosen routing.

mixSGA routing decides what perplexity means: ``topk`` routes each block by progressive top-k over
the whole block (the paper's protocol), ``argmax`` routes every token by its own router scores
(causal, what streaming decoding sees). Other models ignore ``routing``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .routing_scope import evaluating

PPL_ROUTINGS = ("topk", "argmax")


@dataclass
class PerplexityResult:
    """nll_sum: total next-token NLL (nats, fp64); tokens: predicted tokens, N * (L - 1);
    ppl: exp(nll_sum / tokens); word_ppl: exp(nll_sum / words), None without a word count;
    routing: the mode used; agreement: share of top-k routed tokens whose argmax agrees (mixSGA
    under ``topk``, else None); expert_fractions: share of tokens per expert over all layers
    under ``routing`` (mixSGA only, else None)."""

    nll_sum: float
    tokens: int
    ppl: float
    word_ppl: float | None
    routing: str
    agreement: float | None = None
    expert_fractions: list[float] | None = None


@torch.no_grad()
def evaluate_perplexity(
    model: nn.Module, blocks: torch.Tensor, batch_size: int, routing: str = "topk", words: int | None = None
) -> PerplexityResult:
    """Perplexity of ``model`` on ``blocks`` [N, L] (each row predicts its L - 1 next tokens).

    ``words``: whitespace words of the evaluated text (``count_words``), for word-level perplexity.
    Runs in eval mode under ``routing``; the model's training flag and routing state are restored.
    """
    if routing not in PPL_ROUTINGS:
        raise ValueError(f"routing must be one of {PPL_ROUTINGS}, got {routing!r}")
    if blocks.dim() != 2 or blocks.shape[0] == 0 or blocks.shape[1] < 2:
        raise ValueError(f"blocks must be [N >= 1, L >= 2] token ids, got shape {tuple(blocks.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if words is not None and words < 1:
        raise ValueError(f"words must be positive (count_words of the evaluated text), got {words}")
    device = next(model.parameters()).device
    nll = torch.zeros((), dtype=torch.float64)
    with evaluating(model, routing) as stats:
        for start in range(0, blocks.shape[0], batch_size):
            batch = blocks[start : start + batch_size].to(device)
            logits = model(input_ids=batch).logits[:, :-1]
            losses = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten(), reduction="none")
            nll += losses.double().sum().cpu()
    tokens = blocks.shape[0] * (blocks.shape[1] - 1)
    nll_sum = nll.item()
    return PerplexityResult(
        nll_sum=nll_sum,
        tokens=tokens,
        ppl=_exp(nll_sum / tokens),
        word_ppl=_exp(nll_sum / words) if words is not None else None,
        routing=routing,
        agreement=stats.agreement if stats is not None else None,
        expert_fractions=stats.fractions("prefill") if stats is not None else None,
    )


def _exp(x: float) -> float:
    """exp that saturates to inf (an unconverged model's word perplexity can overflow a float)."""
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf
