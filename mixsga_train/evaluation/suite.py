"""Everything a run reports about a model (the ``eval`` block of metrics.json): perplexity under
causal routing (the headline) and under top-k routing (the paper's non-causal protocol), ROUGE-L per
eval set, KV bytes per real token at prefill and at decode, and routing statistics."""

from __future__ import annotations

import torch
from torch import nn

from ..metrics import EvalMetrics, ExpertFractions
from ..models.loading import max_positions
from .generation import generate_and_score
from .kv import KVAccount, measure_generation_kv, native_kv_bytes_per_token, routed_kv_share
from .perplexity import CAUSAL_MODE, evaluate_perplexity, evaluate_response_perplexity
from .rolling import evaluate_rolling_perplexity
from .routing_scope import num_experts

DECODE_TOKENS = 32  # greedy tokens generated after each LM prompt to measure decode-time KV
DECODE_PROMPTS = 8  # LM eval blocks (at most) used as those prompts


def evaluate_lm(
    model: nn.Module, blocks: torch.Tensor, words: int, batch_size: int, labels: torch.Tensor | None = None
) -> EvalMetrics:
    """Token and word perplexity of ``blocks`` [N, L] with causal routing and with top-k routing
    (one pass for models without routers); KV bytes per real token of a greedy ``generate()`` of
    ``DECODE_TOKENS`` tokens after the first ``DECODE_PROMPTS`` blocks (cut so they fit the positions).
    ``labels`` [N, L]: the blocks are rolling windows (``rolling.py``)."""

    def perplexity(routing: str):
        if labels is not None:
            return evaluate_rolling_perplexity(model, blocks, labels, batch_size, routing, words)
        return evaluate_perplexity(model, blocks, batch_size, routing, words)

    topk = perplexity("topk")
    causal = perplexity(CAUSAL_MODE) if num_experts(model) else topk
    prompt_len = max(1, min(blocks.shape[1], max_positions(model.config) - DECODE_TOKENS))
    prompts = blocks[: min(DECODE_PROMPTS, batch_size), :prompt_len]
    kv = measure_generation_kv(model, prompts, max_new_tokens=DECODE_TOKENS)
    routed = num_experts(model)
    return EvalMetrics(
        ppl_causal_routing=causal.ppl,
        ppl=topk.ppl,
        word_ppl_causal_routing=causal.word_ppl,
        word_ppl=topk.word_ppl,
        eval_tokens=topk.tokens,
        **_kv_fields(model, kv),
        kv_share_causal=routed_kv_share(model, causal.expert_fractions),
        expert_fractions=ExpertFractions(
            prefill=topk.expert_fractions,
            decode=kv.decode_expert_fractions if routed else None,
            causal=causal.expert_fractions if routed else None,
        ),
        routing_agreement=topk.agreement,
    )


def evaluate_sft(
    model: nn.Module, tokenizer, test_batches: list[dict], eval_sets: dict, task, batch_size: int, seed: int
) -> EvalMetrics:
    """Response-token perplexity of the test split (both routings) and ROUGE-L of generations
    for every eval set; KV bytes per real token and realised decode fractions come from those generations
    (null with no eval sets: nothing is generated)."""
    topk = evaluate_response_perplexity(model, test_batches, "topk")
    causal = evaluate_response_perplexity(model, test_batches, CAUSAL_MODE) if num_experts(model) else topk
    rouge, prefill, weights, kv = {}, [], [], KVAccount()
    for label, examples in eval_sets.items():
        result = generate_and_score(
            model, tokenizer, examples, task.max_new_tokens, batch_size, task.max_prompt_len, seed=seed
        )
        rouge[label] = result.rouge_l
        kv = kv + result.kv
        weights.append(len(examples))
        prefill.append(result.expert_fractions_prefill)
    routed = num_experts(model)
    return EvalMetrics(
        ppl_causal_routing=causal.ppl,
        ppl=topk.ppl,
        eval_tokens=topk.tokens,
        **_kv_fields(model, kv),
        kv_share_causal=routed_kv_share(model, causal.expert_fractions),
        expert_fractions=ExpertFractions(
            prefill=_weighted_lists(prefill, weights),
            decode=kv.decode_expert_fractions if routed else None,
            causal=causal.expert_fractions if routed else None,
        ),
        routing_agreement=topk.agreement,
        rouge_l=rouge,
    )


def _kv_fields(model: nn.Module, kv: KVAccount) -> dict:
    """The KV fields of an evaluation: bytes per real token at prefill (``kv_bytes_per_token``) and
    at decode, the realised decode KV share (decode bytes / native bytes, expert ids included) and
    how many real decode tokens that was measured on."""
    native = native_kv_bytes_per_token(model.config, next(model.parameters()).dtype)
    decode = kv.decode_bytes_per_token
    return {
        "kv_bytes_per_token": kv.prefill_bytes_per_token,
        "kv_bytes_per_token_decode": decode,
        "kv_share_decode": decode / native if decode is not None else None,
        "decode_tokens": kv.decode_tokens,
    }


def _weighted_lists(values: list, weights: list[int]) -> list[float] | None:
    pairs = [(v, w) for v, w in zip(values, weights) if v is not None]
    if not pairs:
        return None
    total = sum(w for _, w in pairs)
    return [sum(v[i] * w for v, w in pairs) / total for i in range(len(pairs[0][0]))]
