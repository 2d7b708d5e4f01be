"""KV-cache accounting: the native bytes per token, the nominal bytes of a converted model, and
the bytes measured from the tensors a real prefill leaves in the cache."""

from __future__ import annotations

import torch
from torch import nn
from transformers.cache_utils import Cache

from ..attention import routers
from ..attention.adapters import adapter_for, head_dim
from ..attention.cache import KVBudgetCache, dynamic_cache_bytes_per_token, routed_token_bytes
from .routing_scope import evaluating, num_experts


def native_kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    """Bytes one token occupies in the unconverted model's cache: layers * 2 (K, V) * H_kv * d_h * itemsize."""
    heads = adapter_for(config).native_kv_heads(config)
    return config.num_hidden_layers * 2 * heads * head_dim(config) * dtype.itemsize


def nominal_kv_bytes_per_token(model: nn.Module, dtype: torch.dtype | None = None) -> float:
    """What the method promises: kv_budget * native bytes, plus per routed layer a uint8 expert id
    and an int32 slot position when mixSGA has more than one expert. ``dtype`` defaults to the model's."""
    native = native_kv_bytes_per_token(model.config, dtype or model.dtype)
    resolved = getattr(model, "_mixsga_resolved", None)
    if resolved is None:
        return float(native)
    experts = num_experts(model) or 1
    id_bytes = len(routers(model)) * routed_token_bytes(experts)
    return resolved.kv_budget * native + id_bytes


def cache_bytes_per_token(cache: Cache) -> float:
    """Measured bytes per cached token slot (batch rows x positions, padding included) of any cache."""
    if isinstance(cache, KVBudgetCache):
        return cache.kv_bytes_per_token()
    return dynamic_cache_bytes_per_token(cache)


@torch.no_grad()
def measure_kv_bytes_per_token(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> float:
    """Prefill ``input_ids`` [B, L] through ``generate`` (max_new_tokens=1, so the cache holds the
    prompt only; mixSGA routes it by top-k) and measure the bytes per token of the cache it returns."""
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    with evaluating(model, "auto"):
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask.to(device),
            max_new_tokens=1,
            do_sample=False,
            return_dict_in_generate=True,
            pad_token_id=_pad_id(model),
        )
    return cache_bytes_per_token(out.cache)


def _pad_id(model: nn.Module) -> int:
    """Any valid id: generate() wants one, a one-step prefill never uses it."""
    pad = model.generation_config.pad_token_id
    if pad is None:
        pad = model.generation_config.eos_token_id
    if isinstance(pad, list):
        pad = pad[0]
    return 0 if pad is None else pad
