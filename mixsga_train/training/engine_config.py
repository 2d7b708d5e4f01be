"""The DeepSpeed config of a TrainerConfig: ZeRO stage, precision, AdamW, warm-up + cosine, clipping."""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from ..config import TrainerConfig


def deepspeed_config(cfg: TrainerConfig, world_size: int) -> dict:
    """A DeepSpeed config dict (the schedule is passed separately: ``lr_schedule``)."""
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.micro_batch_size * cfg.grad_accum * world_size,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": cfg.precision == "bf16"},
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": cfg.lr, "betas": list(cfg.betas), "eps": cfg.eps, "weight_decay": cfg.weight_decay, "torch_adam": True},
        },
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def parameter_groups(model: nn.Module, cfg: TrainerConfig) -> list[dict]:
    """AdamW groups: matrices decay; biases and norms do not; mixSGA routers (``*.router.*``) form
    their own group at ``router_lr_mult * lr`` without weight decay (empty groups are left out).
    The schedule scales every group's own lr by the same factor."""
    decay, no_decay, router = [], [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (router if ".router." in name else decay if param.dim() >= 2 else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
        {"params": router, "weight_decay": 0.0, "lr": cfg.lr * cfg.router_lr_mult, "name": "router"},
    ]
    return [g for g in groups if g["params"]]


def router_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """The mixSGA routers' parameters by name (empty for other models)."""
    return {name: param for name, param in model.named_parameters() if ".router." in name}


def relative_change(before: dict[str, torch.Tensor], model: nn.Module) -> float | None:
    """||W_now - W_before|| / ||W_before|| over the parameters in ``before`` (None if it is empty)."""
    if not before:
        return None
    now = router_parameters(model)
    diff = sum(float((now[n].detach().float().cpu() - w).pow(2).sum()) for n, w in before.items())
    norm = sum(float(w.pow(2).sum()) for w in before.values())
    return (diff / norm) ** 0.5 if norm else None


def lr_schedule(cfg: TrainerConfig, total_steps: int):
    """Linear warm-up for ``warmup_ratio`` of ``total_steps``, then cosine to ``min_lr_ratio * lr``
    (transformers' schedule; DeepSpeed steps it and saves it in checkpoints). A callable of the
    optimizer, as ``deepspeed.initialize(lr_scheduler=...)`` takes it."""
    return partial(
        get_cosine_with_min_lr_schedule_with_warmup,
        num_warmup_steps=round(cfg.warmup_ratio * total_steps),
        num_training_steps=max(total_steps, 1),
        min_lr_rate=cfg.min_lr_ratio,
    )
