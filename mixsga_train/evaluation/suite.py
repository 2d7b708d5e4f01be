"""Everything a run reports about a model: perplexity under both routings, ROUGE-L per eval
set, measured KV bytes per token and routing statistics (the ``eval`` block of metrics.json)."""

from __future__ import annotations

import torch
from torch import nn

from .generation import generate_and_score
from .kv import measure_kv_bytes_per_token
from .perplexity import evaluate_perplexity, evaluate_response_perplexity
from .rolling import evaluate_rolling_perplexity
from .routing_scope import num_experts


def evaluate_lm(model: nn.Module, blocks: torch.Tensor, words: int, batch_size: int,
                labels: torch.Tensor | None = None) -> dict:
    """Token and word perplexity of ``blocks`` [N, L] with top-k routing (the paper's protocol)
    and with causal argmax routing (the same pass for models without routers); KV bytes measured
    from a one-block prefill. ``labels`` [N, L]: the blocks are rolling windows (``rolling.py``)."""
    def perplexity(routing: str):
        if labels is not None:
            return evaluate_rolling_perplexity(model, blocks, labels, batch_size, routing, words)
        return evaluate_perplexity(model, blocks, batch_size, routing, words)

    topk = perplexity("topk")
    causal = perplexity("argmax") if num_experts(model) else topk
    return {
        "ppl": topk.ppl,
        "ppl_causal_routing": causal.ppl,
        "word_ppl": topk.word_ppl,
        "word_ppl_causal_routing": causal.word_ppl,
        "eval_tokens": topk.tokens,
        "kv_bytes_per_token": measure_kv_bytes_per_token(model, blocks[:1]),
        "expert_fractions": {"prefill": topk.expert_fractions, "decode": causal.expert_fractions},
        "routing_agreement": topk.agreement,
        "rouge_l": {},
    }


def evaluate_sft(model: nn.Module, tokenizer, test_batches: list[dict], eval_sets: dict, task, batch_size: int, seed: int) -> dict:
    """Response-token perplexity of the test split (both routings) and ROUGE-L of generations
    for every eval set; KV bytes and decode-time expert fractions come from those generations."""
    topk = evaluate_response_perplexity(model, test_batches, "topk")
    causal = evaluate_response_perplexity(model, test_batches, "argmax") if num_experts(model) else topk
    rouge, kv, prefill, decode, weights = {}, [], [], [], []
    for label, examples in eval_sets.items():
        result = generate_and_score(model, tokenizer, examples, task.max_new_tokens, batch_size, task.max_prompt_len, seed=seed)
        rouge[label] = result.rouge_l
        kv.append(result.kv_bytes_per_token)
        weights.append(len(examples))
        prefill.append(result.expert_fractions_prefill)
        decode.append(result.expert_fractions_decode)
    return {
        "ppl": topk.ppl,
        "ppl_causal_routing": causal.ppl,
        "word_ppl": None,
        "eval_tokens": topk.tokens,
        "kv_bytes_per_token": _weighted(kv, weights),
        "expert_fractions": {"prefill": _weighted_lists(prefill, weights), "decode": _weighted_lists(decode, weights)},
        "routing_agreement": topk.agreement,
        "rouge_l": rouge,
    }


def _weighted(values: list[float], weights: list[int]) -> float | None:
    return sum(v * w for v, w in zip(values, weights)) / sum(weights) if values else None


def _weighted_lists(values: list, weights: list[int]) -> list[float] | None:
    pairs = [(v, w) for v, w in zip(values, weights) if v is not None]
    if not pairs:
        return None
    total = sum(w for _, w in pairs)
    return [sum(v[i] * w for v, w in pairs) / total for i in range(len(pairs[0][0]))]
