"""The DeepSpeed config of a TrainerConfig: ZeRO stage, precision, AdamW, warm-up + cosine, clipping."""

from __future__ import annotations

from functools import partial

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


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: matrices decay; biases, norms and 1-d router biases do not."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


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
