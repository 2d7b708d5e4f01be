"""Token-to-expert routing: the sigmoid router (eq. 1), progressive top-k (eq. 2) with capacities
that never exceed the budget, argmax decode routing (eq. 3), the budget-holding decode policy,
the router's gradient estimators and the prefill/decode consistency loss (eqs. 4-5)."""

from __future__ import annotations

import logging
import math
import weakref
from dataclasses import dataclass, field
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

# per-token routing modes of RoutingContext; "causal" applies the configured decode policy to every token
ROUTING_MODES = ("auto", "topk", "argmax", "causal", "fixed")
DECODE_POLICIES = ("budget", "balanced", "calibrated", "argmax")
_EPS = 1e-9
log = logging.getLogger(__name__)
_MARGIN = 1e4  # lifts the calibrated choice above every logit in the quota's ranking


@lru_cache(maxsize=4096)
def capacity_counts(n: int, capacity: tuple[float, ...], costs: tuple[float, ...]) -> tuple[int, ...]:
    """How many of ``n`` tokens each expert takes under top-k routing (eq. 2), never over budget.

    capacity: shares rho_e (sum 1); costs: each expert's KV per token as a fraction of native,
    most expensive first. Largest remainder first (each count is floor or ceil of rho_e * n, the
    counts sum to n); then, while sum_e n_e c_e exceeds sum_e rho_e c_e * n, a rounded-up expert
    swaps with a cheaper rounded-down one, the swap that gives up the least budget first (so as
    much of the budget as possible is used). This always ends within budget: every swap lowers the
    cost, and when none is left the rounded-up set is the cheapest fractional experts, whose
    excess is W * (mean cost of that set - mean cost of the rest) <= 0 (W = the rest's fractional
    parts summed).
    """
    exact = [r * n for r in capacity]
    counts = [math.floor(x + _EPS) for x in exact]
    frac = [max(x - c, 0.0) for x, c in zip(exact, counts)]
    order = sorted(range(len(exact)), key=lambda e: (-frac[e], e))
    up = set(order[: n - sum(counts)])
    budget = sum(x * c for x, c in zip(exact, costs))

    def cost() -> float:
        return sum((counts[e] + (e in up)) * costs[e] for e in range(len(costs)))

    while cost() > budget + _EPS:
        down = [e for e in range(len(costs)) if e not in up and frac[e] > _EPS]
        swaps = [(costs[src] - costs[dst], src, dst) for src in up for dst in down if costs[dst] < costs[src]]
        _, src, dst = min(swaps)  # never empty while over budget (argument above)
        up.remove(src)
        up.add(dst)
    return tuple(counts[e] + (e in up) for e in range(len(costs)))


@lru_cache(maxsize=64)
def capacity_table(length: int, capacity: tuple[float, ...], costs: tuple[float, ...], device: str) -> torch.Tensor:
    """[length + 1, E] long on ``device``: row n holds ``capacity_counts(n, ...)``, so a batch's
    per-row quotas are one gather by its real-token counts, on the device (no host sync)."""
    rows = [capacity_counts(n, capacity, costs) for n in range(length + 1)]
    return torch.tensor(rows, dtype=torch.long, device=device)


