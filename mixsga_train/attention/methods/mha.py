"""``mha``: leave the model's attention as shipped (the baseline every budget is measured against)."""

from __future__ import annotations

from dataclasses import dataclass

from . import register_attention_method
from .base import NativeLayout, ResolvedAttention


@register_attention_method
@dataclass(kw_only=True)
class MHAAttention(ResolvedAttention):
    """The native attention: every layer keeps its K/V projections and transformers' own cache layer."""

    method = "mha"

    @classmethod
    def resolve(cls, cfg, native_kv_heads, num_layers):
        return cls(
            native_kv_heads=native_kv_heads, num_layers=num_layers, kv_budget=1.0, decode_kernel=cfg.decode_kernel
        )

    def detail(self) -> str:
        return "native"

    def convert_layer(self, attn, layer_idx, target):
        return NativeLayout()
