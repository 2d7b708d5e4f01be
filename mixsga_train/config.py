"""The whole run as typed dataclasses: what Hydra composes is checked here, before any model or
data is loaded. Each group of ``mixsga_train/conf/`` maps to one dataclass."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .attention.config import AttentionConfig, ResolvedAttention
from .data.config import TaskConfig
from .errors import ConfigError
from .models.registry import ModelConfig
from .sweep import SweepConfig

PRECISIONS = ("fp32", "bf16")
RESUME = ("never", "auto")
LOGGERS = ("wandb", "none")
WANDB_MODES = ("offline", "online", "disabled")
SEED_RANGE = 2**32  # numpy's and torch's generators both take seeds in [0, 2**32)
INT_LIMIT = 2**63  # torch's int64


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
            raise ConfigError("trainer.max_steps", "give exactly one of trainer.max_steps and trainer.epochs (set the other to null)")
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
            from .training.engine_config import read_user_config

            read_user_config(self.deepspeed_config)


@dataclass
class LoggerConfig:
    """Experiment tracking. backend: ``wandb`` or ``none``. project, entity, mode: W&B's; null
    leaves them to the environment (WANDB_PROJECT, WANDB_ENTITY, WANDB_MODE), then to the defaults
    ``mixsga-train`` and ``offline`` (files under the run directory, ``wandb sync`` later); mode may
    be ``offline``, ``online`` or ``disabled``. group defaults to the experiment name; tags get the
    method and budget added. samples: generations logged as a table after training (0: none)."""

    backend: str = "wandb"
    project: str | None = None
    entity: str | None = None
    mode: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    samples: int = 4

    def validate(self) -> None:
        if self.backend not in LOGGERS:
            raise ConfigError("logger.backend", f"unknown {self.backend!r}; choose one of {', '.join(LOGGERS)}")
        if self.samples < 0:
            raise ConfigError("logger.samples", f"{self.samples} must be >= 0 (0: no sample table)")
        if self.mode is not None and self.mode not in WANDB_MODES:
            raise ConfigError("logger.mode", f"unknown {self.mode!r}; choose one of {', '.join(WANDB_MODES)}")


@dataclass
class RunConfig:
    """One run: model x attention x task x trainer x logger, plus the experiment label (W&B group),
    seed, and what a sweep reads from it (``sweep``)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    experiment_name: str = "default"
    seed: int = 0
    sweep: SweepConfig = field(default_factory=SweepConfig)

    def validate(self) -> ResolvedAttention:
        """Check every group and their combination; returns the attention resolved for the model."""
        check_numbers(self)
        for key in ("seed", "task.split_seed"):
            value = self.seed if key == "seed" else self.task.split_seed
            if not 0 <= value < SEED_RANGE:
                raise ConfigError(key, f"{value} is outside [0, 2**32); use a smaller non-negative seed")
        self.model.validate()
        if self.model.source == "local" and self.model.path:
            refuse_converted(Path(self.model.path).expanduser())
        self.task.validate()
        self.trainer.validate()
        self.logger.validate()
        if self.model.native_kv_heads is None or self.model.num_layers is None:
            raise ConfigError("model.native_kv_heads", "unknown and no config.json to read it from (offline?); "
                              "give model.native_kv_heads and model.num_layers")
        resolved = self.attention.resolve(self.model.native_kv_heads, self.model.num_layers)
        longest = self.task.seq_len if self.task.kind == "lm" else self.task.max_len
        key = "task.seq_len" if self.task.kind == "lm" else "task.max_len"
        if longest > self.model.max_seq_len:
            raise ConfigError(
                key, f"{longest} exceeds model.max_seq_len={self.model.max_seq_len} for {self.model.name}; lower {key}"
            )
        generated = self.task.max_prompt_len + self.task.max_new_tokens
        if (self.task.kind == "sft" or self.task.eval_sets) and generated > self.model.max_seq_len:
            raise ConfigError(
                "task.max_new_tokens",
                f"max_prompt_len={self.task.max_prompt_len} + max_new_tokens={self.task.max_new_tokens} = {generated} "
                f"exceeds model.max_seq_len={self.model.max_seq_len} for {self.model.name}; lower one of them",
            )
        return resolved


def check_numbers(config, prefix: str = "") -> None:
    """ConfigError for any number in the config tree that is NaN, infinite (YAML's ``.inf``, or a
    literal like ``1e400``) or beyond int64: such values pass range checks or crash much later."""
    items = ((f.name, getattr(config, f.name)) for f in fields(config)) if is_dataclass(config) else enumerate(config)
    for name, value in items:
        key = f"{prefix}.{name}" if prefix and not isinstance(name, int) else f"{prefix}[{name}]" if prefix else name
        if is_dataclass(value) or isinstance(value, list):
            check_numbers(value, key)
        elif isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(key, f"{value} is not a finite number; give a finite value")
        elif isinstance(value, int) and not isinstance(value, bool) and abs(value) >= INT_LIMIT:
            raise ConfigError(key, f"{value} is too large (beyond int64); give a realistic value")


def refuse_converted(path: Path) -> None:
    """``model.path`` must be an unconverted model: ``AutoModelForCausalLM`` would silently drop the
    trained routers and reshaped projections of a checkpoint that mixsga-train converted."""
    config_file = path / "config.json"
    try:
        saved = json.loads(config_file.read_text()).get("mixsga") if config_file.is_file() else None
    except (OSError, ValueError, AttributeError):
        raise ConfigError("model.path", f"{config_file} is not a readable JSON object; "
                                        "give a save_pretrained directory") from None
    if saved and saved.get("method") != "mha":  # an "mha" conversion changed nothing: a plain base model
        raise ConfigError(
            "model.path",
            f"{path} holds a model already converted by mixsga-train ({saved.get('method')}); loading it as a "
            f"base model would drop its routers: evaluate it with `mixsga-evaluate RUN_DIR --checkpoint {path}`, "
            "or start from the unconverted base model",
        )


def to_run_config(cfg: DictConfig) -> RunConfig:
    """Merge a composed Hydra config onto the dataclass schema; type errors become ConfigErrors."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(RunConfig), cfg)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "config"
        message = str(err).splitlines()[0]
        raise ConfigError(key, f"{message}; check the spelling and type of this key") from None
