"""mixSGA, GQA and CLA attention for Hugging Face causal LMs (plain torch + transformers)."""

from .budget import feasible_ratios, mixsga_budget, parse_ratio
from .cache import KVBudgetCache
from .config import AttentionConfig, ResolvedAttention
from .convert import aux_loss, build_cache, convert_model, resolve_for_model, routers, routing_context
from .routing import RoutingStats, progressive_topk

__all__ = [
    "AttentionConfig",
    "KVBudgetCache",
    "ResolvedAttention",
    "RoutingStats",
    "aux_loss",
    "build_cache",
    "convert_model",
    "feasible_ratios",
    "mixsga_budget",
    "parse_ratio",
    "progressive_topk",
    "resolve_for_model",
    "routers",
    "routing_context",
]

from .persistence import load_converted, saved_attention  # noqa: E402

__all__ += ["load_converted", "saved_attention"]
