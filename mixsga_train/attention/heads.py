"""Contiguous KV-head groups: which native heads an expert averages (paper eq. 7) and copies back (eq. 8)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch


def head_partition(native_kv_heads: int, kv_heads: int) -> tuple[tuple[int, ...], ...]:
    """Split heads 0..H_kv-1 into ``kv_heads`` contiguous groups whose sizes differ by at most one.

    Larger groups come first: ``head_partition(4, 2) == ((0, 1), (2, 3))`` (the paper's G_2) and
    ``head_partition(3, 2) == ((0, 1), (2,))`` (an uneven partition for H_kv = 3).
    """
    if not 1 <= kv_heads <= native_kv_heads:
        raise ValueError(f"kv_heads={kv_heads} must be in [1, {native_kv_heads}]")
    base, extra = divmod(native_kv_heads, kv_heads)
    groups, start = [], 0
    for g in range(kv_heads):
        size = base + (1 if g < extra else 0)
        groups.append(tuple(range(start, start + size)))
        start += size
    return tuple(groups)


@dataclass(frozen=True)
class HeadGrouping:
    """One expert's view of the native KV heads: ``kv_heads`` contiguous groups of ``native_kv_heads``."""

    native_kv_heads: int
    kv_heads: int

    @cached_property
    def groups(self) -> tuple[tuple[int, ...], ...]:
        return head_partition(self.native_kv_heads, self.kv_heads)

    @cached_property
    def pool(self) -> torch.Tensor:
        """[kv_heads, H_kv] averaging matrix: row g holds 1/|g| on the heads of group g (eq. 7)."""
        pool = torch.zeros(self.kv_heads, self.native_kv_heads)
        for g, heads in enumerate(self.groups):
            pool[g, list(heads)] = 1.0 / len(heads)
        return pool

    @cached_property
    def expand_index(self) -> torch.Tensor:
        """[H_kv] long: the group of each native head, so ``pooled[..., expand_index, :]`` is eq. 8."""
        return torch.tensor([g for g, heads in enumerate(self.groups) for _ in heads], dtype=torch.long)

    @cached_property
    def representative(self) -> torch.Tensor:
        """[kv_heads] long: the first native head of each group. After eq. 8 every head of a group
        holds the group mean, so reading these heads recovers the pooled K/V exactly."""
        return torch.tensor([heads[0] for heads in self.groups], dtype=torch.long)


def pool_head_weights(weight: torch.Tensor, bias: torch.Tensor | None, grouping: HeadGrouping, head_dim: int):
    """Mean-pool a K/V projection's per-head rows into ``grouping.kv_heads`` heads (GQA-style init).

    weight: [H_kv * d_h, D] -> [kv_heads * d_h, D]; bias: [H_kv * d_h] -> [kv_heads * d_h].
    """
    w = weight.view(grouping.native_kv_heads, head_dim, -1)
    pool = grouping.pool.to(w.dtype).to(w.device)
    pooled_w = torch.einsum("gh,hdi->gdi", pool, w).reshape(grouping.kv_heads * head_dim, -1)
    pooled_b = None
    if bias is not None:
        pooled_b = (pool @ bias.view(grouping.native_kv_heads, head_dim)).reshape(-1)
    return pooled_w, pooled_b
