"""The attention variant to convert a model to, as one typed, validated dataclass.

``method`` picks the variant; the other fields belong to one method each (documented below).
``resolve(native_kv_heads, num_layers)`` checks everything against the model's shape and
returns a ``ResolvedAttention`` whose numbers are final, so errors surface before any weights
are touched.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .budget import (
    cla_budget,
    cla_sharing_groups,
    format_ratio,
    gqa_budget,
    gqa_kv_heads_for_budget,
    mixsga_budget,
    normalise_ratio,
    paper_expert_kv_heads,
    parse_ratio,
)
from .routing import DECODE_POLICIES
from ..errors import ConfigError

METHODS = ("mha", "gqa", "cla", "mixsga")
ROUTER_GRADS = ("counterfactual", "straight_through", "aux_only")
ROUTERS = ("learned", "random")
CLA_INITS = ("first", "mean")
DECODE_KERNELS = ("torch", "triton")


@dataclass
class AttentionConfig:
    """What to turn each attention layer into.

    method: ``mha`` (leave the model as shipped), ``gqa``, ``cla`` or ``mixsga``.
    kv_heads: GQA only: keep this many mean-pooled KV heads (or give ``budget``; neither: budget 0.5).
    budget: GQA/CLA: target fraction of the native KV cache in (0, 1]. For mixSGA it is derived
        from ``ratio`` and only checked if given.
    cla_init: CLA only: the shared K/V projection is the group's ``first`` layer's or the ``mean``.
    expert_kv_heads: mixSGA only: KV heads each expert keeps, most expensive first; ``None`` means
        the paper's [H_kv, H_kv/2, H_kv/4].
    ratio: mixSGA only: capacity shares per expert, a list [3, 1, 6] or a string "3:1:6".
    alpha: mixSGA only: weight of the prefill/decode consistency loss (paper eq. 5).
    router_grad: mixSGA only: how the LM loss reaches the router (forward always hard):
        ``counterfactual`` (every expert's logit gets <KV_e - KV_selected, dL/dKV>, the first-order
        loss change of moving the token there), ``straight_through`` (only the selected expert's
        score, as a K/V scale) or ``aux_only`` (none: the aux loss alone, the paper's literal eq. 9).
    decode_policy: mixSGA only: routing of generated tokens (and of every token under causal
        routing): ``budget`` (running quota: the router's preferred expert unless that would take
        the sequence's generated K/V over the budget, then the best one that fits) or ``argmax``
        (the paper's eq. 3; may exceed the budget).
    router: mixSGA only: ``learned`` or ``random`` (ablation: tokens drawn to the target ratio).
    decode_kernel: mixSGA/GQA inference: ``torch`` (expand the cache to H_kv heads, then the model's
        own attention) or ``triton`` (decode steps read the mixed cache with the fused kernel in
        ``triton_decode.py``; falls back to ``torch`` with one warning where it cannot run, see
        ``decode_kernel.py``). Prefill and training always use the model's own attention.
    """

    method: str = "mha"
    kv_heads: int | None = None
    budget: float | None = None
    cla_init: str = "first"
    expert_kv_heads: list[int] | None = None
    ratio: Any = field(default_factory=lambda: [3, 1, 6])
    alpha: float = 1.0
    router_grad: str = "counterfactual"
    decode_policy: str = "budget"
    router: str = "learned"
    decode_kernel: str = "torch"

    def resolve(self, native_kv_heads: int, num_layers: int) -> "ResolvedAttention":
        """Validate against the model's shape; every failure is a one-line ConfigError."""
        if self.method not in METHODS:
            raise ConfigError("attention.method", f"unknown {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.budget is not None and not 0 < self.budget <= 1:
            raise ConfigError("attention.budget", f"{self.budget} is outside (0, 1]; pick e.g. 0.5")
        if self.decode_kernel not in DECODE_KERNELS:
            raise ConfigError(
                "attention.decode_kernel", f"unknown {self.decode_kernel!r}; choose one of {', '.join(DECODE_KERNELS)}"
            )
        if self.method == "mha":
            resolved = ResolvedAttention("mha", native_kv_heads, num_layers, kv_budget=1.0)
        elif self.method == "gqa":
            resolved = self._resolve_gqa(native_kv_heads, num_layers)
        elif self.method == "cla":
            resolved = self._resolve_cla(native_kv_heads, num_layers)
        else:
            resolved = self._resolve_mixsga(native_kv_heads, num_layers)
        resolved.decode_kernel = self.decode_kernel
        return resolved

    def _resolve_gqa(self, native_kv_heads: int, num_layers: int) -> "ResolvedAttention":
        if self.kv_heads is not None:
            k = self.kv_heads
        else:  # neither given: the paper's baseline, group size 2
            k = gqa_kv_heads_for_budget(self.budget if self.budget is not None else 0.5, native_kv_heads)
        if not 1 <= k <= native_kv_heads:
            raise ConfigError(
                "attention.kv_heads", f"{k} is not in [1, {native_kv_heads}] (the model's native KV heads)"
            )
        if self.budget is not None and abs(gqa_budget(k, native_kv_heads) - self.budget) > 1e-6:
            raise ConfigError(
                "attention.budget",
                f"{self.budget} disagrees with kv_heads={k} ({gqa_budget(k, native_kv_heads):.4g}); give only one",
            )
        return ResolvedAttention("gqa", native_kv_heads, num_layers, gqa_budget(k, native_kv_heads), expert_kv_heads=[k])

    def _resolve_cla(self, native_kv_heads: int, num_layers: int) -> "ResolvedAttention":
        if self.budget is None:
            raise ConfigError("attention.budget", "CLA needs a budget (fraction of layers that own K/V), e.g. 0.5")
        if self.cla_init not in CLA_INITS:
            raise ConfigError("attention.cla_init", f"unknown {self.cla_init!r}; choose one of {', '.join(CLA_INITS)}")
        groups = cla_sharing_groups(num_layers, self.budget)
        return ResolvedAttention("cla", native_kv_heads, num_layers, cla_budget(groups), cla_groups=groups, cla_init=self.cla_init)

    def _resolve_mixsga(self, native_kv_heads: int, num_layers: int) -> "ResolvedAttention":
        heads = list(self.expert_kv_heads) if self.expert_kv_heads else paper_expert_kv_heads(native_kv_heads)
        if any(not isinstance(h, int) or not 1 <= h <= native_kv_heads for h in heads):
            raise ConfigError(
                "attention.expert_kv_heads",
                f"{heads} must be integers in [1, {native_kv_heads}] (the model's native KV heads)",
            )
        if sorted(heads, reverse=True) != heads or len(set(heads)) != len(heads):
            raise ConfigError("attention.expert_kv_heads", f"{heads} must be strictly decreasing (most expensive expert first)")
        if len(heads) > 255:
            raise ConfigError("attention.expert_kv_heads", "at most 255 experts (expert ids are stored as uint8)")
        ratio = parse_ratio(self.ratio)
        budget = mixsga_budget(ratio, heads, native_kv_heads)
        if self.budget is not None and abs(budget - self.budget) > 1e-6:
            raise ConfigError(
                "attention.budget",
                f"{self.budget} disagrees with ratio {format_ratio(ratio)} over experts {heads} ({budget:.4g}); "
                "drop budget or change the ratio",
            )
        if self.router_grad not in ROUTER_GRADS:
            raise ConfigError("attention.router_grad", f"unknown {self.router_grad!r}; choose one of {', '.join(ROUTER_GRADS)}")
        if self.decode_policy not in DECODE_POLICIES:
            raise ConfigError(
                "attention.decode_policy", f"unknown {self.decode_policy!r}; choose one of {', '.join(DECODE_POLICIES)}"
            )
        if self.router not in ROUTERS:
            raise ConfigError("attention.router", f"unknown {self.router!r}; choose one of {', '.join(ROUTERS)}")
        if self.alpha < 0:
            raise ConfigError("attention.alpha", f"{self.alpha} is negative; use 0 to disable the aux loss")
        return ResolvedAttention(
            "mixsga",
            native_kv_heads,
            num_layers,
            budget,
            expert_kv_heads=heads,
            ratio=normalise_ratio(ratio),
            alpha=self.alpha,
            router_grad=self.router_grad,
            decode_policy=self.decode_policy,
            router=self.router,
        )


@dataclass
class ResolvedAttention:
    """An AttentionConfig checked against a model: every number final. Saved with converted models."""

    method: str
    native_kv_heads: int
    num_layers: int
    kv_budget: float
    expert_kv_heads: list[int] | None = None
    ratio: list[float] | None = None
    alpha: float = 0.0
    router_grad: str = "counterfactual"
    decode_policy: str = "budget"
    router: str = "learned"
    cla_groups: list[list[int]] | None = None
    cla_init: str = "first"
    decode_kernel: str = "torch"

    def describe(self) -> str:
        """One line for logs, e.g. ``mixsga 3:1:6 over KV heads [8, 4, 2]: 50.0% of native KV``."""
        detail = {
            "mha": "native",
            "gqa": f"{self.expert_kv_heads and self.expert_kv_heads[0]} mean-pooled KV heads",
            "cla": f"{len(self.cla_groups or [])} K/V owners for {self.num_layers} layers",
            "mixsga": f"{format_ratio([round(r, 6) for r in self.ratio or []])} over KV heads {self.expert_kv_heads}",
        }[self.method]
        return f"{self.method} {detail}: {100 * self.kv_budget:.1f}% of native KV"
