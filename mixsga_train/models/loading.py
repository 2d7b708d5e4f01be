"""Loading a ``ModelConfig``: a registry of model sources (``LOADERS``: source name -> loader),
then the checks that the loaded model is the one the config declared.

A loader takes the config and the torch dtype and returns ``(model, tokenizer)``. Adding a source
is one function and one ``LOADERS`` entry: ``ModelConfig.validate`` accepts every key.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from ..attention.adapters import ADAPTERS, adapter_for
from ..attention.persistence import MODEL_TYPE, base_config, load_tokenizer, read_config_json
from ..errors import ConfigError
from .gguf import load_smollm2_135m
from .tiny import tiny_model, tiny_tokenizer

if TYPE_CHECKING:
    from .config import ModelConfig

FAMILIES = tuple(ADAPTERS)  # the families convert_model supports
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
Loaded = tuple[PreTrainedModel, PreTrainedTokenizerBase]


def load_hub(cfg: ModelConfig, dtype: torch.dtype) -> Loaded:
    """A Hugging Face Hub name (``model.hub_id``), from the Hub or its local cache."""
    try:
        return AutoModelForCausalLM.from_pretrained(cfg.hub_id, dtype=dtype), AutoTokenizer.from_pretrained(cfg.hub_id)
    except OSError as err:
        raise ConfigError(
            "model.hub_id",
            f"cannot load {cfg.hub_id!r} from the Hugging Face Hub (offline, unknown name or gated); "
            "use model.source=local model.path=/path/to/checkpoint",
        ) from err


def load_local(cfg: ModelConfig, dtype: torch.dtype) -> Loaded:
    """A ``save_pretrained`` directory (``model.path``). A model mixsga-train saved with
    ``attention=mha`` carries the remote-code config of a converted model but unchanged weights:
    it loads as its base architecture (``refuse_converted`` stops every other method earlier)."""
    path = Path(cfg.path).expanduser()
    stored = read_config_json(path) if (path / "config.json").is_file() else {}
    if stored.get(MODEL_TYPE):
        config = base_config(stored)
        return AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype), load_tokenizer(path)
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype), AutoTokenizer.from_pretrained(path)


def load_gguf_smollm2(cfg: ModelConfig, dtype: torch.dtype) -> Loaded:
    """SmolLM2-135M-Instruct from the offline GGUF file (``gguf.py``)."""
    model, tokenizer = load_smollm2_135m()
    return model.to(dtype), tokenizer


def load_tiny(cfg: ModelConfig, dtype: torch.dtype) -> Loaded:
    """A seeded random tiny model of ``model.tiny_family`` with the byte-level tokenizer (``tiny.py``)."""
    tokenizer = tiny_tokenizer(cfg.max_seq_len)
    return tiny_model(cfg, tokenizer).to(dtype), tokenizer


LOADERS: dict[str, Callable[[ModelConfig, torch.dtype], Loaded]] = {
    "hub": load_hub,
    "local": load_local,
    "gguf_smollm2": load_gguf_smollm2,
    "tiny": load_tiny,
}


def load_model(cfg: ModelConfig) -> Loaded:
    """Validate ``cfg``, load the model (eval mode, ``cfg.dtype``) through its source's loader, check
    it against the config, and give the tokenizer a pad token (its eos when it has none)."""
    cfg.validate()
    model, tokenizer = LOADERS[cfg.source](cfg, DTYPES[cfg.dtype])
    _check_loaded(cfg, model.config)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


def _check_loaded(cfg: ModelConfig, config: PretrainedConfig) -> None:
    family = model_family(config)
    if cfg.family is not None and family != cfg.family:
        raise ConfigError(
            "model.family", f"the checkpoint is {family!r}, not {cfg.family!r}; fix model.family or the checkpoint"
        )
    declared = (cfg.native_kv_heads, cfg.num_layers)
    actual = (adapter_for(config).native_kv_heads(config), config.num_hidden_layers)
    if None not in declared and declared != actual:
        raise ConfigError(
            "model.native_kv_heads",
            f"declared (KV heads, layers) {declared} but the checkpoint has {actual}; fix the model config",
        )
    if cfg.max_seq_len > max_positions(config):
        raise ConfigError(
            "model.max_seq_len", f"{cfg.max_seq_len} exceeds the model's {max_positions(config)} positions; lower it"
        )


def model_family(config: PretrainedConfig) -> str:
    """The supported family of a loaded model (its ``model_type``), or a ConfigError naming ``model.family``."""
    if config.model_type not in FAMILIES:
        raise ConfigError(
            "model.family", f"unsupported architecture {config.model_type!r}; supported: {', '.join(FAMILIES)}"
        )
    return config.model_type


def max_positions(config: PretrainedConfig) -> int:
    """Longest sequence the position embeddings cover."""
    return config.max_position_embeddings
