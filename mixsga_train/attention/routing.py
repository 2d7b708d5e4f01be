"""Token-to-expert routing: the sigmoid router (eq. 1), progressive top-k (eq. 2), argmax decode
routing (eq. 3) and the prefill/decode consistency loss (eqs. 4-5)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

ROUTING_MODES = ("auto", "topk", "argmax", "fixed")


def progressive_topk(scores: torch.Tensor, capacity: list[float], token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Exclusive expert-choice assignment per sequence (paper eq. 2).

    scores: [B, L, E] router scores; capacity: E shares summing to 1; token_mask: [B, L] bool,
    False on padding. Experts choose in order: expert e takes the ceil(rho_e * n) highest-scoring
    still-free real tokens of each sequence (n = that sequence's real length; ties go to the
    earlier position); the last expert takes every real token left. Padding tokens get the last
    (cheapest) expert and count toward no capacity. Returns expert ids [B, L] long.
    """
    batch, length, experts = scores.shape
    if token_mask is None:
        token_mask = torch.ones(batch, length, dtype=torch.bool, device=scores.device)
    free = token_mask.clone()
    n_real = token_mask.sum(dim=1)
    ids = torch.full((batch, length), experts - 1, dtype=torch.long, device=scores.device)
    positions = torch.arange(length, device=scores.device).expand(batch, length)
    for e in range(experts - 1):
        # ceil with a guard against float noise (0.3 * 10 = 3.0000000000000004)
        k = torch.ceil(capacity[e] * n_real.double() - 1e-9).long()
        k = torch.minimum(k, free.sum(dim=1))
        masked = scores[..., e].float().masked_fill(~free, -math.inf)
        order = torch.sort(masked, dim=1, descending=True, stable=True).indices
        rank = torch.empty_like(order).scatter_(1, order, positions)
        chosen = (rank < k[:, None]) & free
        ids = torch.where(chosen, e, ids)  # not ids[chosen] = e: boolean indexing syncs with the host
        free &= ~chosen
    return ids


