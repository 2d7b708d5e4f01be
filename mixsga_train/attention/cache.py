"""A transformers ``Cache`` that stores each layer's K/V at its method's real size.

* ``MixedKVLayer`` (mixSGA; GQA and CLA owners as its one-expert case): per expert, a buffer
  ``[k_e, B, capacity_e, d_h]`` holding only the tokens routed there, at that expert's head count,
  plus a uint8 expert id per token and (with more than one expert) each slot's token position
  (paper section 1.11). Buffers grow geometrically (``GROWTH``), so an append writes only the
  new tokens; the slack between bytes in use and bytes reserved is real memory. ``generate()``
  plans them for prompt + ``max_new_tokens`` up front (``KVBudgetCache.plan``), so a GQA cache
  holds no slack and a mixSGA one only what its decode routing takes beyond the ratio.
* ``SharedKVLayer`` (CLA borrowers): stores nothing and reads its owner layer's cache.
* ``DynamicLayer`` (transformers' own) for layers left as shipped (``mha``).

Reading: the first forward (empty cache) gets its own K/V back unchanged. Later steps get
zero-length placeholders tagged with the layer; the registered attention function
(``segment_attention.py``) then reads each expert's buffer at that expert's head count. Where
that function is not installed, ``expanded()`` rebuilds native-size K/V in token order (the
reference path). ``kv_bytes_per_token()`` / ``kv_bytes_reserved_per_token()`` are measured from
the tensors the cache holds.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer

from .decode_kernel import DecodeKernelSwitch
from .heads import HeadGrouping
from .routing import TokenRouter
from .segment_attention import SegmentReadSwitch, read_placeholders

GROWTH = 1.25  # capacity multiplier when a buffer is full: amortised O(1) appends, <= 25% slack
MIN_CAPACITY = 16  # smallest buffer length (tokens per batch row)


def routed_token_bytes(num_experts: int) -> int:
    """Bytes a mixed layer keeps per token besides its K/V: a uint8 expert id and an int32 slot
    position with more than one expert; none with one (GQA, CLA)."""
    return 1 + 4 if num_experts > 1 else 0


def _grown(buffer: torch.Tensor, dim: int, needed: int, limit: int | None = None) -> torch.Tensor:
    """``buffer`` with length >= ``needed`` along ``dim`` (contents kept, new slots zeroed); growth
    stops at ``limit`` (the planned length) unless ``needed`` is beyond it."""
    size = buffer.shape[dim]
    if needed <= size:
        return buffer
    new_size = max(needed, math.ceil(size * GROWTH), MIN_CAPACITY)
    if limit is not None and needed <= limit:
        new_size = min(new_size, limit)
    shape = list(buffer.shape)
    shape[dim] = new_size
    grown = buffer.new_zeros(shape)
    grown.narrow(dim, 0, size).copy_(buffer)
    return grown


def _head_selector(grouping: HeadGrouping, device) -> slice | torch.Tensor:
    """Indexes the representative heads of ``grouping``: a strided slice (a view) for equal
    groups, else the index tensor (index_select on a middle dim is slow on CPU)."""
    if grouping.native_kv_heads % grouping.kv_heads == 0:
        return slice(None, None, grouping.native_kv_heads // grouping.kv_heads)
    return grouping.representative.to(device)


class MixedKVLayer(CacheLayerMixin):
    """One layer's heterogeneous cache.

    key_buffers[e] / value_buffers[e]: ``[k_e, B, capacity_e, d]``; batch row b holds ``counts[b, e]`` tokens of
    expert e in slots ``0..counts[b, e]-1`` (in time order). ``slot_positions[e]`` ``[B, capacity_e]``
    int32: the cache position of each slot (kept only with more than one expert; with one expert
    slot == position). ``expert_ids`` ``[B, T]`` uint8 (None with one expert). New tokens arrive at
    native H_kv heads (already grouped by the projection); their expert ids come from the layer's
    router (``router.last_ids``).

    Appends use no boolean indexing: a token is written into every expert's buffer, at its slot in
    its own expert and at the first free slot (overwritten later) elsewhere, so no device-to-host
    sync is needed except to size buffers (on CUDA only when a host-side bound says one may be full).

    With a ``decode_switch`` (``attention.decode_kernel: triton``) the layer also keeps each token's
    slot (``token_slot`` [B, T] int32, counted in ``nbytes``) for the fused decode kernel.
    """

    is_sliding = False
    is_croppable = False

    def __init__(
        self,
        groupings: list[HeadGrouping],
        router: TokenRouter | None = None,
        decode_switch: DecodeKernelSwitch | None = None,
        read_switch: SegmentReadSwitch | None = None,
    ):
        super().__init__()
        self.groupings = groupings
        self.router = router
        self.decode_switch = decode_switch
        self.read_switch = read_switch
        self.key_buffers: list[torch.Tensor] = []
        self.value_buffers: list[torch.Tensor] = []
        self.slot_positions: list[torch.Tensor] = []
        self.counts: torch.Tensor | None = None
        self.lengths: list[int] = []  # per expert: host-side bound >= max_b counts[b, e] (exact on CPU)
        self._ids: torch.Tensor | None = None
        self._token_slot: torch.Tensor | None = None
        self.expand_table: torch.Tensor | None = None
        self._zero_ids: torch.Tensor | None = None
        self.seq_length = 0
        self.batch_size = 0
        self.planned_tokens: int | None = None
        self.evicted: torch.Tensor | None = None  # [B, T0] bool: tokens evicted (``evict``)

    @property
    def num_experts(self) -> int:
        return len(self.groupings)

    def plan(self, max_tokens: int) -> None:
        """Size the buffers for ``max_tokens`` cached tokens per sequence when they are first built
        (``generate()`` knows prompt + new tokens): one expert gets exactly that many slots; with
        several, expert e gets ``ceil(rho_e * max_tokens)`` plus its scratch slot, and grows as usual
        if its routing takes more."""
        self.planned_tokens = max_tokens

    def _planned_sizes(self) -> list[int]:
        if self.planned_tokens is None:
            return [0] * self.num_experts
        if self.num_experts == 1:
            return [self.planned_tokens]
        return [math.ceil(r * self.planned_tokens) + 1 if r > 0 else 0 for r in self.router.capacity]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        device = key_states.device
        self.device = device
        batch = self.batch_size = key_states.shape[0]
        sizes = self._planned_sizes()
        self.key_buffers = [
            key_states.new_zeros(g.kv_heads, batch, n, key_states.shape[-1]) for g, n in zip(self.groupings, sizes)
        ]
        self.value_buffers = [
            value_states.new_zeros(g.kv_heads, batch, n, value_states.shape[-1]) for g, n in zip(self.groupings, sizes)
        ]
        tokens = self.planned_tokens or 0
        self.representative = [_head_selector(g, device) for g in self.groupings]
        self.expand_index = [g.expand_index.to(device) for g in self.groupings]
        self.lengths = [0] * self.num_experts
        if self.num_experts > 1:
            self.counts = torch.zeros(batch, self.num_experts, dtype=torch.long, device=device)
            self.slot_positions = [torch.zeros(batch, n, dtype=torch.int32, device=device) for n in sizes]
            self._ids = torch.zeros(batch, tokens, dtype=torch.uint8, device=device)
        if self.decode_switch is not None:
            self._token_slot = torch.zeros(batch, tokens, dtype=torch.int32, device=device)
            self.expand_table = torch.stack(self.expand_index).to(torch.int32).contiguous()
        self.is_initialized = True

    @property
    def expert_ids(self) -> torch.Tensor | None:
        """[B, T] uint8 expert of every cached token (None with one expert)."""
        return None if self._ids is None else self._ids[:, : self.seq_length]

    @expert_ids.setter
    def expert_ids(self, ids: torch.Tensor) -> None:  # replaying other routing (tests, analysis)
        self._ids[:, : self.seq_length] = ids

    @property
    def token_slot(self) -> torch.Tensor | None:
        """[B, T] int32 slot of every cached token inside its expert's buffer (decode kernel only)."""
        return None if self._token_slot is None else self._token_slot[:, : self.seq_length]

    def _new_ids(self, batch: int, length: int) -> torch.Tensor:
        ids = self.router.last_ids
        if ids is None or ids.shape != (batch, length):
            raise RuntimeError("mixSGA cache: the layer's router has no routing for these tokens")
        return ids

    def _reserve(self, expert: int, needed: int) -> None:
        limit = None if self.planned_tokens is None else self.planned_tokens + 1  # + the scratch slot
        self.key_buffers[expert] = _grown(self.key_buffers[expert], 2, needed, limit)
        self.value_buffers[expert] = _grown(self.value_buffers[expert], 2, needed, limit)
        if self.slot_positions:
            self.slot_positions[expert] = _grown(self.slot_positions[expert], 1, needed, limit)

    def _reserve_tokens(self, needed: int) -> None:
        if self._ids is not None:
            self._ids = _grown(self._ids, 1, needed, self.planned_tokens)
        if self._token_slot is not None:
            self._token_slot = _grown(self._token_slot, 1, needed, self.planned_tokens)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """key_states, value_states: [B, H_kv, n, d] for n new tokens. Returns them unchanged on the
        first call; later, placeholders for the segment read (or the expanded cache without it)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, new = self.seq_length, key_states.shape[2]
        self._reserve_tokens(start + new)
        if self.num_experts == 1:
            self._append_one_expert(key_states, value_states, start, new)
        else:
            self._append_mixed(key_states, value_states, start, new)
        self.seq_length += new
        if start == 0:
            return key_states, value_states
        if self.read_switch is not None and self.read_switch.active():
            kernel = new == 1 and self.decode_switch is not None and self.decode_switch.use_kernel(key_states)
            return read_placeholders(self, key_states, value_states, kernel)
        return self.expanded()

    def _append_one_expert(self, key_states, value_states, start: int, new: int) -> None:
        self._reserve(0, start + new)
        rep = self.representative[0]
        self.key_buffers[0][:, :, start : start + new] = key_states[:, rep].transpose(0, 1)
        self.value_buffers[0][:, :, start : start + new] = value_states[:, rep].transpose(0, 1)
        self.lengths[0] = start + new
        if self._token_slot is not None:
            slots = torch.arange(start, start + new, dtype=torch.int32, device=self.device)
            self._token_slot[:, start : start + new] = slots

    def _append_mixed(self, key_states, value_states, start: int, new: int) -> None:
        batch = key_states.shape[0]
        ids = self._new_ids(batch, new)
        onehot = self._one_hot(ids)  # [B, n, E]
        before = onehot.cumsum(1) - onehot  # tokens of the same expert earlier in this call
        slots = self.counts[:, None, :] + before  # [B, n, E]: the slot of each token in each expert
        new_counts = self.counts + onehot.sum(1)
        self._update_lengths(new_counts, new)
        # a token's own expert gets it at its slot; the others at their first free slot (a scratch
        # slot beyond the new count, overwritten later), so no boolean indexing is needed
        slots = torch.where(onehot.bool(), slots, new_counts[:, None, :])
        positions = torch.arange(start, start + new, dtype=torch.int32, device=self.device).expand(batch, new)
        keys, values = key_states.transpose(0, 1), value_states.transpose(0, 1)  # [H_kv, B, n, d]
        same_width = keys.shape[-1] == values.shape[-1]
        for e, rep in enumerate(self.representative):
            slot = slots[..., e]  # [B, n]
            heads = self.key_buffers[e].shape[0]
            index = slot.view(1, batch, new, 1).expand(heads, batch, new, keys.shape[-1])
            self.key_buffers[e].scatter_(2, index, keys[rep])  # index_put_ on a permuted view: ~25x slower
            if not same_width:
                index = slot.view(1, batch, new, 1).expand(heads, batch, new, values.shape[-1])
            self.value_buffers[e].scatter_(2, index, values[rep])
            self.slot_positions[e].scatter_(1, slot, positions)
        self.counts = new_counts
        self._ids[:, start : start + new] = ids
        if self._token_slot is not None:
            self._token_slot[:, start : start + new] = slots.gather(-1, ids[..., None]).squeeze(-1)

    def _one_hot(self, ids: torch.Tensor) -> torch.Tensor:
        """[..., E] long one-hot of ``ids`` (by comparison: ``F.one_hot`` checks the range on the host)."""
        return (ids[..., None] == torch.arange(self.num_experts, device=ids.device)).long()

    def _update_lengths(self, new_counts: torch.Tensor, new: int) -> None:
        """Keep ``lengths[e]`` >= max_b counts and every buffer one slot longer (the scratch slot).
        Exact (one small sync) on CPU; on other devices a bound, tightened only when it says full."""
        exact = new_counts.device.type == "cpu"
        bounds = [length + new for length in self.lengths]
        if not exact and all(b + 1 <= k.shape[2] for b, k in zip(bounds, self.key_buffers)):
            self.lengths = bounds
            return
        self.lengths = new_counts.amax(0).tolist()
        for e, length in enumerate(self.lengths):
            self._reserve(e, length + 1)

    def evict(self, evicted: torch.Tensor) -> None:
        """Drop the cached tokens marked in ``evicted`` [B, T] bool (T <= tokens cached so far) from
        every later read of this layer (KV eviction such as H2O, ``evaluation/eviction.py``). The
        segment read masks them; their slots are not compacted, so ``nbytes`` still counts them
        (the eviction code accounts the kept tokens' bytes)."""
        if evicted.shape[0] != self.batch_size or evicted.shape[1] > self.seq_length:
            raise ValueError(
                f"evicted {tuple(evicted.shape)} does not fit a cache of {self.batch_size} x {self.seq_length}"
            )
        self.evicted = evicted.to(device=self.device, dtype=torch.bool)

    def segment(self, expert: int):
        """Expert ``expert``'s stored tokens: (keys [k_e, B, L, d], values [k_e, B, L, d],
        positions [B, L] int32 or None, valid [B, L] bool or None). ``L`` >= every row's count;
        ``valid`` marks the filled slots that were not evicted (None: all are), positions are None
        when slot == position."""
        length = self.lengths[expert]
        keys, values = self.key_buffers[expert][:, :, :length], self.value_buffers[expert][:, :, :length]
        positions = self.slot_positions[expert][:, :length] if self.num_experts > 1 else None
        if self.num_experts == 1 or (self.batch_size == 1 and self.device.type == "cpu"):
            valid = None  # one expert, or exact lengths on CPU: every slot is filled
        else:
            valid = torch.arange(length, device=self.device) < self.counts[:, expert, None]
        if self.evicted is not None:
            slot_positions = positions.long() if positions is not None else torch.arange(length, device=self.device)
            evicted = F.pad(self.evicted, (0, self.seq_length - self.evicted.shape[1]))
            kept = ~evicted.gather(1, slot_positions.expand(self.batch_size, length).clamp_max(self.seq_length - 1))
            valid = kept if valid is None else valid & kept
        return keys, values, positions, valid

    def kernel_expert_ids(self) -> torch.Tensor:
        """[B, T] expert ids for the decode kernel (all zeros, a view of a reused buffer, for one expert)."""
        if self.expert_ids is not None:
            return self.expert_ids
        if self._zero_ids is None or self._zero_ids.shape[1] < self.seq_length:
            size = max(256, 2 * self.seq_length)
            self._zero_ids = torch.zeros(self.batch_size, size, dtype=torch.uint8, device=self.device)
        return self._zero_ids[:, : self.seq_length]

    def kernel_segments(self) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        """The buffers as the kernel's segments ``[B * capacity_e, k_e, d]`` (strided views) and
        the int32 ``[B, T]`` row of every token in its segment (``b * capacity_e + slot``)."""
        keys = [k.flatten(1, 2).transpose(0, 1) for k in self.key_buffers]
        values = [v.flatten(1, 2).transpose(0, 1) for v in self.value_buffers]
        capacity = torch.tensor([k.shape[2] for k in self.key_buffers], dtype=torch.int32, device=self.device)
        rows = torch.arange(self.batch_size, dtype=torch.int32, device=self.device)[:, None]
        return keys, values, rows * capacity[self.kernel_expert_ids().long()] + self.token_slot

    def expanded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All cached K/V at H_kv heads in token order: ([B, H_kv, T, d], [B, H_kv, T, d]).
        The reference read (native-size copies); the default read is ``segment_attention``."""
        if self.evicted is not None:
            raise NotImplementedError(
                "evicted tokens are masked by the segment read only; use attention.decode_kernel=torch"
            )
        return self._expand(self.key_buffers), self._expand(self.value_buffers)

    def _expand(self, buffers: list[torch.Tensor]) -> torch.Tensor:
        T = self.seq_length
        if self.num_experts == 1:
            return buffers[0][:, :, :T].index_select(0, self.expand_index[0]).transpose(0, 1)
        ids = self.expert_ids.long()
        onehot = self._one_hot(ids)
        slot = (onehot.cumsum(1) - onehot).gather(-1, ids[..., None]).squeeze(-1)  # [B, T]
        rows = torch.arange(self.batch_size, device=self.device)[:, None].expand_as(ids)
        full = None
        for e, buffer in enumerate(buffers):
            tokens = buffer.permute(1, 2, 0, 3)[rows, slot.clamp(max=buffer.shape[2] - 1)]  # [B, T, k_e, d]
            tokens = tokens.index_select(2, self.expand_index[e])
            full = tokens if full is None else torch.where((ids == e)[..., None, None], tokens, full)
        return full.transpose(1, 2)

    def nbytes(self) -> int:
        """Bytes in use: the stored tokens' K/V, plus expert ids, slot positions and token slots."""
        if not self.is_initialized:
            return 0
        tokens = self.batch_size * self.seq_length
        per_expert = self.counts.sum(0).tolist() if self.counts is not None else [tokens]
        total = 0
        for k, v, stored in zip(self.key_buffers, self.value_buffers, per_expert):
            total += stored * (k.shape[0] * k.shape[3] * k.element_size() + v.shape[0] * v.shape[3] * v.element_size())
        total += tokens * routed_token_bytes(self.num_experts)
        if self._token_slot is not None:
            total += tokens * self._token_slot.element_size()
        return total

    def nbytes_reserved(self) -> int:
        """Bytes allocated: every buffer at its capacity (in use + growth slack + scratch slots)."""
        tensors = self.key_buffers + self.value_buffers + self.slot_positions
        tensors += [t for t in (self._ids, self._token_slot) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seq_length + query_length, 0

    def get_seq_length(self) -> int:
        return self.seq_length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.__init__(self.groupings, self.router, self.decode_switch, self.read_switch)

    def _unsupported(self, *args, **kwargs):
        raise NotImplementedError(
            "the mixSGA/GQA cache supports greedy and sampled decoding; beam search, cache cropping and "
            "batch reshuffling are not implemented (pass a transformers DynamicCache via cache= for those)"
        )

    reorder_cache = crop = batch_repeat_interleave = batch_select_indices = _unsupported


class SharedKVLayer(CacheLayerMixin):
    """CLA borrower: holds nothing; ``update`` returns what its owner layer's ``update`` returned
    in this forward (the owner ran earlier, on the same tokens)."""

    is_sliding = False
    is_croppable = False

    def __init__(self, owner: MixedKVLayer):
        super().__init__()
        self.owner = owner
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        owner = self.owner
        new = key_states.shape[2]
        if owner.seq_length == new:  # first forward: the owner's own tokens (a view, no copy)
            return owner.expanded()
        if owner.read_switch is not None and owner.read_switch.active():
            return read_placeholders(owner, key_states, value_states, kernel=False)
        return owner.expanded()

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

    def nbytes_reserved(self) -> int:
        return 0


def layer_nbytes(layer: CacheLayerMixin, reserved: bool = False) -> int:
    """Bytes a cache layer holds (in use, or allocated with ``reserved``), counted from its tensors."""
    if hasattr(layer, "nbytes"):
        return layer.nbytes_reserved() if reserved else layer.nbytes()
    if not layer.is_initialized or layer.keys is None:
        return 0
    return layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()


class KVBudgetCache(Cache):
    """The cache of a converted model (built by ``build_cache(model)``): one layer object per
    decoder layer, each storing K/V at its method's size."""

    def __init__(self, layers: list[CacheLayerMixin]):
        super().__init__(layers=layers)

    def plan(self, max_tokens: int) -> None:
        """Size every mixed layer's buffers for ``max_tokens`` tokens per sequence (``MixedKVLayer.plan``);
        call before the first forward. ``generate()`` on a converted model does it."""
        for layer in self.layers:
            if isinstance(layer, MixedKVLayer):
                layer.plan(max_tokens)

    def nbytes(self) -> int:
        """Bytes in use (stored tokens' K/V and per-token metadata)."""
        return sum(layer_nbytes(layer) for layer in self.layers)

    def nbytes_reserved(self) -> int:
        """Bytes allocated: in use + growth slack of the buffers."""
        return sum(layer_nbytes(layer, reserved=True) for layer in self.layers)

    def kv_bytes_per_token(self) -> float:
        """Measured bytes in use per cached token (K + V of all layers, plus expert ids/positions)."""
        tokens = self.get_seq_length() * self.batch_size
        return self.nbytes() / tokens if tokens else 0.0

    def kv_bytes_reserved_per_token(self) -> float:
        """Allocated bytes per cached token (includes the buffers' growth slack)."""
        tokens = self.get_seq_length() * self.batch_size
        return self.nbytes_reserved() / tokens if tokens else 0.0

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
    batch = next(
        (
            layer.keys.shape[0]
            for layer in layers
            if layer.is_initialized and layer.keys is not None and layer.keys.numel()
        ),
        0,
    )
    total = sum(layer_nbytes(layer) for layer in layers)
    return total / (tokens * batch) if tokens and batch else 0.0
