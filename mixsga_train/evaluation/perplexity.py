"""Perplexity over non-overlapping token blocks, token- and word-level, under a chosen routing.

mixSGA routing decides what perplexity means: ``topk`` routes each block by progressive top-k over
the whole block (the paper's protocol; NOT causal: the expert of token t depends on later tokens, so
the prediction at t sees the future), ``causal`` routes every token in order by the configured decode
policy (what streaming decoding sees; the headline, ``CAUSAL_MODE``), ``argmax`` by each token's own
router scores alone (the paper's eq. 3). Other models ignore ``routing``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..data.text import count_words
from .progress import progress
from .routing_scope import evaluating

# The routing of the headline (causal) perplexity: the configured decode policy applied causally
# to every token, in order (what decoding really uses).
CAUSAL_MODE = "causal"
PPL_ROUTINGS = ("topk", "argmax", CAUSAL_MODE)


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

    ``words``: whitespace words of exactly the scored text (``scored_words``), for word-level perplexity.
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
    batches = [{"input_ids": blocks[i : i + batch_size]} for i in range(0, blocks.shape[0], batch_size)]
    nll_sum, tokens, stats = _sum_nll(model, batches, routing)
    return _result(nll_sum, tokens, words, routing, stats)


@torch.no_grad()
def evaluate_response_perplexity(model: nn.Module, batches: list[dict], routing: str = "topk") -> PerplexityResult:
    """Perplexity over the labelled tokens of padded SFT batches (``input_ids``, ``attention_mask``,
    ``labels`` [B, L], -100 where no loss is taken): the response tokens only."""
    if routing not in PPL_ROUTINGS:
        raise ValueError(f"routing must be one of {PPL_ROUTINGS}, got {routing!r}")
    nll_sum, tokens, stats = _sum_nll(model, batches, routing)
    return _result(nll_sum, tokens, None, routing, stats)


def scored_words(tokenizer, blocks: torch.Tensor) -> int:
    """Whitespace words of the text whose tokens ``evaluate_perplexity`` scores: tokens 1..L-1 of
    every block [N, L] (token 0 is context only). Word perplexity divides the NLL of those
    N * (L - 1) tokens by this count, so numerator and denominator cover the same text."""
    return sum(count_words(tokenizer.decode(row[1:].tolist())) for row in blocks)


def _sum_nll(model: nn.Module, batches: list[dict], routing: str):
    """(total NLL in fp64, predicted tokens, routing stats) of next-token prediction over batches.
    Without ``labels`` every next token counts; with them, only positions whose label is not -100."""
    device = next(model.parameters()).device
    nll = torch.zeros((), dtype=torch.float64)
    tokens = 0
    with evaluating(model, routing) as stats:
        for batch in progress(batches, f"perplexity ({routing})"):
            batch = {k: v.to(device) for k, v in batch.items()}
            targets = batch.pop("labels", batch["input_ids"])[:, 1:]
            logits = model(**batch, use_cache=False).logits[:, :-1]
            losses = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none", ignore_index=-100)
            nll += losses.double().sum().cpu()
            tokens += int((targets != -100).sum())
    return nll.item(), tokens, stats


def _result(nll_sum: float, tokens: int, words: int | None, routing: str, stats) -> PerplexityResult:
    return PerplexityResult(
        nll_sum=nll_sum,
        tokens=tokens,
        ppl=_exp(nll_sum / tokens) if tokens else math.nan,
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
