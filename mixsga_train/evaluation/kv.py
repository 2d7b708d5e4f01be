"""KV-cache accounting: the native bytes per token, the nominal bytes of a converted model, and
the bytes measured from the tensors a real cache holds, per REAL token.

A batched cache holds slots that no user token needs: left padding of short prompts and the
tokens ``generate()`` keeps feeding a row after it emitted EOS. mixSGA stores those in whatever
expert the router picks, GQA at full GQA size, so bytes per *slot* compare methods unfairly.
``slot_kv_bytes`` attributes every byte a cache holds to one slot (b, t); ``account_generation``
sums them over the real prompt tokens (prefill) and the real generated tokens (decode) only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.cache_utils import Cache, CacheLayerMixin

from ..attention import converted
from ..attention.adapters import adapter_for, head_dim
from ..attention.cache import MixedKVLayer, layer_nbytes, routed_token_bytes
from .routing_scope import evaluating


def native_kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    """Bytes one token occupies in the unconverted model's cache: layers * 2 (K, V) * H_kv * d_h * itemsize."""
    heads = adapter_for(config).native_kv_heads(config)
    return config.num_hidden_layers * 2 * heads * head_dim(config) * dtype.itemsize


def nominal_kv_bytes_per_token(model: nn.Module, dtype: torch.dtype | None = None) -> float:
    """What the method promises: kv_budget * native bytes, plus per routed layer a uint8 expert id
    and an int32 slot position when mixSGA has more than one expert. ``dtype`` defaults to the model's."""
    native = native_kv_bytes_per_token(model.config, dtype or model.dtype)
    handle = converted(model)
    if handle is None:
        return float(native)
    id_bytes = len(handle.routers) * routed_token_bytes(handle.num_experts or 1)
    return handle.attention.kv_budget * native + id_bytes


def routed_kv_share(model: nn.Module, fractions: list[float] | None) -> float:
    """The KV share a routing actually spent, as a fraction of the native cache: for mixSGA
    sum_e f_e * kv_heads_e / H_kv over the routed tokens' expert fractions ``fractions`` (pooled
    over layers), plus the per-token id bytes of ``nominal_kv_bytes_per_token``; the static budget
    for GQA / CLA (1.0 unconverted). Perplexity under causal routing reports it, so methods compare
    at the budget their perplexity really used."""
    handle = converted(model)
    if handle is None:
        return 1.0
    attention = handle.attention
    if not fractions or not handle.num_experts:
        return attention.kv_budget
    native = native_kv_bytes_per_token(model.config, model.dtype)
    heads = sum(f * k / attention.native_kv_heads for f, k in zip(fractions, attention.expert_kv_heads))
    return heads + len(handle.routers) * routed_token_bytes(handle.num_experts) / native


def _layer_shape(layer: CacheLayerMixin) -> tuple[int, int]:
    """(batch rows, positions) a cache layer holds; (0, 0) before its first update."""
    if not layer.is_initialized:
        return 0, 0
    if isinstance(layer, MixedKVLayer):
        return layer.batch_size, layer.seq_length
    keys = getattr(layer, "keys", None)
    return (keys.shape[0], keys.shape[-2]) if keys is not None and keys.dim() == 4 else (0, 0)


def _token_bytes(buffer: torch.Tensor) -> int:
    """Bytes of one token in an expert buffer [k_e, B, capacity, d_h]."""
    return buffer.shape[0] * buffer.shape[3] * buffer.element_size()


def _layer_slot_bytes(layer: CacheLayerMixin, batch: int, length: int) -> torch.Tensor:
    """[batch, length] fp64 bytes of one layer per slot; sums to ``layer_nbytes(layer)``.

    mixSGA layers: slot (b, t) holds K and V at its expert's head count (``expert_ids[b, t]``);
    everything else the layer holds (expert ids, slot positions, kernel token slots) is per slot and spread evenly.
    Other layers (GQA's one expert, DynamicLayer, CLA borrowers with 0 bytes) are uniform per slot;
    a sliding-window layer that keeps only the last positions spreads its bytes over those.
    """
    held = float(layer_nbytes(layer))
    rows, positions = _layer_shape(layer)
    slot_bytes = torch.zeros(batch, length, dtype=torch.float64)
    if not held or rows * positions == 0:
        return slot_bytes
    if rows != batch or positions > length:
        raise ValueError(f"cache layer holds {rows}x{positions} slots, the cache {batch}x{length}")
    if isinstance(layer, MixedKVLayer) and layer.expert_ids is not None:
        per_expert = torch.tensor(
            [_token_bytes(k) + _token_bytes(v) for k, v in zip(layer.key_buffers, layer.value_buffers)],
            dtype=torch.float64,
        )
        kv = per_expert[layer.expert_ids.long().cpu()]
        return kv + (held - kv.sum().item()) / (batch * length)
    slot_bytes[:, length - positions :] = held / (batch * positions)
    return slot_bytes


def slot_kv_bytes(cache: Cache) -> torch.Tensor:
    """[B, T] fp64: the bytes each cache slot (row b, position t) holds over all layers.
    Summed over all slots this equals the bytes the cache holds (``layer_nbytes`` of every layer)."""
    shapes = [_layer_shape(layer) for layer in cache.layers]
    batch, length = max(shapes, default=(0, 0))
    total = torch.zeros(batch, length, dtype=torch.float64)
    for layer in cache.layers:
        total += _layer_slot_bytes(layer, batch, length)
    return total


def cache_bytes_per_token(cache: Cache) -> float:
    """Measured bytes per cached token SLOT (padding included) of any cache: total bytes / slots."""
    slots = slot_kv_bytes(cache)
    return slots.mean().item() if slots.numel() else 0.0


