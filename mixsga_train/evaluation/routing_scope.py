"""``evaluating(model, mode)``: run a block of evaluation in eval mode under one routing mode,
collecting routing statistics, and put everything back afterwards."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from ..attention import RoutingStats, routing_context


def num_experts(model: nn.Module) -> int | None:
    """Experts per layer of a converted mixSGA model; None for every other model."""
    resolved = getattr(model, "_mixsga_resolved", None)
    if resolved is None or resolved.method != "mixsga":
        return None
    return len(resolved.expert_kv_heads)


@contextmanager
def evaluating(model: nn.Module, mode: str = "auto") -> Iterator[RoutingStats | None]:
    """Switch ``model`` to eval mode and, for a mixSGA model, to routing ``mode`` with fresh
    ``RoutingStats`` (yielded; None for models without routers). On exit the training flag, the
    routing mode and the previous stats are restored."""
    was_training = model.training
    model.eval()
    experts = num_experts(model)
    if experts is None:
        try:
            yield None
        finally:
            model.train(was_training)
        return
    ctx = routing_context(model)
    saved = ctx.mode, ctx.stats
    ctx.mode, ctx.stats = mode, RoutingStats(experts)
    try:
        yield ctx.stats
    finally:
        ctx.mode, ctx.stats = saved
        model.train(was_training)
