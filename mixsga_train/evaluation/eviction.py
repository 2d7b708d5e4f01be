"""H2O token eviction stacked on a converted model's budget cache (the paper's Table 3).

H2O (Zhang et al., 2023) keeps the "heavy hitters", the cached tokens that have received the most
attention, plus a window of the most recent tokens, and evicts the rest. Here it compresses a
prompt once after prefill, the protocol of kvpress: the prompt is prefilled into the model's own
cache (mixSGA: every token at its expert's head count; GQA: at the reduced head count), every
layer scores its prompt tokens, keeps ``keep_ratio`` of each sequence's real prompt tokens and
evicts the others from that layer; the continuation (a response scored for perplexity, or
generated tokens for ROUGE-L) then attends to what is left. Stacked on a method at KV budget b,
the prompt's cache holds about ``keep_ratio * b`` of the native bytes, measured per kept token.

Scores follow kvpress's ``ObservedAttentionPress`` (its H2O scorer): the attention a key receives,
summed over the queries and divided by the number of queries that can see it. kvpress itself is not
a dependency: it pins ``transformers<5.3`` and patches transformers' attention functions when
imported. A budget cache keeps one entry per token and layer (its expert id), so the per-head score
is averaged over every query head of the layer and a token is kept or evicted in all its heads.

Supported: GQA and mixSGA (the torch segment read masks the evicted tokens, ``MixedKVLayer.evict``).
CLA shares one cache between layers whose attention differs, and the unconverted model has no
budget cache, so both raise ``EvictionUnsupported`` (convert the native model as GQA at its full
head count, which is exactly the original, to get a native reference).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..attention import build_cache, converted
from ..attention.cache import MixedKVLayer, routed_token_bytes
from ..data.instructions import encode_prompt
from .generation import _decode_until_stop, _special_ids, left_pad
from .kv import native_kv_bytes_per_token
from .rouge import mean_rouge_l
from .routing_scope import evaluating

SUPPORTED = ("gqa", "mixsga")


class EvictionUnsupported(ValueError):
    """H2O eviction was asked of a model whose cache cannot evict per layer."""


def check_supported(model: nn.Module) -> None:
    """Raise ``EvictionUnsupported`` (one line naming the method and the fix) unless H2O can run on ``model``."""
    handle = converted(model)
    method = handle.attention.method if handle is not None else "unconverted"
    if method not in SUPPORTED:
        raise EvictionUnsupported(
            f"H2O eviction needs a per-layer budget cache (attention.method gqa or mixsga), not {method}: "
            "CLA layers share one cache, an unconverted model has none (convert it as GQA at its full KV heads)"
        )
    if handle.attention.decode_kernel != "torch":
        raise EvictionUnsupported("H2O eviction is read by the torch segment read: set attention.decode_kernel=torch")


def h2o_scores(attentions: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """attentions: [B, H, n, n] one layer's attention probabilities over a prompt; token_mask:
    [B, n] bool, False on padding. Returns [B, n] float: for every key, the attention it received
    summed over the real queries and divided by how many real queries see it (kvpress's
    ObservedAttentionPress), averaged over heads; -inf on padding."""
    mask = token_mask.to(attentions.dtype)
    received = (attentions.float() * mask[:, None, :, None]).sum(2).mean(1)  # [B, n]
    seen_by = mask.flip(1).cumsum(1).flip(1)  # real queries at or after each key (causal)
    return (received / seen_by.clamp_min(1)).masked_fill(~token_mask, -math.inf)


def h2o_keep(scores: torch.Tensor, token_mask: torch.Tensor, keep_ratio: float, recent_share: float = 0.5):
    """[B, n] bool: the tokens H2O keeps of each row's real tokens: ``k = ceil(keep_ratio * n_real)``
    (at least 1), of which ``round(recent_share * k)`` are the most recent and the rest the
    highest-scoring older ones (H2O's heavy hitters + recent window, equal halves by default)."""
    if not 0 < keep_ratio <= 1:
        raise ValueError(f"keep_ratio {keep_ratio} is outside (0, 1]")
    keep = torch.zeros_like(token_mask)
    for b in range(scores.shape[0]):
        real = token_mask[b].nonzero().squeeze(1)
        k = max(1, math.ceil(keep_ratio * len(real) - 1e-9))
        recent = min(k, round(recent_share * k))
        keep[b, real[len(real) - recent :]] = True
        older = real[: len(real) - recent]
        heavy = scores[b, older].topk(k - recent).indices
        keep[b, older[heavy]] = True
    return keep


@contextmanager
def eager_attention(model: nn.Module):
    """Run ``model`` with its family's eager attention (so attention probabilities are returned),
    restoring the configured implementation afterwards."""
    from ..attention.segment_attention import register

    config = model.config
    saved = config._attn_implementation
    config._attn_implementation = register("eager")
    try:
        yield
    finally:
        config._attn_implementation = saved


@dataclass
class EvictedPrompt:
    """cache: the budget cache holding the prompt minus its last token, evicted; kept_bytes: bytes
    of the kept tokens' K/V and ids over all layers, per row [B]; native_bytes: what the native cache
    would hold for the same real tokens [B]."""

    cache: object
    kept_bytes: torch.Tensor
    native_bytes: torch.Tensor

    @property
    def kept_share(self) -> float:
        """Kept prompt KV as a share of the native cache over the batch's real prompt tokens."""
        return float(self.kept_bytes.sum() / self.native_bytes.sum().clamp_min(1))


@torch.no_grad()
def prefill_and_evict(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    keep_ratio: float,
    position_ids: torch.Tensor | None = None,
) -> EvictedPrompt:
    """Prefill ``input_ids`` [B, n] (left-padded; ``attention_mask`` [B, n]) into a new budget cache,
    score every layer's tokens by H2O and evict all but ``keep_ratio`` of each row's real tokens.
    Routing follows the model's routing context (``auto``: a prompt by top-k). Callers prefill a
    prompt without its last token, which then arrives with the continuation (as kvpress compresses a
    context and not the question after it). ``position_ids`` [B, n]: as the continuation will count
    them (``generate()`` skips left padding; None: the cache positions). Returns the cache and its bytes."""
    check_supported(model)
    cache = build_cache(model)
    with eager_attention(model):
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            output_attentions=True,
        )
    token_mask = attention_mask.bool()
    kept_bytes = torch.zeros(input_ids.shape[0], dtype=torch.float64)
    for layer, attentions in zip(cache.layers, out.attentions):
        if not isinstance(layer, MixedKVLayer):
            raise EvictionUnsupported(f"cache layer {type(layer).__name__} cannot evict tokens")
        keep = h2o_keep(h2o_scores(attentions, token_mask), token_mask, keep_ratio)
        layer.evict(~keep)
        kept_bytes += _kept_layer_bytes(layer, keep)
    native = native_kv_bytes_per_token(model.config, next(model.parameters()).dtype)
    return EvictedPrompt(cache, kept_bytes, token_mask.sum(1).double() * native)


