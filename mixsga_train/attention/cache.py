"""A transformers ``Cache`` that stores each layer's K/V at its method's real size.

* ``MixedKVLayer`` (mixSGA, and GQA as its one-expert case): per expert, only the tokens routed
  there, at that expert's head count, plus a uint8 expert id per token (paper section 1.11).
* ``SharedKVLayer`` (CLA borrowers): stores nothing and reads its owner layer's cache.
* ``DynamicLayer`` (transformers' own) for layers left as shipped.

Attention reads the cache expanded back to the native heads, in original token order, so the
model's own masking and kernels apply unchanged. ``kv_bytes_per_token()`` is measured from the
tensors the cache holds.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer

from .decode_kernel import DecodeKernelSwitch, decode_placeholders
from .heads import HeadGrouping
from .routing import TokenRouter


class MixedKVLayer(CacheLayerMixin):
    """One layer's heterogeneous cache.

    segment_keys[e] / segment_values[e]: [N_e, k_e, d_h], the tokens routed to expert e in
    time-major order (time, then batch row); expert_ids: [B, T] uint8 (kept only with more than
    one expert). New tokens arrive at full H_kv heads (already grouped by the projection); their
    expert ids come from the layer's router (``router.last_ids``).

    With a ``decode_switch`` (``attention.decode_kernel: triton``) the layer also keeps, for the
    fused decode kernel, each token's row inside its expert segment (``row_index`` [B, T] int32,
    counted in ``nbytes``) and the ``[E, H_kv]`` int32 ``expand_table``; on one-token steps that
    the kernel serves, ``update`` returns tagged placeholders instead of the expanded cache
    (see ``decode_kernel.py``).
    """

    is_sliding = False
    is_croppable = False

    def __init__(
        self,
        groupings: list[HeadGrouping],
        router: TokenRouter | None = None,
        decode_switch: DecodeKernelSwitch | None = None,
    ):
        super().__init__()
        self.groupings = groupings
        self.router = router
        self.decode_switch = decode_switch
        self.row_index: torch.Tensor | None = None
        self.expand_table: torch.Tensor | None = None
        self._zero_ids: torch.Tensor | None = None
        self.segment_keys: list[torch.Tensor] = []
        self.segment_values: list[torch.Tensor] = []
        self.expert_ids: torch.Tensor | None = None
        self.seq_length = 0
        self.batch_size = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        device, dtype, head_dim = key_states.device, key_states.dtype, key_states.shape[-1]
        self.device = device
        self.segment_keys = [key_states.new_empty(0, g.kv_heads, head_dim) for g in self.groupings]
        self.segment_values = [value_states.new_empty(0, g.kv_heads, value_states.shape[-1]) for g in self.groupings]
        self.representative = [g.representative.to(device) for g in self.groupings]
        self.expand_index = [g.expand_index.to(device) for g in self.groupings]
        self.batch_size = key_states.shape[0]
        if len(self.groupings) > 1:
            self.expert_ids = torch.empty(self.batch_size, 0, dtype=torch.uint8, device=device)
        if self.decode_switch is not None:
            self.row_index = torch.empty(self.batch_size, 0, dtype=torch.int32, device=device)
            self.expand_table = torch.stack(self.expand_index).to(torch.int32).contiguous()
        self.is_initialized = True

    def _new_ids(self, batch: int, length: int, device) -> torch.Tensor:
        if len(self.groupings) == 1:
            return torch.zeros(batch, length, dtype=torch.long, device=device)
        ids = self.router.last_ids
        if ids is None or ids.shape != (batch, length):
            raise RuntimeError("mixSGA cache: the layer's router has no routing for these tokens")
        return ids

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """key_states, value_states: [B, H_kv, n, d_h] for n new tokens. Returns all cached K/V
        expanded to [B, H_kv, T, d_h] in token order (or, on a kernel decode step, placeholders)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        batch, heads, new, d_h = key_states.shape
        ids = self._new_ids(batch, new, key_states.device)
        keys_t = key_states.permute(2, 0, 1, 3)  # [n, B, H, d]: time-major
        values_t = value_states.permute(2, 0, 1, 3)
        ids_t = ids.t()
        rows_t = None if self.row_index is None else torch.zeros(new, batch, dtype=torch.int32, device=ids.device)
        for e in range(len(self.groupings)):
            rep = self.representative[e]
            before = self.segment_keys[e].shape[0]
            if len(self.groupings) == 1:  # every token: no boolean indexing (no host sync)
                new_k, new_v = keys_t.reshape(-1, heads, d_h)[:, rep], values_t.reshape(-1, heads, d_h)[:, rep]
                if rows_t is not None:
                    rows_t = torch.arange(before, before + new * batch, dtype=torch.int32, device=ids.device).view(new, batch)
            else:
                chosen = ids_t == e
                new_k, new_v = keys_t[chosen][:, rep], values_t[chosen][:, rep]
                if rows_t is not None:  # row in the segment = tokens of e before it, time-major
                    rank = chosen.reshape(-1).cumsum(0, dtype=torch.int32).view(new, batch) + (before - 1)
                    rows_t = torch.where(chosen, rank, rows_t)
            self.segment_keys[e] = torch.cat([self.segment_keys[e], new_k])
            self.segment_values[e] = torch.cat([self.segment_values[e], new_v])
        if self.expert_ids is not None:
            self.expert_ids = torch.cat([self.expert_ids, ids.to(torch.uint8)], dim=1)
        if rows_t is not None:
            self.row_index = torch.cat([self.row_index, rows_t.t()], dim=1)
        self.seq_length += new
        if new == 1 and self.decode_switch is not None and self.decode_switch.use_kernel(key_states):
            return decode_placeholders(self, key_states, value_states)
        return self.expanded()

    def kernel_expert_ids(self) -> torch.Tensor:
        """[B, T] expert ids for the decode kernel (all zeros, a view of a reused buffer, for one expert)."""
        if self.expert_ids is not None:
            return self.expert_ids
        if self._zero_ids is None or self._zero_ids.shape[1] < self.seq_length:
            size = max(256, 2 * self.seq_length)
            self._zero_ids = torch.zeros(self.batch_size, size, dtype=torch.uint8, device=self.device)
        return self._zero_ids[:, : self.seq_length]

    def expanded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All cached K/V at H_kv heads: ([B, H_kv, T, d_h], [B, H_kv, T, d_h])."""
        return self._expand(self.segment_keys), self._expand(self.segment_values)

    def _expand(self, segments: list[torch.Tensor]) -> torch.Tensor:
        heads = self.groupings[0].native_kv_heads
        if len(segments) == 1:
            full = segments[0][:, self.expand_index[0]]
            return full.view(self.seq_length, self.batch_size, heads, -1).permute(1, 2, 0, 3)
        full = segments[0].new_empty(self.seq_length, self.batch_size, heads, segments[0].shape[-1])
        ids_t = self.expert_ids.t()
        for e, segment in enumerate(segments):
            full[ids_t == e] = segment[:, self.expand_index[e]]
        return full.permute(1, 2, 0, 3)

    def nbytes(self) -> int:
        tensors = self.segment_keys + self.segment_values
        tensors += [t for t in (self.expert_ids, self.row_index) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seq_length + query_length, 0

    def get_seq_length(self) -> int:
        return self.seq_length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.__init__(self.groupings, self.router, self.decode_switch)

    def _unsupported(self, *args, **kwargs):
        raise NotImplementedError(
            "the mixSGA/GQA cache supports greedy and sampled decoding; beam search, cache cropping and "
            "batch reshuffling are not implemented (pass a transformers DynamicCache via cache= for those)"
        )

    reorder_cache = crop = batch_repeat_interleave = batch_select_indices = _unsupported


class SharedKVLayer(CacheLayerMixin):
    """CLA borrower: holds nothing; ``update`` returns the owner layer's cached K/V (the owner ran
    earlier in the same forward, on the same tokens)."""

    is_sliding = False
    is_croppable = False

    def __init__(self, owner: CacheLayerMixin):
        super().__init__()
        self.owner = owner
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        return self.owner.keys, self.owner.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.get_mask_sizes(query_length)

    def get_seq_length(self) -> int:
        return self.owner.get_seq_length()

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        pass

    def nbytes(self) -> int:
        return 0


def layer_nbytes(layer: CacheLayerMixin) -> int:
    """Bytes a cache layer holds, counted from its tensors."""
    if hasattr(layer, "nbytes"):
        return layer.nbytes()
    if not layer.is_initialized or layer.keys is None:
        return 0
    return layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()


class KVBudgetCache(Cache):
    """The cache of a converted model (built by ``build_cache(model)``): one layer object per
    decoder layer, each storing K/V at its method's size."""

    def __init__(self, layers: list[CacheLayerMixin]):
        super().__init__(layers=layers)

    def nbytes(self) -> int:
        return sum(layer_nbytes(layer) for layer in self.layers)

    def kv_bytes_per_token(self) -> float:
        """Measured bytes held per cached token (K + V of all layers, plus expert ids)."""
        tokens = self.get_seq_length() * self.batch_size
        return self.nbytes() / tokens if tokens else 0.0

    @property
    def batch_size(self) -> int:
        for layer in self.layers:
            if isinstance(layer, MixedKVLayer) and layer.is_initialized:
                return layer.batch_size
            if isinstance(layer, DynamicLayer) and layer.is_initialized and layer.keys is not None:
                return layer.keys.shape[0]
        return 0


def dynamic_cache_bytes_per_token(cache: Cache) -> float:
    """Measured bytes per token of any transformers cache (e.g. the unconverted model's)."""
    layers = cache.layers
    tokens = cache.get_seq_length()
    batch = next((l.keys.shape[0] for l in layers if l.is_initialized and l.keys is not None and l.keys.numel()), 0)
    total = sum(layer_nbytes(l) for l in layers)
    return total / (tokens * batch) if tokens and batch else 0.0
