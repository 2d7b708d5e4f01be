"""Which model to start from, as one typed, validated dataclass, and ``load_model`` that loads it.

Sources: ``hub`` (a Hugging Face Hub name, the default users get when online), ``local`` (a
``save_pretrained`` directory), ``gguf_smollm2`` (SmolLM2-135M-Instruct from the offline GGUF,
see ``gguf.py``) and ``tiny`` (seeded random tiny models of every supported family, for tests).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from ..attention.adapters import ADAPTERS, adapter_for
from ..errors import ConfigError
from .gguf import load_smollm2_135m
from .tiny import tiny_model, tiny_tokenizer

SOURCES = ("hub", "local", "gguf_smollm2", "tiny")
FAMILIES = tuple(ADAPTERS)  # the families convert_model supports
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SMOLLM2_KV_HEADS, SMOLLM2_LAYERS = 3, 30


@dataclass
class ModelConfig:
    """The model to load.

    name: label used in run directories and metrics.
    source: ``hub`` | ``local`` | ``gguf_smollm2`` | ``tiny``.
    hub_id: Hub name (source ``hub``). path: checkpoint directory (source ``local``).
    family: expected architecture (``config.model_type``: one of FAMILIES); ``None`` accepts any
        supported one. Checked after loading, so a wrong checkpoint fails loudly.
    dtype: ``float32`` | ``bfloat16`` | ``float16``.
    max_seq_len: longest sequence the pipeline feeds; must fit the model's positions. Tiny models
        get exactly this many positions.
    native_kv_heads / num_layers: the checkpoint's KV heads per layer and decoder layers, so
        attention configs are checked before the weights load; verified against the loaded model.
        Derived for ``tiny`` and ``gguf_smollm2``; for ``local`` and ``hub`` read from the
        checkpoint's config.json when not given (the Hub's only when it is reachable or cached).
    tiny_*: source ``tiny`` only. ``tiny_family`` picks the architecture; the sizes default to a
        4-layer, 64-wide model with 4 query and 4 KV heads (so the paper experts [4, 2, 1] apply);
        ``tiny_sliding_window`` is Gemma 2's local window on alternate layers (small so tests
        exercise it); ``tiny_seed`` makes the weights reproducible.
    """

    name: str = "smollm2-135m-instruct"
    source: str = "hub"
    hub_id: str | None = "HuggingFaceTB/SmolLM2-135M-Instruct"
    path: str | None = None
    family: str | None = None
    dtype: str = "float32"
    max_seq_len: int = 512
    native_kv_heads: int | None = None
    num_layers: int | None = None
    tiny_family: str = "llama"
    tiny_layers: int = 4
    tiny_hidden: int = 64
    tiny_heads: int = 4
    tiny_kv_heads: int = 4
    tiny_intermediate: int = 128
    tiny_sliding_window: int = 8
    tiny_seed: int = 0

    def validate(self) -> None:
        """Check the fields without loading anything; every failure is a one-line ConfigError."""
        if self.source not in SOURCES:
            raise ConfigError("model.source", f"unknown {self.source!r}; choose one of {', '.join(SOURCES)}")
        if self.family is not None and self.family not in FAMILIES:
            raise ConfigError("model.family", f"unknown {self.family!r}; choose one of {', '.join(FAMILIES)} or null")
        if self.dtype not in DTYPES:
            raise ConfigError("model.dtype", f"unknown {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        if self.max_seq_len < 1:
            raise ConfigError("model.max_seq_len", f"{self.max_seq_len} must be positive, e.g. 512")
        if self.source == "hub" and not self.hub_id:
            raise ConfigError("model.hub_id", "empty; give a Hub name or use model.source=local model.path=/path/to/checkpoint")
        if self.source == "local":
            self._validate_local()
        if self.source == "tiny":
            self._validate_tiny()
        self.native_kv_heads, self.num_layers = self.declared_shape()

    def declared_shape(self) -> tuple[int | None, int | None]:
        """(native KV heads, layers) known before loading."""
        if self.source == "tiny":
            return self.tiny_kv_heads, self.tiny_layers
        if self.source == "gguf_smollm2":
            return SMOLLM2_KV_HEADS, SMOLLM2_LAYERS
        if self.native_kv_heads is None or self.num_layers is None:
            config = self._checkpoint_config()
            if config is not None:
                return (self.native_kv_heads or adapter_for(config).native_kv_heads(config),
                        self.num_layers or config.num_hidden_layers)
        return self.native_kv_heads, self.num_layers

    def _checkpoint_config(self) -> PretrainedConfig | None:
        """The checkpoint's config.json (local directory, or the Hub's copy if reachable or cached)."""
        location = Path(self.path).expanduser() if self.source == "local" else self.hub_id
        try:
            return AutoConfig.from_pretrained(location)
        except (OSError, ValueError):
            return None

    def _validate_local(self) -> None:
        if not self.path:
            raise ConfigError("model.path", "empty; give the directory a model was save_pretrained to")
        if not Path(self.path).expanduser().is_dir():
            raise ConfigError("model.path", f"{self.path} is not a directory; give a save_pretrained checkpoint directory")
        if not (Path(self.path).expanduser() / "config.json").is_file():
            raise ConfigError("model.path", f"{self.path} has no config.json; give a save_pretrained checkpoint directory")

    def _validate_tiny(self) -> None:
        if self.tiny_family not in FAMILIES:
            raise ConfigError("model.tiny_family", f"unknown {self.tiny_family!r}; choose one of {', '.join(FAMILIES)}")
        sizes = ("tiny_layers", "tiny_hidden", "tiny_heads", "tiny_kv_heads", "tiny_intermediate", "tiny_sliding_window")
        for key in sizes:
            if getattr(self, key) < 1:
                raise ConfigError(f"model.{key}", f"{getattr(self, key)} must be positive")
        if self.tiny_hidden % self.tiny_heads:
            raise ConfigError("model.tiny_heads", f"{self.tiny_heads} does not divide tiny_hidden={self.tiny_hidden}")
        if self.tiny_heads % self.tiny_kv_heads:
            raise ConfigError("model.tiny_kv_heads", f"{self.tiny_kv_heads} does not divide tiny_heads={self.tiny_heads}")
        if self.tiny_family == "opt" and self.tiny_kv_heads != self.tiny_heads:
            raise ConfigError("model.tiny_kv_heads", f"OPT is multi-head only; set it to tiny_heads={self.tiny_heads}")


def load_model(cfg: ModelConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Validate ``cfg``, load the model (eval mode, ``cfg.dtype``) and a tokenizer that has a pad token."""
    cfg.validate()
    dtype = DTYPES[cfg.dtype]
    if cfg.source == "hub":
        model, tokenizer = _load_hub(cfg.hub_id, dtype)
    elif cfg.source == "local":
        path = Path(cfg.path).expanduser()
        model, tokenizer = AutoModelForCausalLM.from_pretrained(path, dtype=dtype), AutoTokenizer.from_pretrained(path)
    elif cfg.source == "gguf_smollm2":
        model, tokenizer = load_smollm2_135m()
        model = model.to(dtype)
    else:
        tokenizer = tiny_tokenizer(cfg.max_seq_len)
        model = tiny_model(cfg, tokenizer).to(dtype)
    _check_loaded(cfg, model.config)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


