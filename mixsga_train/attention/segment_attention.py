"""The budget cache's default read path: attention over each expert's tokens at its own head count.

A converted model's attention implementation (``sdpa``, ``eager``, ...) becomes ``mixsga_<original>``,
registered with transformers' ``AttentionInterface`` (and its ``AttentionMaskInterface``, reusing
the original's mask builder, so masks are unchanged). The registered function delegates every call
to the original implementation (so each family's own attention module runs unchanged, and prefill
and training are untouched), except when the cache handed it zero-length placeholder K/V tagged
with a ``MixedKVLayer`` (a decode step, or any step after the first). Then it reads the layer's
expert buffers directly:

* Expert e stores its tokens at ``k_e`` heads; the query heads served by one of its head groups are
  contiguous, so queries are viewed as ``[k_e, B, (H_q / k_e) * n, d]`` and multiplied with the
  buffer as stored: grouped-query attention per expert segment. Scores are scaled, soft-capped
  (Gemma 2) and masked exactly like the family's eager attention; the mask the model built in
  token order is gathered at the positions the segment's slots hold (sliding windows and padding
  included).
* The partial softmaxes are merged by log-sum-exp (flash-decoding style): per segment the output
  ``o_e`` normalised over that segment and its log-sum-exp ``lse_e`` of the scores; then
  ``out = sum_e softmax_e(lse) o_e``. This equals one softmax over all cached tokens (paper eq. 2
  with the heterogeneous K/V of eqs. 6-9).
* One expert (GQA; CLA owners keep one native-size expert) without softcapping calls torch's SDPA
  with ``enable_gqa`` on the buffer as stored.

No native-size K/V is materialised, except for experts whose head groups are uneven
(``H_kv % k_e != 0``): their segment is expanded to the native heads (only that segment's tokens).
Documented fallbacks to the reference read (``MixedKVLayer.expanded()`` + the original function):
``output_attentions``, and attention dropout while training.
"""

from __future__ import annotations

import sys

import torch
from torch import nn
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

PREFIX = "mixsga_"
_TAG = "_mixsga_read"


class SegmentReadSwitch:
    """Tells a cache layer whether the model's attention is ours (so placeholders are understood)."""

    def __init__(self, config):
        self.config = config

    def active(self) -> bool:
        impl = getattr(self.config, "_attn_implementation", None)
        return isinstance(impl, str) and impl.startswith(PREFIX)


def read_placeholders(layer, key_states: torch.Tensor, value_states: torch.Tensor, kernel: bool):
    """Zero-length K/V tagged with ``layer`` (and whether the Triton kernel should serve the step)."""
    keys, values = key_states[:, :, :0], value_states[:, :, :0]
    setattr(keys, _TAG, (layer, kernel))
    return keys, values


def placeholder_tag(key: torch.Tensor):
    """(layer, kernel) of placeholder K/V, or (None, False) for ordinary K/V."""
    return getattr(key, _TAG, (None, False))


def original_implementation(impl: str) -> str:
    """``sdpa`` for ``mixsga_sdpa`` / ``mixsga_triton_sdpa``; ``impl`` itself otherwise."""
    for prefix in (PREFIX + "triton_", PREFIX):
        if impl.startswith(prefix):
            return impl[len(prefix) :]
    return impl


def original_function(original: str, module: nn.Module):
    if original == "eager":  # each family's own eager function (softcapping, OPT's, ...)
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[original]


def supports(impl: str) -> bool:
    """Whether ``impl`` can be wrapped (eager, or a registered function with a mask builder)."""
    return impl == "eager" or (impl in ALL_ATTENTION_FUNCTIONS and impl in ALL_MASK_ATTENTION_FUNCTIONS)


def register(original: str) -> str:
    """Register ``mixsga_<original>`` (attention function + the original's mask builder)."""
    name = PREFIX + original
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, _make_attention(original))
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[original])
    return name


def enable_segment_read(model: nn.Module) -> SegmentReadSwitch:
    """Make the converted ``model``'s attention read budget caches segment by segment."""
    impl = getattr(model.config, "_attn_implementation", None) or "eager"
    original = original_implementation(impl)
    if supports(original):
        model.config._attn_implementation = register(original)
    return SegmentReadSwitch(model.config)


def _make_attention(original: str):
    def mixsga_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        layer, _ = placeholder_tag(key)
        if layer is not None:
            if not kwargs.get("output_attentions") and not (module.training and dropout):
                out = segment_attention(layer, query, attention_mask, scaling, kwargs.get("softcap"))
                return out, None
            key, value = layer.expanded()
        return original_function(original, module)(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )

    mixsga_attention.__name__ = f"mixsga_{original}_attention"
    return mixsga_attention


def segment_attention(layer, query: torch.Tensor, attention_mask, scaling=None, softcap=None) -> torch.Tensor:
    """query [B, H_q, n, d] (the layer's last n cached tokens) -> [B, n, H_q, d_v].

    ``attention_mask``: what the family's attention received: None (no padding, n == 1), or
    [B|1, 1, n, >=T] bool (True = attend) or additive float, in cache-token order."""
    batch, q_heads, new, d = query.shape
    total = layer.seq_length
    scaling = d**-0.5 if scaling is None else scaling
    mask = None if attention_mask is None else attention_mask[:, 0, :, :total].expand(batch, new, total)
    partial = _flash_partial if query.device.type == "cpu" and softcap is None else _segment_partial
    experts = [e for e in range(layer.num_experts) if layer.lengths[e]]  # an empty segment adds nothing
    partials = [partial(layer, e, query, mask, scaling, softcap) for e in experts]
    if len(partials) == 1:
        return partials[0][0].to(query.dtype).transpose(1, 2)
    outs = torch.stack([out for out, _ in partials])  # [E, B, H_q, n, d_v], each normalised over its segment
    lses = torch.stack([lse for _, lse in partials])  # [E, B, H_q, n, 1]
    out = (torch.softmax(lses, dim=0) * outs).sum(0)  # weight of segment e: exp(lse_e) / sum_e' exp(lse_e')
    return out.to(query.dtype).transpose(1, 2)


