"""``cla``: cross-layer attention (Brandon et al., 2024): consecutive layers share one K/V projection
and cache; ``kv_budget`` is the fraction of layers that own K/V."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...errors import ConfigError
from ..budget import cla_budget, cla_sharing_groups
from ..heads import HeadGrouping
from ..projections import SharedKVBorrower, SharedKVOwner
from . import register_attention_method
from .base import MixedLayout, ResolvedAttention, SharedLayout

CLA_INITS = ("first", "mean")


@register_attention_method
@dataclass(kw_only=True)
class CLAAttention(ResolvedAttention):
    """cla_groups: layer indices sharing one K/V (the first owns it); cla_init: the shared projection
    starts as the group's ``first`` layer's or the ``mean`` of the group's."""

    method = "cla"

    cla_groups: list[list[int]]
    cla_init: str = "first"

    @classmethod
    def resolve(cls, cfg, native_kv_heads, num_layers):
        if cfg.budget is None:
            raise ConfigError("attention.budget", "CLA needs a budget (fraction of layers that own K/V), e.g. 0.5")
        if cfg.cla_init not in CLA_INITS:
            raise ConfigError("attention.cla_init", f"unknown {cfg.cla_init!r}; choose one of {', '.join(CLA_INITS)}")
        groups = cla_sharing_groups(num_layers, cfg.budget)
        return cls(
            native_kv_heads=native_kv_heads,
            num_layers=num_layers,
            kv_budget=cla_budget(groups),
            cla_groups=groups,
            cla_init=cfg.cla_init,
            decode_kernel=cfg.decode_kernel,
        )

    def detail(self) -> str:
        return f"{len(self.cla_groups)} K/V owners for {self.num_layers} layers"

    def weights_key(self) -> tuple:
        return (*super().weights_key(), self.cla_groups)

    def convert_layer(self, attn, layer_idx, target):
        group = next(g for g in self.cla_groups if layer_idx in g)
        owner_idx = group[0]
        if layer_idx == owner_idx:
            for name in ("k_proj", "v_proj"):
                weight, bias = _initial_projection([getattr(target.attentions[i], name) for i in group], self.cla_init)
                setattr(attn, name, SharedKVOwner(weight, bias, borrowers=len(group) - 1))
            # one native-size expert: the cache's in-place buffers
            return MixedLayout([HeadGrouping(self.native_kv_heads, self.native_kv_heads)])
        owner = target.attentions[owner_idx]
        attn.k_proj = SharedKVBorrower(owner.k_proj, owner_idx)
        attn.v_proj = SharedKVBorrower(owner.v_proj, owner_idx)
        return SharedLayout(owner_idx)


@torch.no_grad()
def _initial_projection(linears: list[nn.Linear], init: str):
    """(weight, bias) of the group's shared projection: the first layer's, or the mean over the group."""
    if init == "first":
        first = linears[0]
        return first.weight.data, None if first.bias is None else first.bias.data
    weight = torch.stack([lin.weight.data for lin in linears]).mean(0)
    bias = None if linears[0].bias is None else torch.stack([lin.bias.data for lin in linears]).mean(0)
    return weight, bias