def expert_counts(ids: torch.Tensor, num_experts: int, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """[E] long: how many real tokens each expert received."""
    real = ids if token_mask is None else ids[token_mask]
    return torch.bincount(real.reshape(-1), minlength=num_experts)


def router_aux_loss(logits: torch.Tensor, ids: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Prefill/decode consistency loss of one layer (eq. 4): BCE-with-logits between the router
    logits [B, L, E] and the detached one-hot of the top-k assignment ids [B, L], mean over real
    tokens and experts. Minimising it makes argmax routing agree with top-k routing."""
    target = (ids.detach()[..., None] == torch.arange(logits.shape[-1], device=ids.device)).to(logits.dtype)
    loss = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(-1)
    if token_mask is None:
        return loss.mean()
    mask = token_mask.to(loss.dtype)
    return (loss * mask).sum() / mask.sum().clamp_min(1)


@dataclass
class RoutingStats:
    """Counts of real tokens per expert at prefill/training and at decode, and how often argmax
    routing agrees with the top-k decision on top-k-routed tokens."""

    num_experts: int
    prefill: torch.Tensor = None
    decode: torch.Tensor = None
    agree: int = 0
    compared: int = 0

    def __post_init__(self):
        self.prefill = torch.zeros(self.num_experts, dtype=torch.long)
        self.decode = torch.zeros(self.num_experts, dtype=torch.long)

    def fractions(self, which: str) -> list[float]:
        counts = getattr(self, which).double()
        total = counts.sum().item()
        return [c / total for c in counts.tolist()] if total else [0.0] * self.num_experts

    @property
    def agreement(self) -> float | None:
        return self.agree / self.compared if self.compared else None


@dataclass
class RoutingContext:
    """Per-model routing state shared by every layer's router.

    mode: ``auto`` (top-k for a prompt/training sequence, argmax for tokens that extend a
    non-empty cache: the paper's Fig. 2), ``topk``, ``argmax`` (causal: every token by its own
    scores) or ``fixed`` (replay ``fixed_ids[layer]``, used to check decoding against recomputation).
    The top-level model's forward pre-hook fills ``token_mask`` and ``decoding`` for each call.
    """

    mode: str = "auto"
    token_mask: torch.Tensor | None = None
    decoding: bool = False
    fixed_ids: dict[int, torch.Tensor] = field(default_factory=dict)
    stats: RoutingStats | None = None
    generator: torch.Generator | None = None
    last_aux_loss: torch.Tensor | None = None


class TokenRouter(nn.Module):
    """Per-layer router: ``sigmoid(x @ phi + beta)`` over E experts (eq. 1), He-initialised, bias 0.

    ``route(x)`` returns gates [B, L, E]: the hard one-hot assignment (eq. 2 or eq. 3); with
    ``straight_through`` the selected entry carries ``1 + s - stopgrad(s)`` so the LM loss reaches
    the router while the forward stays identical to inference. Argmax decode routing skips
    experts whose capacity share is 0. It remembers its last logits and
    ids for the aux loss (``aux_loss()``) and for the cache (``last_ids``).
    """

    def __init__(
        self,
        hidden_size: int,
        capacity: list[float],
        layer_idx: int,
        context: RoutingContext,
        router_grad: str = "straight_through",
        random: bool = False,
    ):
        super().__init__()
        self.proj = nn.Linear(hidden_size, len(capacity))
        nn.init.kaiming_normal_(self.proj.weight, nonlinearity="relu")
        nn.init.zeros_(self.proj.bias)
        self.capacity = list(capacity)
        self.layer_idx = layer_idx
        self.straight_through = router_grad == "straight_through"
        # argmax never picks an expert the ratio gives no tokens (so 1:0:0 decodes like the original)
        self._no_capacity = torch.tensor([c == 0 for c in capacity])
        self.random = random
        if random:
            self.requires_grad_(False)
        object.__setattr__(self, "context", context)  # shared, not a submodule
        self._last_input: torch.Tensor | None = None
        self._last_gates: torch.Tensor | None = None
        self.last_logits: torch.Tensor | None = None
        self.last_ids: torch.Tensor | None = None
        self.last_mask: torch.Tensor | None = None
        self.last_topk = False

    @property
    def num_experts(self) -> int:
        return len(self.capacity)

    def route(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, L, D] attention input -> gates [B, L, E]. Routed once per input tensor, so the K
        and V projections of one attention call share the decision."""
        if x is self._last_input:
            return self._last_gates
        ctx = self.context
        logits = self.proj(x).float()
        mask = ctx.token_mask
        if mask is not None and mask.shape != x.shape[:2]:
            mask = None
        mode = ctx.mode if ctx.mode != "auto" else ("argmax" if ctx.decoding else "topk")
        ids = self._assign(logits, mode, mask)
        # one-hot by comparison: F.one_hot checks the ids' range on the host (a sync)
        gates = (ids[..., None] == torch.arange(self.num_experts, device=ids.device)).to(logits.dtype)
        if self.straight_through and not self.random and torch.is_grad_enabled():
            s = torch.sigmoid(logits)
            gates = gates + gates * (s - s.detach())  # value exactly one-hot, gradient d(gate)/ds = 1
        self._last_input, self._last_gates = x, gates
        self.last_logits, self.last_ids, self.last_mask, self.last_topk = logits, ids, mask, mode == "topk"
        if ctx.stats is not None:
            self._record(ctx.stats, logits, ids, mask, mode)
        return gates

    def _assign(self, logits: torch.Tensor, mode: str, mask: torch.Tensor | None) -> torch.Tensor:
        if mode == "fixed":
            return self.context.fixed_ids[self.layer_idx][:, -logits.shape[1]:].to(logits.device).long()
        if self.random:
            gen = self.context.generator
            if mode == "topk":
                noise = torch.rand(logits.shape, generator=gen, device="cpu").to(logits.device)
                return progressive_topk(noise, self.capacity, mask)
            probs = torch.tensor(self.capacity).expand(logits.shape[0] * logits.shape[1], -1)
            return torch.multinomial(probs, 1, generator=gen).view(logits.shape[:2]).to(logits.device)
        if mode == "topk":
            return progressive_topk(torch.sigmoid(logits), self.capacity, mask)
        return self.argmax(logits)

    def argmax(self, logits: torch.Tensor) -> torch.Tensor:
        """Decode routing (eq. 3) over the experts that the ratio gives tokens: [B, L, E] -> [B, L]."""
        return logits.masked_fill(self._no_capacity.to(logits.device), -math.inf).argmax(dim=-1)

    @torch.no_grad()
    def _record(self, stats: RoutingStats, logits, ids, mask, mode):
        counts = expert_counts(ids, self.num_experts, mask).cpu()
        if self.context.decoding:
            stats.decode += counts
        else:
            stats.prefill += counts
        if mode == "topk":
            agree = self.argmax(logits) == ids
            agree = agree if mask is None else agree[mask]
            stats.agree += int(agree.sum())
            stats.compared += agree.numel()

    def aux_loss(self) -> torch.Tensor | None:
        """This layer's eq. 4 loss for its last top-k routing, or None (no top-k ran, random router)."""
        if self.random or not self.last_topk or self.last_logits is None:
            return None
        return router_aux_loss(self.last_logits, self.last_ids, self.last_mask)
