"""``attention.decode_kernel: triton``: decode steps read the mixed KV cache with the fused kernel.

How it is wired (``enable_decode_kernel``, called by ``convert_model`` after the segment read of
``segment_attention.py`` is installed):

* The model's ``config._attn_implementation`` (``mixsga_sdpa``, ``mixsga_eager``, ...) becomes
  ``mixsga_triton_<original>``, registered with transformers' ``AttentionInterface`` (and its
  ``AttentionMaskInterface``, reusing the original's mask builder, so masks are unchanged). The
  registered function delegates every call to ``mixsga_<original>`` (the torch segment read,
  which itself delegates ordinary calls to the original implementation), except a one-token
  decode step the cache has tagged for the kernel.
* ``MixedKVLayer.update`` (built by ``build_cache`` with this model's ``DecodeKernelSwitch``) appends
  the new token as always and returns zero-length placeholders tagged with the layer and
  ``kernel=True``. The attention function calls ``mixed_decode_attention`` on the layer's expert
  buffers (as strided segments, ``MixedKVLayer.kernel_segments``), expert ids, rows and
  ``[E, H_kv]`` expand table, with a ``[B, T]`` key mask taken from the 4-D attention mask it
  receives (padding) and the ``scaling`` it receives (OPT pre-scales its queries and passes 1.0).
* Prefill, training and every unsupported case run the torch path (``decode_kernel: torch``).

Falls back to the torch path, with one logged warning per model and reason, when: Triton cannot
run (not importable, or neither a CUDA tensor nor ``TRITON_INTERPRET=1``); the method keeps no
mixed cache (``mha``, ``cla``); the family uses logit softcapping or sliding windows (Gemma 2, a
windowed Mistral/Qwen2); more than ``MAX_EXPERTS`` experts; and, per call, output_attentions,
dropout, a softcap / sliding_window argument or a query/cache dtype mismatch.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from . import segment_attention, triton_decode
from ..errors import ConfigError

log = logging.getLogger(__name__)

PREFIX = "mixsga_triton_"


class DecodeKernelSwitch:
    """Per-model state of the triton decode path: the model config (to check the attention
    implementation is still ours) and which fallback warnings were already logged."""

    def __init__(self, config):
        self.config = config
        self._warned: set[str] = set()

    def warn_once(self, reason: str) -> None:
        if reason not in self._warned:
            self._warned.add(reason)
            log.warning("attention.decode_kernel=triton: %s; using the torch decode path", reason)

    def use_kernel(self, key_states: torch.Tensor) -> bool:
        """Whether this one-token step should go through the kernel (warns once if it cannot)."""
        impl = getattr(self.config, "_attn_implementation", None)
        if not (isinstance(impl, str) and impl.startswith(PREFIX)):
            self.warn_once(f"the model's attention implementation was changed to {impl!r}")
            return False
        reason = runtime_unavailable(key_states.device)
        if reason:
            self.warn_once(reason)
            return False
        return True


def runtime_unavailable(device: torch.device) -> str | None:
    """Why the kernel cannot run on tensors of ``device`` here (None if it can)."""
    if triton_decode.triton is None:
        return f"Triton is not importable ({triton_decode._TRITON_IMPORT_ERROR})"
    if device.type != "cuda" and not triton_decode._interpret_mode():
        return f"the cache is on {device.type}, and Triton needs CUDA (or TRITON_INTERPRET=1 for CPU)"
    return None


def static_unsupported(model: nn.Module, resolved) -> str | None:
    """Why this converted model can never use the kernel (None if it can)."""
    config = model.config
    if resolved.method not in ("mixsga", "gqa"):
        return f"method {resolved.method!r} keeps no mixed KV cache (the kernel serves mixsga and gqa)"
    if len(resolved.expert_kv_heads or []) > triton_decode.MAX_EXPERTS:
        return f"{len(resolved.expert_kv_heads)} experts; the kernel supports at most {triton_decode.MAX_EXPERTS}"
    if getattr(config, "attn_logit_softcapping", None):
        return f"{config.model_type} uses attention logit softcapping, which the kernel does not implement"
    layer_types = getattr(config, "layer_types", None) or []
    windowed = "sliding_attention" in layer_types or (
        config.model_type == "mistral" and getattr(config, "sliding_window", None) is not None
    )
    if windowed:
        return f"{config.model_type} uses sliding-window attention, which the kernel does not implement"
    impl = segment_attention.original_implementation(getattr(config, "_attn_implementation", None) or "eager")
    if not segment_attention.supports(impl):
        return f"attention implementation {impl!r} has no mask builder to reuse"
    return None


def enable_decode_kernel(model: nn.Module, resolved) -> DecodeKernelSwitch | None:
    """Route the converted ``model``'s decode steps through the kernel if ``resolved`` asks for
    it and the model supports it; returns the switch ``build_cache`` hands to the cache layers."""
    if resolved.decode_kernel not in ("torch", "triton"):
        raise ConfigError("attention.decode_kernel", f"unknown {resolved.decode_kernel!r}; choose one of torch, triton")
    if resolved.decode_kernel == "torch":
        return None
    switch = DecodeKernelSwitch(model.config)
    reason = static_unsupported(model, resolved)
    if reason:
        switch.warn_once(reason)
        return None
    impl = getattr(model.config, "_attn_implementation", None) or "eager"
    if not impl.startswith(PREFIX):
        model.config._attn_implementation = register(segment_attention.original_implementation(impl))
    reason = runtime_unavailable(model.device)
    if reason and model.device.type != "cpu":  # a CPU model may still move to CUDA; checked per step
        switch.warn_once(reason)
    return switch


def register(original: str) -> str:
    """Register ``mixsga_triton_<original>`` (attention function + the original's mask builder)."""
    name = PREFIX + original
    if name not in ALL_ATTENTION_FUNCTIONS:
        segment_read = segment_attention.register(original)
        AttentionInterface.register(name, _make_attention(segment_read))
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[original])
    return name


