"""``evaluating(model, mode)``: run a block of evaluation in eval mode under one routing mode,
collecting routing statistics, and put everything back afterwards."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from ..attention import RoutingStats, converted


def num_experts(model: nn.Module) -> int | None:
    """Experts per layer of a converted mixSGA model; None for every other model."""
    handle = converted(model)
    return handle.num_experts if handle is not None and handle.num_experts else None


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
    ctx = converted(model).context
    saved = ctx.mode, ctx.stats
    ctx.mode, ctx.stats = mode, RoutingStats(experts)
    try:
        yield ctx.stats
    finally:
        ctx.mode, ctx.stats = saved
        model.train(was_training)
