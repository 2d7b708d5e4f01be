"""``gqa``: keep ``kv_heads`` of the model's H_kv KV heads, each the mean of a group of native heads
(the uptraining baseline of Ainslie et al., 2023)."""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import ConfigError
from ..budget import gqa_budget, gqa_kv_heads_for_budget
from ..heads import HeadGrouping
from ..projections import PooledHeadProjection
from . import register_attention_method
from .base import MixedLayout, ResolvedAttention


@register_attention_method
@dataclass(kw_only=True)
class GQAAttention(ResolvedAttention):
    """kv_heads: mean-pooled KV heads kept per layer (kv_budget = kv_heads / H_kv)."""

    method = "gqa"
    decode_kernel_ready = True

    kv_heads: int

    @classmethod
    def resolve(cls, cfg, native_kv_heads, num_layers):
        if cfg.kv_heads is not None:
            k = cfg.kv_heads
        else:  # neither given: the paper's baseline, group size 2
            k = gqa_kv_heads_for_budget(cfg.budget if cfg.budget is not None else 0.5, native_kv_heads)
        if not 1 <= k <= native_kv_heads:
            raise ConfigError(
                "attention.kv_heads", f"{k} is not in [1, {native_kv_heads}] (the model's native KV heads)"
            )
        budget = gqa_budget(k, native_kv_heads)
        if cfg.budget is not None and abs(budget - cfg.budget) > 1e-6:
            raise ConfigError(
                "attention.budget", f"{cfg.budget} disagrees with kv_heads={k} ({budget:.4g}); give only one"
            )
        return cls(
            native_kv_heads=native_kv_heads,
            num_layers=num_layers,
            kv_budget=budget,
            kv_heads=k,
            decode_kernel=cfg.decode_kernel,
        )

    @classmethod
    def from_saved(cls, stored):
        if "kv_heads" not in stored:  # saved before the registry: the head count sat in expert_kv_heads
            stored = {**stored, "kv_heads": stored["expert_kv_heads"][0]}
        return super().from_saved(stored)

    def detail(self) -> str:
        return f"{self.kv_heads} mean-pooled KV heads"

    @property
    def segment_kv_heads(self) -> list[int]:
        return [self.kv_heads]

    def weights_key(self) -> tuple:
        return (*super().weights_key(), self.kv_heads)

    def convert_layer(self, attn, layer_idx, target):
        grouping = HeadGrouping(self.native_kv_heads, self.kv_heads)
        attn.k_proj = PooledHeadProjection(attn.k_proj, grouping, target.head_dim)
        attn.v_proj = PooledHeadProjection(attn.v_proj, grouping, target.head_dim)
        return MixedLayout([grouping])