def _kept_layer_bytes(layer: MixedKVLayer, keep: torch.Tensor) -> torch.Tensor:
    """[B] bytes of the kept tokens in one layer: each at its expert's K/V width, plus its id bytes."""
    per_expert = torch.tensor(
        [
            k.shape[0] * k.shape[3] * k.element_size() + v.shape[0] * v.shape[3] * v.element_size()
            for k, v in zip(layer.key_buffers, layer.value_buffers)
        ],
        dtype=torch.float64,
    )
    ids = layer.expert_ids.long() if layer.expert_ids is not None else torch.zeros_like(keep, dtype=torch.long)
    per_token = per_expert[ids[:, : keep.shape[1]].cpu()] + routed_token_bytes(layer.num_experts)
    return (per_token * keep.cpu()).sum(1)


@torch.no_grad()
def evicted_response_nll(model: nn.Module, batch: dict, keep_ratio: float) -> tuple[float, int, EvictedPrompt]:
    """Response-token NLL with H2O on the prompt, one SFT example at a time (``batch``: input_ids,
    labels, attention_mask [B, L], right-padded, labels -100 outside the response): the prompt
    without its last token is prefilled and evicted, then the last prompt token and the response
    are scored against the evicted cache (every response token sees only the kept prompt tokens).
    Returns (summed NLL, response tokens scored, the evictions' bytes summed over the examples)."""
    nll, tokens = 0.0, 0
    kept, native = [], []
    with evaluating(model, "auto"):
        for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
            length = int(mask.sum())
            start = int((labels[:length] != -100).nonzero()[0])  # the first response token
            context = ids[None, : start - 1]
            evicted = prefill_and_evict(model, context, torch.ones_like(context), keep_ratio)
            logits = model(input_ids=ids[None, start - 1 : length - 1], cache=evicted.cache).logits
            target = ids[start:length]
            nll += float(torch.nn.functional.cross_entropy(logits[0].float(), target, reduction="sum"))
            tokens += len(target)
            kept.append(evicted.kept_bytes)
            native.append(evicted.native_bytes)
    return nll, tokens, EvictedPrompt(None, torch.cat(kept), torch.cat(native))


@torch.no_grad()
def generate_with_eviction(
    model: nn.Module,
    tokenizer,
    examples: list,
    keep_ratio: float,
    max_new_tokens: int,
    batch_size: int,
    max_prompt_len: int,
) -> tuple[list[str], float, EvictedPrompt]:
    """Greedy responses with H2O on each prompt: per left-padded batch, the prompts without their last
    token are prefilled and evicted (``prefill_and_evict``), then ``generate()`` continues from that
    cache (the last prompt token first). Returns (predictions, mean ROUGE-L x100, the evictions' bytes)."""
    pad_id, stop_ids = _special_ids(model, tokenizer)
    predictions, kept, native = [], [], []
    with evaluating(model, "auto"):
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            input_ids, attention_mask = left_pad(
                [encode_prompt(tokenizer, ex.prompt, max_prompt_len) for ex in chunk], pad_id
            )
            context, context_mask = input_ids[:, :-1], attention_mask[:, :-1]
            positions = (context_mask.long().cumsum(-1) - 1).clamp_min(0)  # as generate() counts them
            evicted = prefill_and_evict(model, context, context_mask, keep_ratio, positions)
            out = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                cache=evicted.cache,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad_id,
                eos_token_id=sorted(stop_ids),
                return_dict_in_generate=True,
            )
            for row in out.sequences[:, input_ids.shape[1] :].tolist():
                predictions.append(_decode_until_stop(tokenizer, row, stop_ids))
            kept.append(evicted.kept_bytes)
            native.append(evicted.native_bytes)
    rouge = mean_rouge_l(predictions, [ex.references for ex in examples])
    return predictions, rouge, EvictedPrompt(None, torch.cat(kept), torch.cat(native))
