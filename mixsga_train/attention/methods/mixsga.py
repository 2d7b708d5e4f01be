"""``mixsga``: a mixture of weight-shared grouped-query experts with different KV head counts; a
learned router per layer sends each token to one expert (Song et al., 2025, eqs. 1-5)."""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import ConfigError
from ..budget import (
    format_ratio,
    mixsga_budget,
    normalise_ratio,
    paper_expert_kv_heads,
    parse_layer_ratios,
    parse_ratio,
)
from ..heads import HeadGrouping
from ..projections import MixedHeadProjection
from ..routing import DECODE_POLICIES, RoutingContext, TokenRouter
from . import register_attention_method
from .base import MixedLayout, ResolvedAttention

ROUTER_GRADS = ("counterfactual", "straight_through", "aux_only")
ROUTERS = ("learned", "random")


@register_attention_method
@dataclass(kw_only=True)
class MixSGAAttention(ResolvedAttention):
    """expert_kv_heads: KV heads per expert, most expensive first; ratio: normalised capacity shares
    (with ``layer_ratios``: their mean over layers, which has the same budget); layer_ratios: one
    normalised ratio per layer, or None (every layer uses ``ratio``); alpha, router_grad,
    decode_policy, sink_tokens, decode_slack, router: see ``AttentionConfig``."""

    method = "mixsga"
    decode_kernel_ready = True

    expert_kv_heads: list[int]
    ratio: list[float]
    layer_ratios: list[list[float]] | None = None
    alpha: float = 1.0
    router_grad: str = "counterfactual"
    decode_policy: str = "budget"
    sink_tokens: int = 1
    decode_slack: float = 4.0
    router: str = "learned"

    @classmethod
    def resolve(cls, cfg, native_kv_heads, num_layers):
        heads = list(cfg.expert_kv_heads) if cfg.expert_kv_heads else paper_expert_kv_heads(native_kv_heads)
        if any(not isinstance(h, int) or not 1 <= h <= native_kv_heads for h in heads):
            raise ConfigError(
                "attention.expert_kv_heads",
                f"{heads} must be integers in [1, {native_kv_heads}] (the model's native KV heads)",
            )
        if sorted(heads, reverse=True) != heads or len(set(heads)) != len(heads):
            raise ConfigError(
                "attention.expert_kv_heads", f"{heads} must be strictly decreasing (most expensive expert first)"
            )
        if len(heads) > 255:
            raise ConfigError("attention.expert_kv_heads", "at most 255 experts (expert ids are stored as uint8)")
        layer_ratios = None
        if cfg.layer_ratios is not None:
            layer_ratios = parse_layer_ratios(cfg.layer_ratios, len(heads), num_layers)
            ratio = [sum(shares) / num_layers for shares in zip(*layer_ratios)]  # budget is linear in the ratio
        else:
            ratio = parse_ratio(cfg.ratio)
        budget = mixsga_budget(ratio, heads, native_kv_heads)
        if cfg.budget is not None and abs(budget - cfg.budget) > 1e-6:
            raise ConfigError(
                "attention.budget",
                f"{cfg.budget} disagrees with {'layer_ratios' if layer_ratios else 'ratio'} "
                f"{format_ratio(ratio)} over experts {heads} ({budget:.4g}); drop budget or change the ratio",
            )
        for key, value, choices in (
            ("router_grad", cfg.router_grad, ROUTER_GRADS),
            ("decode_policy", cfg.decode_policy, DECODE_POLICIES),
            ("router", cfg.router, ROUTERS),
        ):
            if value not in choices:
                raise ConfigError(f"attention.{key}", f"unknown {value!r}; choose one of {', '.join(choices)}")
        if not isinstance(cfg.sink_tokens, int) or cfg.sink_tokens < 0:
            raise ConfigError("attention.sink_tokens", f"{cfg.sink_tokens!r} must be an integer >= 0 (1: token 0)")
        if not cfg.decode_slack >= 1:
            raise ConfigError("attention.decode_slack", f"{cfg.decode_slack!r} must be >= 1 (in upgrades)")
        if cfg.alpha < 0:
            raise ConfigError("attention.alpha", f"{cfg.alpha} is negative; use 0 to disable the aux loss")
        return cls(
            native_kv_heads=native_kv_heads,
            num_layers=num_layers,
            kv_budget=budget,
            expert_kv_heads=heads,
            ratio=normalise_ratio(ratio),
            layer_ratios=layer_ratios,
            alpha=cfg.alpha,
            router_grad=cfg.router_grad,
            decode_policy=cfg.decode_policy,
            sink_tokens=cfg.sink_tokens,
            decode_slack=float(cfg.decode_slack),
            router=cfg.router,
            decode_kernel=cfg.decode_kernel,
        )

    def detail(self) -> str:
        if self.layer_ratios is None:
            return f"{format_ratio([round(r, 6) for r in self.ratio])} over KV heads {self.expert_kv_heads}"
        per_layer = " / ".join(format_ratio([round(r, 4) for r in ratio]) for ratio in self.layer_ratios)
        return f"per-layer ratios {per_layer} over KV heads {self.expert_kv_heads}"

    def layer_ratio(self, layer_idx: int) -> list[float]:
        """The capacity shares of layer ``layer_idx``'s router."""
        return self.ratio if self.layer_ratios is None else self.layer_ratios[layer_idx]

    def routing_context(self) -> RoutingContext:
        return RoutingContext(
            decode_policy=self.decode_policy, sink_tokens=self.sink_tokens, decode_slack=self.decode_slack
        )

    @property
    def num_experts(self) -> int:
        return len(self.expert_kv_heads)

    @property
    def aux_weight(self) -> float:
        return self.alpha

    @property
    def segment_kv_heads(self) -> list[int]:
        return list(self.expert_kv_heads)

    def summary_fields(self) -> dict:
        return {
            "expert_kv_heads": self.segment_kv_heads,
            "ratio": self.ratio,
            "router_grad": self.router_grad,
            "router": self.router,
            "alpha": self.alpha,
        }

    def weights_key(self) -> tuple:
        per_layer = [[round(x, 6) for x in r] for r in self.layer_ratios] if self.layer_ratios else None
        return (*super().weights_key(), self.expert_kv_heads, [round(x, 6) for x in self.ratio], per_layer)

    def convert_layer(self, attn, layer_idx, target):
        groupings = [HeadGrouping(self.native_kv_heads, k) for k in self.expert_kv_heads]
        weight = attn.k_proj.weight
        costs = [k / self.native_kv_heads for k in self.expert_kv_heads]
        router = TokenRouter(
            target.hidden_size,
            self.layer_ratio(layer_idx),
            layer_idx,
            target.context,
            self.router_grad,
            self.router == "random",
            costs=costs,
        )
        attn.router = router.to(device=weight.device, dtype=weight.dtype)
        attn.k_proj = MixedHeadProjection(attn.k_proj, groupings, target.head_dim, attn.router)
        attn.v_proj = MixedHeadProjection(attn.v_proj, groupings, target.head_dim, attn.router)
        return MixedLayout(groupings, attn.router)
