"""``convert_model``: turn a pretrained causal LM's attention into mixSGA, GQA or CLA in place.

The weights are kept (mixSGA shares them across experts; GQA mean-pools them; CLA keeps one
K/V projection per layer group); mixSGA adds one router per layer. The resolved configuration
is stored on ``model.config.mixsga`` so ``save_pretrained`` + ``load_converted`` (or
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``) round-trip.
"""

from __future__ import annotations

from dataclasses import asdict
from types import MethodType

import torch
from torch import nn
from transformers.cache_utils import DynamicCache, DynamicLayer

from .adapters import adapter_for, head_dim
from .cache import KVBudgetCache, MixedKVLayer, SharedKVLayer
from .config import AttentionConfig, ResolvedAttention
from .decode_kernel import enable_decode_kernel
from .heads import HeadGrouping
from .persistence import save_with_remote_code
from .projections import MixedHeadProjection, PooledHeadProjection, SharedKVBorrower, SharedKVOwner
from .routing import RoutingContext, TokenRouter
from .segment_attention import enable_segment_read


def resolve_for_model(model: nn.Module, cfg: AttentionConfig) -> ResolvedAttention:
    """Check ``cfg`` against the model's shape without changing anything."""
    adapter = adapter_for(model.config)
    return cfg.resolve(adapter.native_kv_heads(model.config), len(adapter.decoder_layers(model)))


def convert_model(model: nn.Module, cfg: AttentionConfig | ResolvedAttention) -> ResolvedAttention:
    """Convert ``model`` (a supported ``*ForCausalLM``) in place; returns the resolved config.

    After conversion ``model.generate()`` uses a ``KVBudgetCache`` by default, ``model.train()``
    adds ``alpha * mean_l L_aux`` (eq. 5) to the returned loss, and ``routing_context(model)``
    selects the routing mode. The model's attention implementation becomes ``mixsga_<original>``,
    which reads the cache expert by expert (``segment_attention.py``); with ``decode_kernel: triton``
    it becomes ``mixsga_triton_<original>`` (see ``decode_kernel.py``).
    """
    if getattr(model, "_mixsga_resolved", None) is not None:
        raise ValueError("model is already converted")
    resolved = cfg if isinstance(cfg, ResolvedAttention) else resolve_for_model(model, cfg)
    adapter = adapter_for(model.config)
    attentions = adapter.attention_modules(model)
    d_h = head_dim(model.config)
    context = RoutingContext(decode_policy=resolved.decode_policy)
    layouts = []
    for layer_idx, attn in enumerate(attentions):
        layouts.append(_convert_layer(attn, layer_idx, resolved, d_h, model.config.hidden_size, context, attentions))
    model._mixsga_resolved = resolved
    model._mixsga_context = context
    model._mixsga_layouts = layouts
    model._mixsga_read_switch = enable_segment_read(model) if resolved.method != "mha" else None
    model._mixsga_decode_switch = enable_decode_kernel(model, resolved)
    model.config.mixsga = asdict(resolved)
    model.save_pretrained = MethodType(save_with_remote_code, model)  # a remote-code checkpoint (persistence.py)
    model.register_forward_pre_hook(_before_forward, with_kwargs=True)
    model.register_forward_hook(_after_forward, with_kwargs=True)
    return resolved


