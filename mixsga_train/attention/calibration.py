"""Calibrating the ``calibrated`` decode policy: top-k's decisions turned into per-token thresholds.

Training routes a sequence by progressive top-k (eq. 2), which needs the whole sequence; decoding
sees one token at a time. The paper decodes by argmax (eq. 3) and relies on the consistency loss
to make argmax agree with top-k; where it does not, decode shares drift from the ratio (measured
here: argmax decoded at 61% and 72% of native KV for 50% and 67% SmolLM2 runs; under the budget
quota the drift goes the other way, to 41% for a 50% run). ``calibrate_decode_thresholds`` runs
the model with top-k routing over calibration batches (training data), and sets each router's
``decode_thresholds`` so that "first expert whose logit clears its threshold" reproduces top-k's
shares over those tokens (``routing.calibrate_thresholds``). The budget quota still guarantees
every prefix stays within budget.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .convert import converted
from .routing import calibrate_thresholds


@torch.no_grad()
def calibrate_decode_thresholds(model: nn.Module, batches: Iterable[dict]) -> list[torch.Tensor]:
    """Set every router's ``decode_thresholds`` from top-k routing of ``batches`` (dicts with
    ``input_ids`` [B, L] and optionally ``attention_mask``). Returns the thresholds per layer."""
    handle = converted(model)
    routers = [r for r in handle.routers if not r.random] if handle is not None else []
    if not routers:
        return []
    logits, ids = [[] for _ in routers], [[] for _ in routers]
    context, was_training, mode = handle.context, model.training, handle.context.mode
    device = next(model.parameters()).device
    model.eval()
    context.mode = "topk"
    try:
        for batch in batches:
            mask = batch.get("attention_mask")
            mask = None if mask is None else mask.to(device)
            model(input_ids=batch["input_ids"].to(device), attention_mask=mask, use_cache=False)
            for i, router in enumerate(routers):
                real = router.last_mask
                if real is None:
                    real = torch.ones_like(router.last_ids, dtype=torch.bool)
                logits[i].append(router.last_logits[real])
                ids[i].append(router.last_ids[real])
    finally:
        context.mode = mode
        model.train(was_training)
    out = []
    for router, layer_logits, layer_ids in zip(routers, logits, ids):
        thresholds = calibrate_thresholds(torch.cat(layer_logits), torch.cat(layer_ids))
        router.decode_thresholds.copy_(thresholds.to(router.decode_thresholds))
        out.append(thresholds)
    return out
