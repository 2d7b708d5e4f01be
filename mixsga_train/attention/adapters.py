"""Where each supported model family keeps its decoder layers and how many KV heads it has.

One core converts every family; an adapter only answers these questions. Llama-like families
(Llama 3.x, TinyLlama, SmolLM2, Qwen2, Mistral) and Gemma 2 share one layout; OPT differs in
where its layers live and in having no ``num_key_value_heads`` (it is MHA).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from ..errors import ConfigError


@dataclass(frozen=True)
class FamilyAdapter:
    decoder_layers: Callable[[nn.Module], nn.ModuleList]
    native_kv_heads: Callable[[object], int]

    def attention_modules(self, model: nn.Module) -> list[nn.Module]:
        return [layer.self_attn for layer in self.decoder_layers(model)]


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


_LLAMA_LIKE = FamilyAdapter(
    decoder_layers=lambda model: model.model.layers,
    native_kv_heads=lambda config: config.num_key_value_heads,
)
_OPT = FamilyAdapter(
    decoder_layers=lambda model: model.model.decoder.layers,
    native_kv_heads=lambda config: config.num_attention_heads,
)

ADAPTERS: dict[str, FamilyAdapter] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "opt": _OPT,
}


def adapter_for(config) -> FamilyAdapter:
    """The adapter of a model config, or a ConfigError naming the supported families."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise ConfigError(
            "model",
            f"architecture {model_type!r} is not supported; supported: {', '.join(sorted(ADAPTERS))} "
            "(Llama 3.x, TinyLlama, SmolLM2, Qwen2, Mistral, Gemma 2, OPT)",
        )
    return ADAPTERS[model_type]


def head_dim(config) -> int:
    """Per-head width d_h of any supported family."""
    return _head_dim(config)
