"""Generation for ROUGE-L: batched, left-padded ``model.generate()``, scored against references,
with the KV bytes per real token measured from each batch's cache (``kv.account_generation``) and
the routing fractions of mixSGA.

Converted models generate through their own ``KVBudgetCache`` under ``auto`` routing: the prompt is
routed by top-k, each new token by the decode policy (argmax in the paper's Fig. 2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..data.instructions import EvalExample, encode_prompt
from .kv import KVAccount, account_generation, stop_token_ids
from .progress import progress
from .rouge import mean_rouge_l
from .routing_scope import evaluating


@dataclass
class GenerationResult:
    """predictions: one decoded response per example (prompt stripped, cut at EOS);
    rouge_l: mean ROUGE-L x100; kv: cache bytes summed over real prompt and generated tokens of
    all batches (no padding, nothing from a row's stop token on); expert_fractions_prefill: share
    of real prompt tokens per expert over all layers (top-k); expert_fractions_decode: realised
    share of real generated tokens per expert, read from the caches. None without routers."""

    predictions: list[str]
    rouge_l: float
    kv: KVAccount
    expert_fractions_prefill: list[float] | None
    expert_fractions_decode: list[float] | None


@torch.no_grad()
def generate_and_score(
    model: nn.Module,
    tokenizer,
    examples: list[EvalExample],
    max_new_tokens: int,
    batch_size: int,
    max_prompt_len: int,
    do_sample: bool = False,
    seed: int = 0,
) -> GenerationResult:
    """Generate a response to every example (greedy unless ``do_sample``; sampling seeded by
    ``seed`` without touching the global RNG) and score it. The tokenizer is not modified; the
    model's training flag and routing state are restored."""
    if not examples:
        raise ValueError("generate_and_score needs at least one example")
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size and max_new_tokens must be positive, got {batch_size} and {max_new_tokens}")
    pad_id, stop_ids = _special_ids(model, tokenizer)
    device = next(model.parameters()).device
    predictions: list[str] = []
    kv = KVAccount()
    devices = [device] if device.type == "cuda" else []
    with evaluating(model, "auto") as stats, torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for start in progress(range(0, len(examples), batch_size), "generation"):
            prompts = [encode_prompt(tokenizer, ex.prompt, max_prompt_len) for ex in examples[start : start + batch_size]]
            input_ids, attention_mask = left_pad(prompts, pad_id)
            out = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=do_sample,
                pad_token_id=pad_id,
                eos_token_id=sorted(stop_ids),
                return_dict_in_generate=True,
            )
            new_tokens = out.sequences[:, input_ids.shape[1] :]
            kv = kv + account_generation(out.cache, attention_mask, new_tokens, stop_ids)
            for row in new_tokens.tolist():
                predictions.append(_decode_until_stop(tokenizer, row, stop_ids))
    return GenerationResult(
        predictions=predictions,
        rouge_l=mean_rouge_l(predictions, [ex.references for ex in examples]),
        kv=kv,
        expert_fractions_prefill=stats.fractions("prefill") if stats is not None else None,
        expert_fractions_decode=kv.decode_expert_fractions if stats is not None else None,
    )


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists -> (input_ids [B, L_max], attention_mask [B, L_max]), padded on the left."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, ids in enumerate(prompts):
        input_ids[i, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask[i, width - len(ids) :] = 1
    return input_ids, attention_mask


def _special_ids(model: nn.Module, tokenizer) -> tuple[int, set[int]]:
    """(pad id: the tokenizer's pad, else EOS; stop ids: the tokenizer's EOS and the model's)."""
    stop = stop_token_ids(model, tokenizer)
    if not stop:
        raise ValueError("neither the tokenizer nor the model defines an EOS token; set tokenizer.eos_token")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return (pad if pad is not None else min(stop)), stop


def _decode_until_stop(tokenizer, ids: list[int], stop_ids: set[int]) -> str:
    """Decode generated ids up to (not including) the first stop token, without special tokens."""
    end = next((i for i, t in enumerate(ids) if t in stop_ids), len(ids))
    return tokenizer.decode(ids[:end], skip_special_tokens=True).strip()
