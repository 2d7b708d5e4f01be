"""Saving and loading converted models, here and in any tool that loads Hugging Face checkpoints.

Save with the ordinary ``model.save_pretrained(dir)``. On a converted model (GQA, CLA or mixSGA)
it writes the base model's files and then makes the checkpoint a *remote-code* checkpoint:

* ``config.json`` gets ``model_type: "mixsga"`` (the base family moves to ``base_model_type``),
  ``architectures: ["MixSGAForCausalLM"]``, the resolved attention config under ``mixsga``, and an
  ``auto_map`` pointing at ``modeling_mixsga.py``;
* ``modeling_mixsga.py`` is copied next to the weights. It imports the installed ``mixsga_train``
  package rather than carrying a copy of the method (one implementation, no drift).

``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` (and so pipelines,
lm-evaluation-harness, ...) then rebuilds the converted model exactly, while a load without
``trust_remote_code`` fails because transformers knows no ``mixsga`` model type, instead of
silently returning the unconverted model. ``load_converted(dir)`` loads both this format and the
older one (base ``model_type`` + ``mixsga`` key) without remote code.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from .methods import ResolvedAttention, resolved_from_saved

MODEL_TYPE = "mixsga"
UNCALIBRATED_OK = "router.decode_thresholds"  # absent from checkpoints saved before it existed: stays uncalibrated
ARCHITECTURE = "MixSGAForCausalLM"
REMOTE_CODE = Path(__file__).with_name("modeling_mixsga.py")
AUTO_MAP = {
    "AutoConfig": f"{REMOTE_CODE.stem}.MixSGAConfig",
    "AutoModelForCausalLM": f"{REMOTE_CODE.stem}.{ARCHITECTURE}",
}
# Keys only the remote-code config.json has; they are dropped when the base config is rebuilt.
REMOTE_KEYS = ("auto_map", "base_model_type", "base_architectures", MODEL_TYPE)


def read_config_json(path: str | Path) -> dict:
    """The checkpoint's ``config.json`` as a dict."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{file}: missing; give a model directory written by save_pretrained")
    return json.loads(file.read_text(encoding="utf-8"))


def saved_attention(path: str | Path) -> ResolvedAttention | None:
    """The attention config a checkpoint directory was converted with (None if unconverted)."""
    stored = read_config_json(path).get(MODEL_TYPE)
    return resolved_from_saved(stored) if stored else None


def base_config(stored: dict) -> PretrainedConfig:
    """The unconverted model's config from a saved ``config.json`` dict (either format)."""
    stored = dict(stored)
    model_type = stored.pop("base_model_type", None) or stored["model_type"]
    if model_type == MODEL_TYPE:
        raise ValueError("config.json has model_type 'mixsga' but no base_model_type; was it edited by hand?")
    architectures = stored.pop("base_architectures", None)
    for key in REMOTE_KEYS:
        stored.pop(key, None)
    stored["model_type"] = model_type
    if architectures is not None:
        stored["architectures"] = architectures
    return CONFIG_MAPPING[model_type].from_dict(stored)


def load_tokenizer(path: str | Path):
    """The checkpoint's tokenizer, without the remote-code prompt that ``AutoTokenizer`` (which
    reads ``config.json`` first) gives a converted checkpoint."""
    return AutoTokenizer.from_pretrained(path, config=base_config(read_config_json(path)))


def save_with_remote_code(model, save_directory: str | Path, **kwargs) -> None:
    """``save_pretrained`` of a converted model: the base model's files, then the remote-code
    ``config.json`` and ``modeling_mixsga.py`` (module docstring). Only the main process writes
    (``is_main_process=False`` skips it, as in transformers)."""
    type(model).save_pretrained(model, save_directory, **kwargs)
    if not kwargs.get("is_main_process", True):
        return
    folder = Path(save_directory)
    stored = read_config_json(folder)
    stored["base_model_type"] = stored["model_type"]
    stored["base_architectures"] = stored.get("architectures")
    stored.update(model_type=MODEL_TYPE, architectures=[ARCHITECTURE], auto_map=AUTO_MAP)
    (folder / "config.json").write_text(json.dumps(stored, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    shutil.copyfile(REMOTE_CODE, folder / REMOTE_CODE.name)


def build_converted(stored: dict, dtype: torch.dtype | None = None):
    """A freshly initialised converted model from a saved ``config.json`` dict (no weights)."""
    from .convert import convert_model  # deferred: convert imports this module

    resolved = resolved_from_saved(stored[MODEL_TYPE])
    model = AutoModelForCausalLM.from_config(base_config(stored))
    convert_model(model, resolved)
    if dtype is not None:
        model.to(dtype)
    return model


def load_converted(path: str | Path, dtype: torch.dtype | None = None):
    """Load a checkpoint written by ``save_pretrained`` from a converted (or plain) model."""
    path = Path(path)
    stored = read_config_json(path)
    if not stored.get(MODEL_TYPE):
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    resolved = resolved_from_saved(stored[MODEL_TYPE])
    model = build_converted(stored)
    state = {}
    for shard in sorted(path.glob("*.safetensors")):
        state.update(load_file(shard))
    if not state:
        raise FileNotFoundError(f"{path}: no *.safetensors weights found; save the model with save_pretrained")
    expected = model.state_dict()
    reshaped = [k for k, v in state.items() if k in expected and v.shape != expected[k].shape]
    if reshaped:
        raise ValueError(
            f"{path}: weights do not match a {resolved.describe()} model "
            f"(other shapes: {reshaped[:3]}); was it saved from another method or budget?"
        )
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or {})
    missing = [k for k in missing if k not in tied and not k.endswith(UNCALIBRATED_OK)]
    if missing or unexpected:
        raise ValueError(
            f"{path}: weights do not match a {resolved.describe()} model "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}); was it saved from another method or budget?"
        )
    model.tie_weights()
    if dtype is not None:
        model.to(dtype)
    return model.eval()
