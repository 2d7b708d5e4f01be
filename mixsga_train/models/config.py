"""The ``model`` group: which model to start from, as one typed, validated dataclass. Checked
without loading any weights; ``loading.py`` loads it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoConfig, PretrainedConfig

from ..attention.adapters import adapter_for
from ..errors import ConfigError
from .loading import DTYPES, FAMILIES, LOADERS

SMOLLM2_KV_HEADS, SMOLLM2_LAYERS = 3, 30


@dataclass
class ModelConfig:
    """The model to load.

    name: label used in run directories and metrics.
    source: a key of ``loading.LOADERS``: ``hub`` | ``local`` | ``gguf_smollm2`` | ``tiny``.
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
        if self.source not in LOADERS:
            raise ConfigError("model.source", f"unknown {self.source!r}; choose one of {', '.join(LOADERS)}")
        if self.family is not None and self.family not in FAMILIES:
            raise ConfigError("model.family", f"unknown {self.family!r}; choose one of {', '.join(FAMILIES)} or null")
        if self.dtype not in DTYPES:
            raise ConfigError("model.dtype", f"unknown {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        if self.max_seq_len < 1:
            raise ConfigError("model.max_seq_len", f"{self.max_seq_len} must be positive, e.g. 512")
        if self.source == "hub" and not self.hub_id:
            raise ConfigError(
                "model.hub_id", "empty; give a Hub name or use model.source=local model.path=/path/to/checkpoint"
            )
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
                return (
                    self.native_kv_heads or adapter_for(config).native_kv_heads(config),
                    self.num_layers or config.num_hidden_layers,
                )
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
            raise ConfigError(
                "model.path", f"{self.path} is not a directory; give a save_pretrained checkpoint directory"
            )
        if not (Path(self.path).expanduser() / "config.json").is_file():
            raise ConfigError(
                "model.path", f"{self.path} has no config.json; give a save_pretrained checkpoint directory"
            )
        refuse_converted(Path(self.path).expanduser())

    def _validate_tiny(self) -> None:
        if self.tiny_family not in FAMILIES:
            raise ConfigError("model.tiny_family", f"unknown {self.tiny_family!r}; choose one of {', '.join(FAMILIES)}")
        sizes = (
            "tiny_layers",
            "tiny_hidden",
            "tiny_heads",
            "tiny_kv_heads",
            "tiny_intermediate",
            "tiny_sliding_window",
        )
        for key in sizes:
            if getattr(self, key) < 1:
                raise ConfigError(f"model.{key}", f"{getattr(self, key)} must be positive")
        if self.tiny_hidden % self.tiny_heads:
            raise ConfigError("model.tiny_heads", f"{self.tiny_heads} does not divide tiny_hidden={self.tiny_hidden}")
        if self.tiny_heads % self.tiny_kv_heads:
            raise ConfigError(
                "model.tiny_kv_heads", f"{self.tiny_kv_heads} does not divide tiny_heads={self.tiny_heads}"
            )
        if self.tiny_family == "opt" and self.tiny_kv_heads != self.tiny_heads:
            raise ConfigError("model.tiny_kv_heads", f"OPT is multi-head only; set it to tiny_heads={self.tiny_heads}")


def refuse_converted(path: Path) -> None:
    """``model.path`` must be an unconverted model: ``AutoModelForCausalLM`` would silently drop the
    trained routers and reshaped projections of a checkpoint that mixsga-train converted."""
    config_file = path / "config.json"
    try:
        saved = json.loads(config_file.read_text()).get("mixsga") if config_file.is_file() else None
    except (OSError, ValueError, AttributeError):
        raise ConfigError(
            "model.path", f"{config_file} is not a readable JSON object; give a save_pretrained directory"
        ) from None
    if saved and saved.get("method") != "mha":  # an "mha" conversion changed nothing: a plain base model
        raise ConfigError(
            "model.path",
            f"{path} holds a model already converted by mixsga-train ({saved.get('method')}); loading it as a "
            f"base model would drop its routers: evaluate it with `mixsga-evaluate RUN_DIR --checkpoint {path}`, "
            "or start from the unconverted base model",
        )