def _make_attention(segment_read: str):
    def mixsga_triton_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        layer, kernel = segment_attention.placeholder_tag(key)
        if kernel:
            reason = _call_unsupported(module, query, layer, dropout, kwargs)
            if reason is None:
                out = _kernel_decode(layer, query, attention_mask, scaling)
                if out is not None:
                    return out, None
                reason = "the attention mask is not a [B, 1, 1, T] or [B, T] padding mask"
            layer.decode_switch.warn_once(reason)
        return ALL_ATTENTION_FUNCTIONS[segment_read](
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )

    mixsga_triton_attention.__name__ = f"{PREFIX}{segment_attention.original_implementation(segment_read)}_attention"
    return mixsga_triton_attention


def _call_unsupported(module, query, layer, dropout, kwargs) -> str | None:
    if kwargs.get("output_attentions"):
        return "output_attentions is not available from the kernel"
    if module.training and dropout:
        return "attention dropout (training) is not implemented by the kernel"
    if kwargs.get("softcap") is not None:
        return "logit softcapping is not implemented by the kernel"
    if kwargs.get("sliding_window") is not None:
        return "sliding-window attention is not implemented by the kernel"
    if query.dtype != layer.key_buffers[0].dtype:
        return f"query dtype {query.dtype} differs from the cache's {layer.key_buffers[0].dtype}"
    return None


def _key_mask(attention_mask: torch.Tensor | None, batch: int, length: int) -> torch.Tensor | None | bool:
    """[B, T] bool (True = attend) from the mask a decode step's attention receives; False if the
    mask is of a form the kernel cannot express."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape[-1] < length:
        return False
    if attention_mask.dim() == 4:
        mask = attention_mask[:, 0, -1, :length]
    elif attention_mask.dim() == 2:
        mask = attention_mask[:, :length]
    else:
        return False
    if mask.dtype != torch.bool:
        mask = mask > torch.finfo(mask.dtype).min / 2 if mask.is_floating_point() else mask != 0
    return mask.expand(batch, length)


def _kernel_decode(layer, query: torch.Tensor, attention_mask, scaling) -> torch.Tensor | None:
    """query [B, H_q, 1, d] -> [B, 1, H_q, d] (the layout transformers' attention functions return)."""
    batch, length = layer.batch_size, layer.seq_length
    kv_mask = _key_mask(attention_mask, batch, length)
    if kv_mask is False:
        return None
    keys, values, rows = layer.kernel_segments()
    out = triton_decode.mixed_decode_attention(
        query[:, :, 0],
        keys,
        values,
        layer.kernel_expert_ids(),
        layer.expand_table,
        kv_mask=kv_mask,
        scale=scaling,
        row_index=rows,
    )
    return out.unsqueeze(1)