def _convert_layer(attn, layer_idx, resolved: ResolvedAttention, d_h, hidden, context, attentions):
    """Replace one attention module's K/V projections; return its cache-layout descriptor."""
    method = resolved.method
    if method == "mha":
        return ("native",)
    if method == "gqa":
        grouping = HeadGrouping(resolved.native_kv_heads, resolved.expert_kv_heads[0])
        attn.k_proj = PooledHeadProjection(attn.k_proj, grouping, d_h)
        attn.v_proj = PooledHeadProjection(attn.v_proj, grouping, d_h)
        return ("mixed", [grouping], None)
    if method == "mixsga":
        groupings = [HeadGrouping(resolved.native_kv_heads, k) for k in resolved.expert_kv_heads]
        device, dtype = attn.k_proj.weight.device, attn.k_proj.weight.dtype
        costs = [k / resolved.native_kv_heads for k in resolved.expert_kv_heads]
        router = TokenRouter(hidden, resolved.ratio, layer_idx, context, resolved.router_grad, resolved.router == "random",
                             costs=costs)
        attn.router = router.to(device=device, dtype=dtype)
        attn.k_proj = MixedHeadProjection(attn.k_proj, groupings, d_h, attn.router)
        attn.v_proj = MixedHeadProjection(attn.v_proj, groupings, d_h, attn.router)
        return ("mixed", groupings, attn.router)
    group = next(g for g in resolved.cla_groups if layer_idx in g)
    owner_idx = group[0]
    if layer_idx == owner_idx:
        for name in ("k_proj", "v_proj"):
            members = [getattr(attentions[i], name) for i in group]
            weight, bias = _cla_init(members, resolved.cla_init)
            setattr(attn, name, SharedKVOwner(weight, bias, borrowers=len(group) - 1))
        native = HeadGrouping(resolved.native_kv_heads, resolved.native_kv_heads)
        return ("mixed", [native], None)  # one native-size expert: the cache's in-place buffers
    owner = attentions[owner_idx]
    attn.k_proj = SharedKVBorrower(owner.k_proj, owner_idx)
    attn.v_proj = SharedKVBorrower(owner.v_proj, owner_idx)
    return ("shared", owner_idx)


@torch.no_grad()
def _cla_init(linears: list[nn.Linear], init: str):
    if init == "first":
        first = linears[0]
        return first.weight.data, None if first.bias is None else first.bias.data
    weight = torch.stack([l.weight.data for l in linears]).mean(0)
    bias = None if linears[0].bias is None else torch.stack([l.bias.data for l in linears]).mean(0)
    return weight, bias


def build_cache(model: nn.Module) -> KVBudgetCache:
    """A fresh cache laid out for the converted ``model`` (one layer object per decoder layer)."""
    layers = []
    switch = getattr(model, "_mixsga_decode_switch", None)
    read = getattr(model, "_mixsga_read_switch", None)
    for layout in model._mixsga_layouts:
        if layout[0] == "native":
            layers.append(DynamicLayer())
        elif layout[0] == "mixed":
            layers.append(MixedKVLayer(layout[1], layout[2], switch, read))
        else:
            layers.append(SharedKVLayer(layers[layout[1]]))
    return KVBudgetCache(layers)


def routing_context(model: nn.Module) -> RoutingContext:
    """The routing state shared by the converted model's routers (mode, stats, fixed ids)."""
    return model._mixsga_context


def routers(model: nn.Module) -> list[TokenRouter]:
    return [layout[2] for layout in model._mixsga_layouts if layout[0] == "mixed" and layout[2] is not None]


def aux_loss(model: nn.Module) -> torch.Tensor | None:
    """Mean over layers of the last forward's eq. 4 losses (the sum in eq. 5 divided by N_layers)."""
    losses = [loss for loss in (r.aux_loss() for r in routers(model)) if loss is not None]
    return torch.stack(losses).mean() if losses else None


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
    context = model._mixsga_context
    new_tokens = tokens.shape[1] if tokens is not None else None
    context.token_mask = mask[:, -new_tokens:].bool() if mask is not None and mask.dim() == 2 and new_tokens else None
    context.decoding = cache is not None and cache.get_seq_length() > 0
    return args, kwargs


def _wants_cache(model, kwargs) -> bool:
    use_cache = kwargs.get("use_cache")
    return bool(model.config.use_cache if use_cache is None else use_cache)


def _after_forward(model, args, kwargs, output):
    """Top-level hook: in training, add alpha * aux (eq. 5) to the LM loss the model returned."""
    resolved = model._mixsga_resolved
    if not model.training or resolved.alpha == 0 or getattr(output, "loss", None) is None:
        return output
    aux = aux_loss(model)
    if aux is not None:
        model._mixsga_context.last_aux_loss = aux.detach()
        output.loss = output.loss + resolved.alpha * aux
    return output