@dataclass
class KVAccount:
    """Cache bytes summed over real tokens. prefill_*: the prompts' real tokens (no left padding);
    decode_*: generated tokens a streaming server would store (before each row's first stop token;
    the stop token itself is never fed back); decode_expert_counts: real decode slots per expert,
    summed over mixSGA layers (None without routers). Accounts of several batches add up (``+``)."""

    prefill_bytes: float = 0.0
    prefill_tokens: int = 0
    decode_bytes: float = 0.0
    decode_tokens: int = 0
    decode_expert_counts: list[int] | None = field(default=None)

    def __add__(self, other: KVAccount) -> KVAccount:
        counts = self.decode_expert_counts
        if other.decode_expert_counts is not None:
            theirs = other.decode_expert_counts
            counts = theirs if counts is None else [a + b for a, b in zip(counts, theirs)]
        return KVAccount(
            self.prefill_bytes + other.prefill_bytes,
            self.prefill_tokens + other.prefill_tokens,
            self.decode_bytes + other.decode_bytes,
            self.decode_tokens + other.decode_tokens,
            counts,
        )

    @property
    def prefill_bytes_per_token(self) -> float | None:
        return self.prefill_bytes / self.prefill_tokens if self.prefill_tokens else None

    @property
    def decode_bytes_per_token(self) -> float | None:
        return self.decode_bytes / self.decode_tokens if self.decode_tokens else None

    @property
    def decode_expert_fractions(self) -> list[float] | None:
        if not self.decode_expert_counts or not sum(self.decode_expert_counts):
            return None
        total = sum(self.decode_expert_counts)
        return [c / total for c in self.decode_expert_counts]


def real_slot_masks(attention_mask: torch.Tensor, new_tokens: torch.Tensor, stop_ids: set[int], length: int):
    """(prefill [B, length], decode [B, length]) bool masks of the real slots of a cache that holds
    a left-padded prompt (``attention_mask`` [B, L]) followed by the first ``length - L`` tokens of
    ``new_tokens`` [B, n]: prompt slots where the mask is 1; generated slots before the row's first
    stop token."""
    batch, prompt = attention_mask.shape
    generated = new_tokens[:, : length - prompt].cpu()
    is_stop = torch.zeros_like(generated, dtype=torch.bool)
    for stop in stop_ids:
        is_stop |= generated == stop
    before_stop = is_stop.long().cumsum(dim=1) == 0
    prefill = torch.zeros(batch, length, dtype=torch.bool)
    decode = torch.zeros(batch, length, dtype=torch.bool)
    prefill[:, :prompt] = attention_mask.cpu().bool()
    decode[:, prompt : prompt + generated.shape[1]] = before_stop
    return prefill, decode


def account_generation(
    cache: Cache, attention_mask: torch.Tensor, new_tokens: torch.Tensor, stop_ids: set[int]
) -> KVAccount:
    """The ``KVAccount`` of the cache ``generate()`` returned for a prompt batch (``attention_mask``
    [B, L], left padded) and its generated tokens ``new_tokens`` [B, n]."""
    slots = slot_kv_bytes(cache)
    prefill, decode = real_slot_masks(attention_mask, new_tokens, stop_ids, slots.shape[1])
    counts = None
    for layer in cache.layers:
        if isinstance(layer, MixedKVLayer) and layer.expert_ids is not None:
            ids = layer.expert_ids.long().cpu()[decode]
            layer_counts = torch.bincount(ids, minlength=len(layer.groupings)).tolist()
            counts = layer_counts if counts is None else [a + b for a, b in zip(counts, layer_counts)]
    return KVAccount(
        slots[prefill].sum().item(), int(prefill.sum()), slots[decode].sum().item(), int(decode.sum()), counts
    )


def stop_token_ids(model: nn.Module, tokenizer=None) -> set[int]:
    """The model's configured EOS ids and the tokenizer's (either may be absent)."""
    configured = model.generation_config.eos_token_id
    stop = set(configured if isinstance(configured, list) else [configured])
    if tokenizer is not None:
        stop.add(tokenizer.eos_token_id)
    stop.discard(None)
    return stop


@torch.no_grad()
def measure_kv_bytes_per_token(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> float:
    """Prefill ``input_ids`` [B, L] through ``generate`` (max_new_tokens=1, so the cache holds the
    prompt only; mixSGA routes it by top-k) and measure the cache bytes per real prompt token."""
    return measure_generation_kv(model, input_ids, attention_mask, max_new_tokens=1).prefill_bytes_per_token


@torch.no_grad()
def measure_generation_kv(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, max_new_tokens: int = 32
) -> KVAccount:
    """Greedy ``generate()`` of ``max_new_tokens`` after prompts ``input_ids`` [B, L] (left padded
    where ``attention_mask`` is 0) under ``auto`` routing (mixSGA: top-k prompt, the decode policy
    for new tokens) and the ``KVAccount`` of the cache it returns."""
    device = next(model.parameters()).device
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    with evaluating(model, "auto"):
        out = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            return_dict_in_generate=True,
            pad_token_id=_pad_id(model),
        )
    return account_generation(out.cache, attention_mask, out.sequences[:, input_ids.shape[1] :], stop_token_ids(model))


def _pad_id(model: nn.Module) -> int:
    """Any valid id: generate() wants one; tokens after a row's stop token are not counted."""
    pad = model.generation_config.pad_token_id
    if pad is None:
        pad = model.generation_config.eos_token_id
    if isinstance(pad, list):
        pad = pad[0]
    return 0 if pad is None else pad
