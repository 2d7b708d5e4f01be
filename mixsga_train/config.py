"""The whole run: ``RunConfig`` composes the typed config of each group of ``mixsga_train/conf/``
(each defined next to the code it configures) and checks them together, before any model or data
is loaded."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, is_dataclass

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .attention.config import AttentionConfig, ResolvedAttention
from .data.config import TaskConfig
from .errors import ConfigError
from .models.config import ModelConfig
from .sweep import SweepConfig
from .tracking import LoggerConfig
from .training.config import TrainerConfig

SEED_RANGE = 2**32  # numpy's and torch's generators both take seeds in [0, 2**32)
INT_LIMIT = 2**63  # torch's int64


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
        self.task.validate()
        self.trainer.validate()
        self.logger.validate()
        if self.model.native_kv_heads is None or self.model.num_layers is None:
            raise ConfigError(
                "model.native_kv_heads",
                "unknown and no config.json to read it from (offline?); "
                "give model.native_kv_heads and model.num_layers",
            )
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


def to_run_config(cfg: DictConfig) -> RunConfig:
    """Merge a composed Hydra config onto the dataclass schema; type errors become ConfigErrors."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(RunConfig), cfg)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "config"
        message = str(err).splitlines()[0]
        raise ConfigError(key, f"{message}; check the spelling and type of this key") from None