def _load_hub(hub_id: str, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    try:
        return AutoModelForCausalLM.from_pretrained(hub_id, dtype=dtype), AutoTokenizer.from_pretrained(hub_id)
    except OSError as err:
        raise ConfigError(
            "model.hub_id",
            f"cannot load {hub_id!r} from the Hugging Face Hub (offline, unknown name or gated); "
            "use model.source=local model.path=/path/to/checkpoint",
        ) from err


def _check_loaded(cfg: ModelConfig, config: PretrainedConfig) -> None:
    family = model_family(config)
    if cfg.family is not None and family != cfg.family:
        raise ConfigError("model.family", f"the checkpoint is {family!r}, not {cfg.family!r}; fix model.family or the checkpoint")
    declared = (cfg.native_kv_heads, cfg.num_layers)
    actual = (adapter_for(config).native_kv_heads(config), config.num_hidden_layers)
    if None not in declared and declared != actual:
        raise ConfigError(
            "model.native_kv_heads",
            f"declared (KV heads, layers) {declared} but the checkpoint has {actual}; fix the model config",
        )
    if cfg.max_seq_len > max_positions(config):
        raise ConfigError("model.max_seq_len", f"{cfg.max_seq_len} exceeds the model's {max_positions(config)} positions; lower it")


def model_family(config: PretrainedConfig) -> str:
    """The supported family of a loaded model (its ``model_type``), or a ConfigError naming ``model.family``."""
    if config.model_type not in FAMILIES:
        raise ConfigError("model.family", f"unsupported architecture {config.model_type!r}; supported: {', '.join(FAMILIES)}")
    return config.model_type


def max_positions(config: PretrainedConfig) -> int:
    """Longest sequence the position embeddings cover."""
    return config.max_position_embeddings
