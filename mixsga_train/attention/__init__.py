"""mixSGA, GQA and CLA attention for Hugging Face causal LMs (plain torch + transformers); each method
is one registered module under ``methods/``."""

from .budget import feasible_ratios, mixsga_budget, parse_ratio
from .cache import KVBudgetCache
from .config import AttentionConfig, ResolvedAttention
from .convert import (
    ConvertedModel,
    aux_loss,
    build_cache,
    convert_model,
    converted,
    resolve_for_model,
    routers,
    routing_context,
)
from .methods import ATTENTION_METHODS, register_attention_method
from .routing import RoutingStats, progressive_topk

__all__ = [
    "ATTENTION_METHODS",
    "AttentionConfig",
    "ConvertedModel",
    "KVBudgetCache",
    "ResolvedAttention",
    "RoutingStats",
    "aux_loss",
    "build_cache",
    "convert_model",
    "converted",
    "feasible_ratios",
    "mixsga_budget",
    "parse_ratio",
    "progressive_topk",
    "register_attention_method",
    "resolve_for_model",
    "routers",
    "routing_context",
]

from .calibration import calibrate_decode_thresholds  # noqa: E402
from .persistence import load_converted, saved_attention  # noqa: E402

__all__ += ["calibrate_decode_thresholds", "load_converted", "saved_attention"]
