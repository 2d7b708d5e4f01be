"""The registry of attention methods: ``ATTENTION_METHODS[name]`` is the method's ``ResolvedAttention``
subclass. Register a new one with ``@register_attention_method`` (like transformers'
``ALL_ATTENTION_FUNCTIONS``); the four built-in methods register on import."""

from __future__ import annotations

from .base import ConversionTarget, LayerLayout, MixedLayout, NativeLayout, ResolvedAttention, SharedLayout

ATTENTION_METHODS: dict[str, type[ResolvedAttention]] = {}


def register_attention_method(cls: type[ResolvedAttention]) -> type[ResolvedAttention]:
    """Class decorator: make ``cls`` available as ``attention.method: <cls.method>``."""
    if cls.method in ATTENTION_METHODS and ATTENTION_METHODS[cls.method] is not cls:
        raise ValueError(f"attention method {cls.method!r} is already registered by {ATTENTION_METHODS[cls.method]}")
    ATTENTION_METHODS[cls.method] = cls
    return cls


def resolved_from_saved(stored: dict) -> ResolvedAttention:
    """The resolved attention saved with a converted model (``ResolvedAttention.to_dict()``)."""
    method = stored.get("method")
    if method not in ATTENTION_METHODS:
        raise ValueError(f"saved attention method {method!r} is not registered; known: {', '.join(ATTENTION_METHODS)}")
    return ATTENTION_METHODS[method].from_saved(stored)


from . import cla, gqa, mha, mixsga  # noqa: E402  (each registers itself)

__all__ = [
    "ATTENTION_METHODS",
    "ConversionTarget",
    "LayerLayout",
    "MixedLayout",
    "NativeLayout",
    "ResolvedAttention",
    "SharedLayout",
    "cla",
    "gqa",
    "mha",
    "mixsga",
    "register_attention_method",
    "resolved_from_saved",
]
