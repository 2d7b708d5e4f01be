"""``convert_model``: turn a pretrained causal LM's attention into a registered method in place;
``converted(model)``: the typed handle on the result.

The weights are kept (mixSGA shares them across experts; GQA mean-pools them; CLA keeps one
K/V projection per layer group); mixSGA adds one router per layer. The resolved configuration
is stored on ``model.config.mixsga`` so ``save_pretrained`` + ``load_converted`` (or
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``) round-trip.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MethodType

import torch
from torch import nn
from transformers.cache_utils import DynamicCache

from .adapters import adapter_for, head_dim
from .cache import KVBudgetCache
from .config import AttentionConfig, ResolvedAttention
from .decode_kernel import DecodeKernelSwitch, enable_decode_kernel
from .methods import ConversionTarget, LayerLayout, MixedLayout
from .methods.base import CacheSwitches
from .persistence import save_with_remote_code
from .routing import RoutingContext, TokenRouter
from .segment_attention import enable_segment_read

HANDLE = "mixsga_converted"  # the one attribute a converted model carries; read it with ``converted(model)``


@dataclass(eq=False)
class ConvertedModel:
    """Everything ``convert_model`` attached to a model, in one typed handle (``converted(model)``).

    attention: the resolved method; context: the routing state its routers and forward hooks share;
    layouts: one ``LayerLayout`` per decoder layer (what ``build_cache`` builds); switches: the
    segment read and the triton decode path (None where not enabled); last_aux_term: alpha * L_aux
    of the last training forward (detached; None before one).
    """

    attention: ResolvedAttention
    context: RoutingContext
    layouts: list[LayerLayout]
    switches: CacheSwitches
    last_aux_term: torch.Tensor | None = None

    @property
    def routers(self) -> list[TokenRouter]:
        """The per-layer routers (empty for methods without routing)."""
        mixed = [layout for layout in self.layouts if isinstance(layout, MixedLayout)]
        return [layout.router for layout in mixed if layout.router is not None]

    @property
    def num_experts(self) -> int:
        """Routed experts per layer (0 without routers)."""
        return self.attention.num_experts

    @property
    def decode_switch(self) -> DecodeKernelSwitch | None:
        """The triton decode path's per-model switch (None unless ``decode_kernel: triton`` took effect)."""
        return self.switches.decode

    def aux_loss(self) -> torch.Tensor | None:
        """Mean over layers of the last forward's eq. 4 losses (the sum in eq. 5 divided by N_layers)."""
        losses = [loss for loss in (r.aux_loss() for r in self.routers) if loss is not None]
        return torch.stack(losses).mean() if losses else None

    def aux_term(self) -> torch.Tensor | None:
        """alpha * aux_loss(), the router term eq. 5 adds to the LM loss (None when alpha is 0 or no router ran)."""
        alpha = self.attention.aux_weight
        aux = self.aux_loss() if alpha else None
        return None if aux is None else alpha * aux

    def build_cache(self) -> KVBudgetCache:
        """A fresh cache with one layer object per decoder layer, each built by its layout."""
        layers = []
        for layout in self.layouts:
            layers.append(layout.cache_layer(layers, self.switches))
        return KVBudgetCache(layers)


def converted(model: nn.Module) -> ConvertedModel | None:
    """The handle ``convert_model`` attached to ``model``; None for a model that was not converted."""
    return model.__dict__.get(HANDLE)


def _handle(model: nn.Module) -> ConvertedModel:
    handle = converted(model)
    if handle is None:
        raise ValueError("model is not converted; call convert_model(model, cfg) first")
    return handle


def resolve_for_model(model: nn.Module, cfg: AttentionConfig) -> ResolvedAttention:
    """Check ``cfg`` against the model's shape without changing anything."""
    adapter = adapter_for(model.config)
    return cfg.resolve(adapter.native_kv_heads(model.config), len(adapter.decoder_layers(model)))


