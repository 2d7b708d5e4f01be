"""Saving and loading converted models.

Save with the ordinary ``model.save_pretrained(dir)``: the resolved attention config travels in
``config.json`` (key ``mixsga``) and the router weights in the state dict. Load with
``load_converted(dir)``, which rebuilds the architecture, converts it the same way and loads the
weights strictly (only tied weights may be absent from the files).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from .config import ResolvedAttention
from .convert import convert_model


def saved_attention(path: str | Path) -> ResolvedAttention | None:
    """The attention config a checkpoint directory was converted with (None if unconverted)."""
    config = AutoConfig.from_pretrained(path)
    stored = getattr(config, "mixsga", None)
    return ResolvedAttention(**stored) if stored else None


def load_converted(path: str | Path, dtype: torch.dtype | None = None):
    """Load a checkpoint written by ``save_pretrained`` from a converted (or plain) model."""
    path = Path(path)
    config = AutoConfig.from_pretrained(path)
    resolved = saved_attention(path)
    if resolved is None:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    del config.mixsga
    model = AutoModelForCausalLM.from_config(config)
    convert_model(model, resolved)
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
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ValueError(
            f"{path}: weights do not match a {resolved.describe()} model "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}); was it saved from another method or budget?"
        )
    model.tie_weights()
    if dtype is not None:
        model.to(dtype)
    return model.eval()
