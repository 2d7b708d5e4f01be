"""Drop-in replacements for an attention layer's ``k_proj`` / ``v_proj``.

Every replacement returns K/V at the model's native H_kv heads, so each family's own attention
code (RoPE, masking, scaling, softcapping, sliding windows, SDPA/eager kernels) runs unchanged.
Head grouping commutes with RoPE (every head of a token gets the same rotation), so grouping
before RoPE equals the paper's grouping after it. The KV cache (``cache.py``) stores only the
distinct heads and expands them on read.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .heads import HeadGrouping, pool_head_weights
from .routing import TokenRouter


class MixedHeadProjection(nn.Linear):
    """mixSGA K or V projection (eqs. 6-9): the pretrained, weight-shared projection, then each
    token's heads replaced by the group means of the expert its router picked.

    In: x [B, L, D]. Out: [B, L, H_kv * d_h]. Parameters keep the original names and shapes
    (``weight``, ``bias``); the router is owned by the attention module, not by this projection.

    Each expert's grouping (mean over a group, eq. 7, copied back to the group's heads, eq. 8) is
    one [H_kv, H_kv] averaging matrix ``A_e``; a token with gates g [E] gets ``sum_e g_e A_e``
    applied to its heads, one batched matmul for all experts (eq. 9). With one-hot gates this is
    exactly the selected expert's grouping (the identity for an expert that keeps every head, so
    1:0:0 is the original layer bit for bit), and the gates' gradient is ``<A_e K, dL/dK>`` per
    expert, what the router's estimators (``routing.py``) need. On CPU this is 3-16x faster than
    one pooling pass per expert (fwd, fwd+bwd; prefill and decode shapes).
    """

    def __init__(self, linear: nn.Linear, groupings: list[HeadGrouping], head_dim: int, router: TokenRouter):
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        self.weight = linear.weight
        self.bias = linear.bias
        self.head_dim = head_dim
        self.native_kv_heads = groupings[0].native_kv_heads
        self.num_experts = len(groupings)
        averaging = torch.stack([g.pool[g.expand_index] for g in groupings])  # [E, H_kv, H_kv]: row h -> head h
        self.register_buffer(
            "averaging", averaging.to(device=linear.weight.device, dtype=linear.weight.dtype), persistent=False
        )
        object.__setattr__(self, "router", router)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        gates = self.router.route(x).to(y.dtype)  # [B, L, E]
        heads = y.view(*y.shape[:-1], self.native_kv_heads, self.head_dim)
        mixing = (gates @ self.averaging.flatten(1)).view(*gates.shape[:-1], self.native_kv_heads, -1)
        return (mixing @ heads).flatten(-2)


class PooledHeadProjection(nn.Linear):
    """GQA K or V projection: ``kv_heads`` mean-pooled heads (GQA's mean-pooling init), each
    copied back to the native heads of its group. Out: [B, L, H_kv * d_h]; weight [k * d_h, D]."""

    def __init__(self, linear: nn.Linear, grouping: HeadGrouping, head_dim: int):
        weight, bias = pool_head_weights(
            linear.weight.data, None if linear.bias is None else linear.bias.data, grouping, head_dim
        )
        super().__init__(
            linear.in_features,
            grouping.kv_heads * head_dim,
            bias=bias is not None,
            device=weight.device,
            dtype=weight.dtype,
        )
        with torch.no_grad():
            self.weight.copy_(weight)
            if bias is not None:
                self.bias.copy_(bias)
        self.head_dim = head_dim
        self.register_buffer("expand_index", grouping.expand_index, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        heads = y.view(*y.shape[:-1], -1, self.head_dim)
        return heads.index_select(-2, self.expand_index).flatten(-2)


class SharedKVOwner(nn.Linear):
    """CLA: the K or V projection of a group's first layer; keeps its output of this forward for the
    ``borrowers`` layers of its group. Without autograd (inference, generate) the reference is
    dropped after the last borrower's read. With autograd it is kept until the next forward:
    autograd saves the tensor for backward anyway, and gradient checkpointing recomputes the
    borrowers during backward, after the owner ran."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, borrowers: int):
        super().__init__(
            weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype
        )
        with torch.no_grad():
            self.weight.copy_(weight)
            if bias is not None:
                self.bias.copy_(bias)
        self.borrowers = borrowers
        self.last_output: torch.Tensor | None = None
        self._reads_left = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        self.last_output, self._reads_left = (out, self.borrowers) if self.borrowers else (None, 0)
        return out

    def lend(self) -> torch.Tensor | None:
        """This forward's output for one borrower (released after the last borrower's read)."""
        out = self.last_output
        self._reads_left -= 1
        if self._reads_left <= 0 and not torch.is_grad_enabled():
            self.last_output = None
        return out


class SharedKVBorrower(nn.Module):
    """CLA: a layer without its own K/V projection; returns its owner's output for this forward."""

    def __init__(self, owner: SharedKVOwner, owner_layer: int):
        super().__init__()
        object.__setattr__(self, "owner", owner)
        self.owner_layer = owner_layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.owner.lend()
        if out is None or out.shape[:-1] != x.shape[:-1]:
            raise RuntimeError(f"CLA: layer {self.owner_layer} must run before the layers that share its K/V")
        return out

    def extra_repr(self) -> str:
        return f"shares K/V of layer {self.owner_layer}"
