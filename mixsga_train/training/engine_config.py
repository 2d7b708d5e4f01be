"""The DeepSpeed config of a TrainerConfig: ZeRO stage, precision, AdamW, warm-up + cosine, clipping,
and a user's DeepSpeed JSON (``trainer.deepspeed_config``) merged over it."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import torch
from torch import nn
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from ..config import TrainerConfig
from ..errors import ConfigError

AUTO = "auto"


def deepspeed_config(cfg: TrainerConfig, world_size: int) -> dict:
    """A DeepSpeed config dict (the schedule is passed separately: ``lr_schedule``): the one built
    from ``cfg``, with ``cfg.deepspeed_config``'s JSON merged over it when given."""
    built = built_config(cfg, world_size)
    if cfg.deepspeed_config is None:
        return built
    return merge_user_config(built, read_user_config(cfg.deepspeed_config))


def built_config(cfg: TrainerConfig, world_size: int) -> dict:
    """The DeepSpeed config that the trainer keys alone define."""
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


def read_user_config(path: str) -> dict:
    """A user's DeepSpeed JSON (a JSON object); a one-line ConfigError naming the file otherwise."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError("trainer.deepspeed_config", f"{file} is not a file; give the path of a DeepSpeed JSON")
    try:
        user = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ConfigError("trainer.deepspeed_config", f"{file} line {err.lineno}: invalid JSON ({err.msg})") from None
    if not isinstance(user, dict):
        raise ConfigError(
            "trainer.deepspeed_config", f"{file} holds a {type(user).__name__}; a DeepSpeed config is an object"
        )
    for unsupported in ("scheduler",):
        if unsupported in user:
            raise ConfigError(
                "trainer.deepspeed_config",
                f"{file}: {unsupported!r} is set by the trainer (warmup_ratio, min_lr_ratio); remove it from the JSON",
            )
    return user


def merge_user_config(built: dict, user: dict, path: str = "") -> dict:
    """``user`` merged over ``built`` (nested objects merge key by key, the user's values win). A
    value ``"auto"`` takes the built value at the same place (as in the transformers integration);
    ``"auto"`` where the trainer builds nothing is a ConfigError naming the key."""
    merged = dict(built)
    for key, value in user.items():
        where = f"{path}.{key}" if path else key
        if value == AUTO:
            if key not in built:
                raise ConfigError(
                    "trainer.deepspeed_config",
                    f"{where} is 'auto' but the trainer sets no value for it; give a number or remove the key",
                )
            continue
        if isinstance(value, dict) and isinstance(built.get(key), dict):
            merged[key] = merge_user_config(built[key], value, where)
        else:
            merged[key] = value
    return merged


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