def progressive_topk(
    scores: torch.Tensor, capacity: list[float], costs: list[float], token_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Exclusive expert-choice assignment per sequence (paper eq. 2).

    scores: [B, L, E] router scores; capacity: E shares summing to 1; costs: E per-token KV costs
    (most expensive first); token_mask: [B, L] bool, False on padding. Experts choose in order:
    expert e takes its ``capacity_counts`` share of the highest-scoring still-free real tokens of
    each sequence (ties go to the earlier position); the last expert takes every real token left.
    Padding tokens get the last (cheapest) expert and count toward no capacity. Returns [B, L] long.
    """
    batch, length, experts = scores.shape
    if token_mask is None:
        token_mask = torch.ones(batch, length, dtype=torch.bool, device=scores.device)
    free = token_mask.clone()
    table = capacity_table(length, tuple(capacity), tuple(costs), str(scores.device))
    quota = table[token_mask.sum(dim=1)]  # [B, E]
    ids = torch.full((batch, length), experts - 1, dtype=torch.long, device=scores.device)
    positions = torch.arange(length, device=scores.device).expand(batch, length)
    for e in range(experts - 1):
        masked = scores[..., e].float().masked_fill(~free, -math.inf)
        order = torch.sort(masked, dim=1, descending=True, stable=True).indices
        rank = torch.empty_like(order).scatter_(1, order, positions)
        chosen = (rank < quota[:, e, None]) & free
        ids = torch.where(chosen, e, ids)  # not ids[chosen] = e: boolean indexing syncs with the host
        free &= ~chosen
    return ids


def budget_decode_route(
    scores: torch.Tensor,
    costs: torch.Tensor,
    allowed: torch.Tensor,
    budget: float,
    spent: torch.Tensor,
    tokens: torch.Tensor,
    token_mask: torch.Tensor | None = None,
    cheapest: int | None = None,
    band: DecodeBand | None = None,
) -> torch.Tensor:
    """The ``budget`` and ``balanced`` decode policies: route tokens one position at a time under a
    running quota on the deviation ``D_t = spent_t - budget * t`` of each sequence.

    scores: [B, L, E] router logits (higher = preferred); costs: [E] KV per token (fraction of
    native); allowed: [E] bool, the experts the ratio gives tokens; budget: sum_e rho_e c_e; spent [B]
    float64 and tokens [B] long: this sequence's running totals, updated in place; token_mask: [B, L],
    False on padding (those get the cheapest allowed expert and count nothing); cheapest: that
    expert's index if the caller knows it (saves a host sync per call); band: the ``balanced``
    policy's two-sided band (``DecodeBand``), None for the one-sided ``budget`` policy.

    ``budget`` (band None): a token takes its preferred expert if that keeps ``D <= 0``, else the
    best-scoring one that does, so every prefix stays within the budget. The cheapest allowed expert
    always fits: budget is a convex combination of allowed costs, so c_min <= budget, and with
    spent <= budget * t, spent + c_min <= budget * (t + 1). It may spend less than the budget.

    ``balanced`` (band set): ``-band.floor <= D <= band.credit`` instead, and the first
    ``band.sink`` real tokens of a sequence routed from its start take the most expensive allowed
    expert (the attention sink is never demoted). Some expert always fits because
    credit + floor >= c_max - c_min: if D <= credit - (c_max - budget) the most expensive one does,
    else D > -floor + (budget - c_min) and the cheapest one does. So every prefix of t tokens spends
    budget * t within [-floor, +credit]: at most ``credit`` above the budget (the sinks' excess) and
    never more than ``floor`` below it, i.e. the realised share converges to the budget.
    Returns ids [B, L] long.
    """
    batch, length, _ = scores.shape
    costs64 = costs.double().to(scores.device)
    allowed = allowed.to(scores.device)
    if cheapest is None:
        cheapest = int(torch.where(allowed, costs64, math.inf).argmin())
    preference = scores.float().masked_fill(~allowed, -math.inf)  # an expert without capacity never fits
    credit = 0.0 if band is None else band.credit
    ids = torch.empty(batch, length, dtype=torch.long, device=scores.device)
    for t in range(length):
        deviation = spent[:, None] + costs64 - (tokens + 1).double()[:, None] * budget  # [B, E] after each choice
        fits = deviation <= credit + _EPS
        if band is not None:
            fits &= deviation >= -band.floor - _EPS
        choice = preference[:, t].masked_fill(~fits, -math.inf).argmax(dim=-1)
        if band is not None and band.sink:
            choice = torch.where(tokens < band.sink, band.expensive, choice)
        if token_mask is None:
            spent += costs64[choice]
            tokens += 1
        else:
            real = token_mask[:, t]
            choice = torch.where(real, choice, cheapest)
            spent += torch.where(real, costs64[choice], 0.0)
            tokens += real
        ids[:, t] = choice
    return ids


@dataclass(frozen=True)
class DecodeBand:
    """The ``balanced`` decode policy's limits on ``D = spent - budget * tokens`` (in native-KV
    token units): ``credit`` above (room for the sinks), ``floor`` below (how far a sequence may
    fall behind its budget before an expensive expert is forced); ``sink``: how many first real
    tokens take expert ``expensive`` (0 once the stream did not start at the sequence's start)."""

    credit: float
    floor: float
    sink: int
    expensive: int

    @classmethod
    def for_router(cls, costs: list[float], allowed: list[bool], budget: float, sink: int, slack: float) -> DecodeBand:
        """credit = max(sink, 1) * (c_max - budget); floor = max(slack, 1) * (c_max - c_min): the
        smallest band that always has room (credit + floor >= c_max - c_min, floor >= budget - c_min)
        widened by ``slack`` tokens' worth of upgrades, which lets the router choose *which* tokens
        get the expensive expert instead of being forced on a fixed rhythm."""
        usable = [c for c, ok in zip(costs, allowed) if ok]
        expensive = max((e for e in range(len(costs)) if allowed[e]), key=lambda e: (costs[e], -e))
        c_max, c_min = max(usable), min(usable)
        return cls(max(sink, 1) * (c_max - budget), max(slack, 1.0) * (c_max - c_min), sink, expensive)


def calibrate_thresholds(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Logit thresholds that make progressive top-k (eq. 2) a per-token rule, from top-k decisions.

    logits: [N, E] router logits of N real tokens; ids: [N] the experts top-k gave them. Top-k
    lets expert e take the highest-scoring tokens not taken by experts before it; over many tokens
    that is "z_e above a threshold tau_e". tau_e is the quantile of z_e over the tokens still free
    at expert e (ids >= e) that leaves above it the share top-k gave e among them. Returns [E]
    float32: tau_e; +inf for an expert top-k gave nothing, -inf for one that took every token
    still free (the last expert with tokens), so every token has a first expert above threshold.
    """
    experts = logits.shape[-1]
    thresholds = torch.full((experts,), -math.inf)
    for e in range(experts):
        free = ids >= e
        share = (ids[free] == e).double().mean().item() if free.any() else 0.0
        if share <= 0:
            thresholds[e] = math.inf
        elif share < 1:
            thresholds[e] = torch.quantile(logits[free, e].float().cpu(), 1 - share, interpolation="midpoint")
    return thresholds


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

    mode (one of ROUTING_MODES): ``auto`` (top-k for a prompt/training sequence, the decode policy
    for tokens that extend a non-empty cache: the paper's Fig. 2), ``topk``, ``argmax`` (plain
    eq. 3 for every token), ``causal`` (the decode policy for every token, in order: what decoding
    really does, so perplexity under it is causal) or ``fixed`` (replay ``fixed_ids[layer]``, used
    to check decoding against recomputation). decode_policy (one of DECODE_POLICIES): ``budget``
    (running quota over the router's argmax preference, see ``budget_decode_route``),
    ``calibrated`` (the same quota over the preference of top-k's calibrated thresholds,
    ``TokenRouter.decode_thresholds``) or ``argmax`` (eq. 3, the paper's protocol).
    The top-level model's forward pre-hook fills ``token_mask`` and ``decoding`` for each call.
    """

    mode: str = "auto"
    decode_policy: str = "budget"
    sink_tokens: int = 1
    decode_slack: float = 4.0
    token_mask: torch.Tensor | None = None
    decoding: bool = False
    fixed_ids: dict[int, torch.Tensor] = field(default_factory=dict)
    stats: RoutingStats | None = None
    generator: torch.Generator | None = None
    warned_uncalibrated: bool = False


class TokenRouter(nn.Module):
    """Per-layer router: ``sigmoid(x @ phi + beta)`` over E experts (eq. 1), He-initialised, bias 0.

    ``route(x)`` returns gates [B, L, E] whose value is the hard one-hot assignment (eq. 2, eq. 3
    or the budget decode policy). Under autograd the gates also carry the router's gradient
    (``router_grad``; onehot = the assignment, s = sigmoid(router logits)):

    * ``counterfactual``: ``onehot + d - onehot * sum_e d_e`` with d = s - stopgrad(s) on the
      sigmoid scores s = sigmoid(z); expert e's score receives ``<KV_e - KV_selected, dL/dKV>``
      (summed over K and V), the first-order change of the loss if the token moved to e, for every
      expert the ratio gives tokens (the last one included). It acts on the sigmoid score, the
      quantity top-k ranks, so the logit's gradient is damped by s(1 - s) where the router is
      confident; on the logit directly it overrode the consistency loss (bench-replica, 120 steps:
      argmax/top-k agreement 0.63 vs 0.94, causal perplexity 9.92 vs 8.10 for straight-through).
    * ``straight_through``: the selected entry carries ``1 + s - stopgrad(s)`` (s = sigmoid(z)): the
      loss reaches only the selected expert's score ("scale this token's K/V"), not the others.
    * ``aux_only``: no LM gradient; the router learns from the consistency loss alone.

    Experts whose capacity share is 0 are never chosen outside top-k (so 1:0:0 decodes like the
    original). costs: per-expert K/V per token as a fraction of native (most expensive first); the
    budget policy keeps per-sequence running totals, reset by every forward that is not a decode
    step. The router remembers its last logits and ids for the aux loss (``aux_loss()``) and the
    cache (``last_ids``), and its last input only by weak reference (so K and V share one decision
    without keeping the [B, L, D] activation alive).

    ``decode_thresholds`` [E] (a saved buffer; all +inf until ``calibrate_decode_thresholds`` in
    ``calibration.py`` sets it; calibrated thresholds always hold a -inf): the logit thresholds of
    ``calibrate_thresholds``. Under the ``calibrated`` decode policy a token prefers the first
    expert e with z_e > tau_e (progressive top-k applied one token at a time), then the budget
    quota applies as for ``budget``; without thresholds it routes like ``budget`` (one warning).
    """

    def __init__(
        self,
        hidden_size: int,
        capacity: list[float],
        layer_idx: int,
        context: RoutingContext,
        router_grad: str = "counterfactual",
        random: bool = False,
        *,
        costs: list[float],
    ):
        super().__init__()
        if len(costs) != len(capacity):
            raise ValueError(f"{len(costs)} costs for {len(capacity)} experts")
        self.proj = nn.Linear(hidden_size, len(capacity))
        nn.init.kaiming_normal_(self.proj.weight, nonlinearity="relu")
        nn.init.zeros_(self.proj.bias)
        self.capacity = list(capacity)
        self.costs = list(costs)
        self._costs64 = torch.tensor(costs, dtype=torch.float64)  # built once, not on every decode step
        self.budget = sum(r * c for r, c in zip(capacity, costs))
        self.layer_idx = layer_idx
        self.router_grad = router_grad
        self._no_capacity = torch.tensor([c == 0 for c in capacity])
        self._cheapest = min((e for e in range(len(costs)) if capacity[e] > 0), key=lambda e: (costs[e], e))
        self.register_buffer("decode_thresholds", torch.full((len(capacity),), math.inf))
        self._uncalibrated = True
        self.random = random
        if random:
            self.requires_grad_(False)
        object.__setattr__(self, "context", context)  # shared, not a submodule
        self._last_input: weakref.ref | None = None
        self._last_gates: torch.Tensor | None = None
        self._spent: torch.Tensor | None = None  # budget policy: [B] K/V spent, float64
        self._tokens: torch.Tensor | None = None  # budget policy: [B] tokens routed
        self._decode_band: DecodeBand | None = None  # balanced policy: this sequence's band
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
        if self._last_input is not None and self._last_input() is x:
            return self._last_gates
        ctx = self.context
        logits = self.proj(x).float()
        mask = ctx.token_mask
        if mask is not None and mask.shape != x.shape[:2]:
            mask = None
        mode = ctx.mode
        if mode not in ROUTING_MODES or ctx.decode_policy not in DECODE_POLICIES:
            raise ValueError(
                f"routing mode {mode!r} / decode policy {ctx.decode_policy!r}: choose from "
                f"{', '.join(ROUTING_MODES)} / {', '.join(DECODE_POLICIES)}"
            )
        if mode == "auto":
            mode = "causal" if ctx.decoding else "topk"
        if mode == "causal" and ctx.decode_policy == "argmax":
            mode = "argmax"
        if not ctx.decoding or self._spent is None or self._spent.shape[0] != x.shape[0]:
            self._spent = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
            self._tokens = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
            # balanced policy: built once per sequence, not on every decode step; the sinks only when
            # the policy sees the sequence's first token (causal routing from an empty cache)
            self._decode_band = self._band(not ctx.decoding and mode == "causal")
        ids = self._assign(logits, mode, mask)
        # one-hot by comparison: F.one_hot checks the ids' range on the host (a sync)
        gates = (ids[..., None] == torch.arange(self.num_experts, device=ids.device)).to(logits.dtype)
        if not self.random and torch.is_grad_enabled():
            gates = self._with_gradient(gates, logits)
        self._last_input, self._last_gates = weakref.ref(x), gates
        self.last_logits, self.last_ids, self.last_mask, self.last_topk = logits, ids, mask, mode == "topk"
        if ctx.stats is not None:
            self._record(ctx.stats, logits, ids, mask, mode)
        return gates

    def _with_gradient(self, onehot: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """The gates' value stays exactly ``onehot``; only their gradient depends on router_grad."""
        if self.router_grad == "straight_through":
            s = torch.sigmoid(logits)
            return onehot + onehot * (s - s.detach())
        if self.router_grad == "counterfactual":
            s = torch.sigmoid(logits)
            d = (s - s.detach()).masked_fill(self._no_capacity.to(logits.device), 0.0)
            return onehot + d - onehot * d.sum(dim=-1, keepdim=True)
        return onehot

    def _assign(self, logits: torch.Tensor, mode: str, mask: torch.Tensor | None) -> torch.Tensor:
        if mode == "fixed":
            return self.context.fixed_ids[self.layer_idx][:, -logits.shape[1] :].to(logits.device).long()
        if self.random:
            gen = self.context.generator
            if mode == "topk":
                noise = torch.rand(logits.shape, generator=gen, device="cpu").to(logits.device)
                return progressive_topk(noise, self.capacity, self.costs, mask)
            probs = torch.tensor(self.capacity).expand(logits.shape[0] * logits.shape[1], -1)
            draws = torch.multinomial(probs, 1, generator=gen).view(logits.shape[:2]).to(logits.device)
            if mode == "argmax":
                return draws
            logits = F.one_hot(draws, self.num_experts).float()  # the draw is the preference
        if mode == "topk":
            return progressive_topk(torch.sigmoid(logits), self.capacity, self.costs, mask)
        if mode == "argmax":
            return self.argmax(logits)
        return budget_decode_route(
            self.decode_preference(logits.detach()),
            self._costs64,
            ~self._no_capacity,
            self.budget,
            self._spent,
            self._tokens,
            mask,
            self._cheapest,
            self._decode_band,
        )

    def _band(self, from_start: bool) -> DecodeBand | None:
        """The ``balanced`` policy's band for a sequence (None under the other policies)."""
        ctx = self.context
        if ctx.decode_policy != "balanced":
            return None
        sink = ctx.sink_tokens if from_start else 0
        return DecodeBand.for_router(self.costs, [c > 0 for c in self.capacity], self.budget, sink, ctx.decode_slack)

    def decode_preference(self, logits: torch.Tensor) -> torch.Tensor:
        """[B, L, E] scores the budget quota ranks experts by: the logits (``budget``), or, under
        ``calibrated``, the logits plus a margin on the first expert above its threshold."""
        if self.context.decode_policy != "calibrated" or self.random:
            return logits
        thresholds = self.decode_thresholds.to(device=logits.device, dtype=logits.dtype)
        if not self.context.decoding:  # checked once per sequence, not per decode step
            self._uncalibrated = bool(torch.isposinf(thresholds).all())
            if self._uncalibrated and not self.context.warned_uncalibrated:
                log.warning(
                    "layer %d: decode_policy 'calibrated' has no thresholds yet, so it routes like 'budget'; "
                    "run calibrate_decode_thresholds(model, batches) on training data",
                    self.layer_idx,
                )
                self.context.warned_uncalibrated = True  # once per model, not once per layer
        if self._uncalibrated:
            return logits
        first = (logits > thresholds).long().argmax(dim=-1, keepdim=True)  # the first expert above its threshold
        return logits + torch.zeros_like(logits).scatter_(-1, first, _MARGIN)

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