def convert_model(model: nn.Module, cfg: AttentionConfig | ResolvedAttention) -> ResolvedAttention:
    """Convert ``model`` (a supported ``*ForCausalLM``) in place; returns the resolved config.

    Each attention layer is handed to the method's ``convert_layer`` (``methods/``). Afterwards
    ``converted(model)`` is the typed handle on the result, ``model.generate()`` uses a
    ``KVBudgetCache`` by default, ``model.train()`` adds ``alpha * mean_l L_aux`` (eq. 5) to the
    returned loss, and ``routing_context(model)`` selects the routing mode. A model with a mixed
    cache gets the attention implementation ``mixsga_<original>``, which reads the cache expert by
    expert (``segment_attention.py``); with ``decode_kernel: triton`` it becomes
    ``mixsga_triton_<original>`` (see ``decode_kernel.py``).
    """
    if converted(model) is not None:
        raise ValueError("model is already converted")
    resolved = cfg if isinstance(cfg, ResolvedAttention) else resolve_for_model(model, cfg)
    attentions = adapter_for(model.config).attention_modules(model)
    context = resolved.routing_context()
    target = ConversionTarget(attentions, head_dim(model.config), model.config.hidden_size, context)
    layouts = [resolved.convert_layer(attn, layer_idx, target) for layer_idx, attn in enumerate(attentions)]
    read = enable_segment_read(model) if any(isinstance(layout, MixedLayout) for layout in layouts) else None
    switches = CacheSwitches(decode=enable_decode_kernel(model, resolved), read=read)
    model.__dict__[HANDLE] = ConvertedModel(resolved, context, layouts, switches)
    model.config.mixsga = resolved.to_dict()
    model.save_pretrained = MethodType(save_with_remote_code, model)  # a remote-code checkpoint (persistence.py)
    model._prepare_cache_for_generation = MethodType(_prepare_planned_cache, model)
    model.register_forward_pre_hook(_before_forward, with_kwargs=True)
    model.register_forward_hook(_after_forward, with_kwargs=True)
    return resolved


def build_cache(model: nn.Module) -> KVBudgetCache:
    """A fresh cache laid out for the converted ``model`` (one layer object per decoder layer)."""
    return _handle(model).build_cache()


def routing_context(model: nn.Module) -> RoutingContext:
    """The routing state shared by the converted model's routers (mode, stats, fixed ids)."""
    return _handle(model).context


def routers(model: nn.Module) -> list[TokenRouter]:
    """The converted model's per-layer routers (empty for methods without routing)."""
    return _handle(model).routers


def aux_loss(model: nn.Module) -> torch.Tensor | None:
    """Mean over layers of the last forward's eq. 4 losses (the sum in eq. 5 divided by N_layers)."""
    return _handle(model).aux_loss()


def _before_forward(model, args, kwargs):
    """Top-level pre-hook: give the routers the padding mask and decode flag of this call, and
    swap the empty DynamicCache that ``generate()`` creates for this model's KVBudgetCache (also
    built when an inference forward asks for a cache without passing one)."""
    cache_key = "past_key_values" if "past_key_values" in kwargs else "cache"
    cache = kwargs.get(cache_key)
    if type(cache) is DynamicCache and cache.get_seq_length() == 0 and not getattr(cache, "_is_user_defined", False):
        cache = kwargs[cache_key] = build_cache(model)
    elif cache is None and not model.training and _wants_cache(model, kwargs):
        cache = kwargs[cache_key] = build_cache(model)
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    tokens = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
    mask = kwargs.get("attention_mask")
    context = _handle(model).context
    new_tokens = tokens.shape[1] if tokens is not None else None
    context.token_mask = mask[:, -new_tokens:].bool() if mask is not None and mask.dim() == 2 and new_tokens else None
    context.decoding = cache is not None and cache.get_seq_length() > 0
    return args, kwargs


def _prepare_planned_cache(
    model, generation_config, model_kwargs: dict, generation_mode, batch_size: int, max_cache_length: int
):
    """``generate()``'s cache preparation, then its default ``DynamicCache`` replaced by this model's
    ``KVBudgetCache`` planned for ``max_cache_length`` tokens (prompt + new tokens - 1), so its
    buffers are allocated once instead of grown. A cache the caller passed is left alone."""
    type(model)._prepare_cache_for_generation(
        model, generation_config, model_kwargs, generation_mode, batch_size, max_cache_length
    )
    cache = model_kwargs.get("cache")
    if type(cache) is DynamicCache and not getattr(cache, "_is_user_defined", False):
        cache = model_kwargs["cache"] = build_cache(model)
        cache.plan(max_cache_length)


def _wants_cache(model, kwargs) -> bool:
    use_cache = kwargs.get("use_cache")
    return bool(model.config.use_cache if use_cache is None else use_cache)


def _after_forward(model, args, kwargs, output):
    """Top-level hook: in training, add alpha * aux (eq. 5) to the LM loss the model returned."""
    if not model.training or getattr(output, "loss", None) is None:
        return output
    handle = _handle(model)
    term = handle.aux_term()
    if term is not None:
        handle.last_aux_term = term.detach()
        output.loss = output.loss + term
    return output
