"""The ``trainer`` group: optimisation, precision, ZeRO and checkpointing, as one typed, validated
dataclass (``conf/trainer/``); ``engine_config.py`` turns it into DeepSpeed's config."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ConfigError

PRECISIONS = ("fp32", "bf16")
RESUME = ("never", "auto")


@dataclass
class TrainerConfig:
    """Optimisation and checkpointing (DeepSpeed does the work).

    zero_stage: DeepSpeed ZeRO stage 0-3. precision: ``fp32`` or ``bf16`` (DeepSpeed bf16).
    micro_batch_size: sequences per process per step; grad_accum: micro-steps per optimizer step.
    max_steps: optimizer steps; ``epochs`` instead trains that many passes (exactly one of them).
    lr, betas, eps, weight_decay, grad_clip: AdamW and clipping. warmup_ratio: linear warm-up
    share of the steps; min_lr_ratio: where the cosine ends, as a fraction of lr.
    eval_batch_size: sequences per perplexity batch. eval_before: also evaluate before training.
    save_every: checkpoint every N optimizer steps (0: only at the end / on SIGINT).
    keep_checkpoints: how many complete checkpoints to keep. resume: ``auto`` continues the run
    directory from its last complete checkpoint; ``never`` refuses a directory that has one.
    log_every: optimizer steps between log lines. train_only_routers: freeze everything else.
    router_lr_mult: mixSGA routers train at router_lr_mult * lr, without weight decay.
    eval_every: evaluate every N optimizer steps during training and track the numbers as curves
    (0: only before and after training).
    gradient_checkpointing: recompute each decoder layer in the backward pass (less memory).
    deepspeed_config: optional path to a DeepSpeed JSON merged over the one built from these keys
    (offload, ZeRO-3 options, ...); its ``"auto"`` values take the built ones (engine_config.py).
    """

    zero_stage: int = 2
    precision: str = "fp32"
    micro_batch_size: int = 4
    grad_accum: int = 1
    max_steps: int | None = 100
    epochs: int | None = None
    lr: float = 2e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    warmup_ratio: float = 0.015
    min_lr_ratio: float = 0.0
    eval_batch_size: int = 4
    eval_before: bool = True
    save_every: int = 0
    keep_checkpoints: int = 2
    resume: str = "never"
    log_every: int = 10
    train_only_routers: bool = False
    router_lr_mult: float = 1.0
    eval_every: int = 0
    gradient_checkpointing: bool = False
    deepspeed_config: str | None = None

    def validate(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError("trainer.zero_stage", f"{self.zero_stage} is not a ZeRO stage; use 0, 1, 2 or 3")
        if self.precision not in PRECISIONS:
            raise ConfigError("trainer.precision", f"unknown {self.precision!r}; choose one of {', '.join(PRECISIONS)}")
        if (self.max_steps is None) == (self.epochs is None):
            raise ConfigError(
                "trainer.max_steps", "give exactly one of trainer.max_steps and trainer.epochs (set the other to null)"
            )
        for key in ("micro_batch_size", "grad_accum", "eval_batch_size", "keep_checkpoints", "log_every"):
            if getattr(self, key) < 1:
                raise ConfigError(f"trainer.{key}", f"{getattr(self, key)} must be >= 1")
        if self.max_steps is not None and self.max_steps < 0:
            raise ConfigError("trainer.max_steps", f"{self.max_steps} must be >= 0")
        if self.epochs is not None and self.epochs < 1:
            raise ConfigError("trainer.epochs", f"{self.epochs} must be >= 1")
        if self.lr <= 0:
            raise ConfigError("trainer.lr", f"{self.lr} must be positive, e.g. 2e-4")
        if self.router_lr_mult <= 0:
            raise ConfigError("trainer.router_lr_mult", f"{self.router_lr_mult} must be positive, e.g. 10")
        if self.eps <= 0:
            raise ConfigError("trainer.eps", f"{self.eps} must be positive, e.g. 1e-8")
        for key in ("weight_decay", "grad_clip"):
            if getattr(self, key) < 0:
                raise ConfigError(f"trainer.{key}", f"{getattr(self, key)} must be >= 0 (0 turns it off)")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError("trainer.min_lr_ratio", f"{self.min_lr_ratio} must be in [0, 1] (a fraction of lr)")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError("trainer.betas", f"{self.betas} must be two numbers in [0, 1), e.g. [0.9, 0.95]")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError("trainer.warmup_ratio", f"{self.warmup_ratio} must be in [0, 1)")
        if self.eval_every < 0:
            raise ConfigError("trainer.eval_every", f"{self.eval_every} must be >= 0 (0: none during training)")
        if self.save_every < 0:
            raise ConfigError("trainer.save_every", f"{self.save_every} must be >= 0 (0: only at the end)")
        if self.resume not in RESUME:
            raise ConfigError("trainer.resume", f"unknown {self.resume!r}; choose one of {', '.join(RESUME)}")
        if self.deepspeed_config is not None:
            from .engine_config import read_user_config  # imports this module (and torch): not at the top

            read_user_config(self.deepspeed_config)
