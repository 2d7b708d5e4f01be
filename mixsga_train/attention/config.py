"""The attention variant to convert a model to, as one typed, validated dataclass.

``method`` names a registered method (``methods/``); the other fields belong to one method each
(documented below) and are the flat keys of the ``attention:`` config group.
``resolve(native_kv_heads, num_layers)`` hands them to that method, which checks everything
against the model's shape and returns its ``ResolvedAttention`` subclass (typed fields, numbers
final), so errors surface before any weights are touched.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError
from .methods import ATTENTION_METHODS, ResolvedAttention

__all__ = ["AttentionConfig", "ResolvedAttention"]


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
    layer_ratios: mixSGA only: one ratio per layer (lists or "3:1:6" strings), replacing ``ratio``;
        the budget is the mean of the layers' budgets and each layer's router holds its own. A
        layer whose ratio is one-hot is plain GQA at that expert's head count (``None``: every
        layer uses ``ratio``). ``experiments/layer_allocation.py`` picks them from a measured
        per-layer sensitivity.
    alpha: mixSGA only: weight of the prefill/decode consistency loss (paper eq. 5).
    router_grad: mixSGA only: how the LM loss reaches the router (forward always hard):
        ``counterfactual`` (every expert's logit gets <KV_e - KV_selected, dL/dKV>, the first-order
        loss change of moving the token there), ``straight_through`` (only the selected expert's
        score, as a K/V scale) or ``aux_only`` (none: the aux loss alone, the paper's literal eq. 9).
    decode_policy: mixSGA only: routing of generated tokens (and of every token under causal
        routing): ``budget`` (default: a running quota keeps the sequence's generated K/V within the
        budget; the preferred expert is the router's argmax unless it does not fit, then the best
        one that does), ``calibrated`` (the same quota, but the preferred expert is the first whose
        logit clears a threshold fitted on training data so that decode shares follow top-k's,
        ``calibration.py``; until fitted it routes like ``budget``), ``balanced`` (a two-sided quota:
        the first ``sink_tokens`` tokens of a causally routed sequence keep the full expert, and a
        sequence never falls more than ``decode_slack`` upgrades behind its budget, so the realised
        share converges to the budget instead of undershooting it; ``routing.DecodeBand``) or
        ``argmax`` (the paper's eq. 3; may exceed the budget).
    sink_tokens: mixSGA ``balanced`` policy only: how many first tokens of a causally routed
        sequence take the most expensive expert (the attention sink; their excess over the budget
        is repaid by later tokens).
    decode_slack: mixSGA ``balanced`` policy only: how many full-vs-cheapest upgrades' worth of
        budget a sequence may leave unspent before the policy forces the expensive expert (>= 1;
        wider lets the router pick which tokens get it).
    router: mixSGA only: ``learned`` or ``random`` (ablation: tokens drawn to the target ratio).
    decode_kernel: mixSGA/GQA inference: ``torch`` (each expert's segment read at its own head
        count, ``segment_attention.py``) or ``triton`` (decode steps read the mixed cache with the
        fused kernel in ``triton_decode.py``; falls back to ``torch`` with one warning where it
        cannot run, see ``decode_kernel.py``).
    """

    method: str = "mha"
    kv_heads: int | None = None
    budget: float | None = None
    cla_init: str = "first"
    expert_kv_heads: list[int] | None = None
    ratio: Any = field(default_factory=lambda: [3, 1, 6])
    layer_ratios: Any = None
    alpha: float = 1.0
    router_grad: str = "counterfactual"
    decode_policy: str = "budget"
    sink_tokens: int = 1
    decode_slack: float = 4.0
    router: str = "learned"
    decode_kernel: str = "torch"

    def resolve(self, native_kv_heads: int, num_layers: int) -> ResolvedAttention:
        """Validate against the model's shape through the method's ``resolve`` (``methods/``); every
        failure is a one-line ConfigError."""
        if self.method not in ATTENTION_METHODS:
            raise ConfigError(
                "attention.method", f"unknown {self.method!r}; choose one of {', '.join(ATTENTION_METHODS)}"
            )
        if self.budget is not None and not 0 < self.budget <= 1:
            raise ConfigError("attention.budget", f"{self.budget} is outside (0, 1]; pick e.g. 0.5")
        return ATTENTION_METHODS[self.method].resolve(self, native_kv_heads, num_layers)