def _even(grouping) -> bool:
    """Whether every head group of ``grouping`` has the same size (so its query heads are too)."""
    return grouping.native_kv_heads % grouping.kv_heads == 0


def _causal(start: int, new: int, positions: torch.Tensor) -> torch.Tensor:
    """[B, n, L] bool: key at ``positions`` [B, L] is visible from query position start + i."""
    query_positions = torch.arange(start, start + new, device=positions.device)
    return positions[:, None, :] <= query_positions[None, :, None]


def _segment_keep(layer, keys_length, positions, valid, mask, batch, new, device):
    """[B, n, L] bool or additive float mask of one segment (None: every slot is visible)."""
    token_mask = None
    if mask is not None:  # the model's mask, at the cache positions of this segment's slots
        token_mask = (
            mask if positions is None else mask.gather(-1, positions[:, None, :].long().expand(batch, new, keys_length))
        )
    elif new > 1:
        if positions is None:
            positions = torch.arange(keys_length, device=device).expand(batch, keys_length)
        token_mask = _causal(layer.seq_length - new, new, positions)
    if valid is not None:
        valid = valid[:, None, :]
        token_mask = (
            valid
            if token_mask is None
            else (
                token_mask & valid if token_mask.dtype == torch.bool else token_mask.masked_fill(~valid, float("-inf"))
            )
        )
    return token_mask


def _flash_partial(layer, expert: int, query, mask, scaling, softcap):
    """CPU: one expert's partial attention by torch's fused flash kernel, which also returns the
    log-sum-exp of each row: (o [B, H_q, n, d_v] normalised over the segment, lse [B, H_q, n, 1])."""
    batch, q_heads, new, d = query.shape
    keys, values, positions, valid = layer.segment(expert)
    if not _even(layer.groupings[expert]):
        keys = keys.index_select(0, layer.expand_index[expert])
        values = values.index_select(0, layer.expand_index[expert])
    heads, length = keys.shape[0], keys.shape[2]
    rep = q_heads // heads
    grouped = query.reshape(batch, heads, rep * new, d)  # the rep query heads of a group share its K/V
    keep = _segment_keep(layer, length, positions, valid, mask, batch, new, query.device)
    bias = None
    if keep is not None:
        if keep.dtype == torch.bool:
            keep = torch.zeros(keep.shape, dtype=query.dtype, device=query.device).masked_fill_(~keep, float("-inf"))
        if new == 1:  # every query head of the group has the same row: the kernel broadcasts it
            bias = keep.to(query.dtype)[:, None]
        else:
            bias = keep.to(query.dtype)[:, None, None].expand(batch, 1, rep, new, length)
            bias = bias.reshape(batch, 1, rep * new, length)  # one row per (query head of the group, token)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        grouped, keys.transpose(0, 1), values.transpose(0, 1), 0.0, False, attn_mask=bias, scale=scaling
    )
    out = out.reshape(batch, q_heads, new, -1).float()
    lse = lse.reshape(batch, q_heads, new, 1).float()
    if keep is not None:  # a row with no visible slot in this segment: weight 0, no NaN
        # (the kernel returns lse 0, not -inf, for a row whose bias is -inf everywhere)
        empty = ~torch.isfinite(lse) | torch.isneginf(keep).all(-1)[:, None, :, None]
        out, lse = out.masked_fill(empty, 0.0), lse.masked_fill(empty, float("-inf"))
    return out, lse


def _segment_partial(layer, expert: int, query, mask, scaling, softcap):
    """One expert's partial attention: (o [B, H_q, n, d_v] fp32 normalised over the segment, its
    log-sum-exp [B, H_q, n, 1]; -inf with o = 0 for a row that sees no slot of the segment)."""
    batch, q_heads, new, d = query.shape
    keys, values, positions, valid = layer.segment(expert)
    if not _even(layer.groupings[expert]):  # uneven head groups: expand this segment to the native heads
        keys = keys.index_select(0, layer.expand_index[expert])
        values = values.index_select(0, layer.expand_index[expert])
    heads, length = keys.shape[0], keys.shape[2]
    rep = q_heads // heads
    grouped = query.reshape(batch, heads, rep * new, d).transpose(0, 1)  # [k, B, rep * n, d]
    scores = torch.matmul(grouped, keys.transpose(-1, -2)) * scaling  # [k, B, rep * n, L]
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.float().view(heads, batch, rep, new, length)
    token_mask = _segment_keep(layer, length, positions, valid, mask, batch, new, query.device)
    if token_mask is not None:
        if token_mask.dtype == torch.bool:
            scores = scores.masked_fill(~token_mask[None, :, None], float("-inf"))
        else:
            scores = scores + token_mask[None, :, None].float()
    top = scores.amax(-1, keepdim=True).clamp_min(torch.finfo(scores.dtype).min)
    weights = torch.exp(scores - top)
    norm = weights.sum(-1, keepdim=True)
    out = torch.matmul(weights.view(heads, batch, rep * new, length).to(values.dtype), values).float()

    def to_query_heads(t):  # [k, B, rep, n, x] -> [B, H_q, n, x]
        return t.reshape(heads, batch, rep, new, -1).transpose(0, 1).reshape(batch, q_heads, new, -1)

    out, top, norm = to_query_heads(out), to_query_heads(top), to_query_heads(norm)
    return out / norm.clamp_min(torch.finfo(norm.dtype).tiny), top + norm.log()
