"""Remote code of a mixsga-train checkpoint: ``save_pretrained`` copies this file next to the weights.

``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` imports it and calls
``MixSGAForCausalLM.from_pretrained``, which returns the *base* family's model class (e.g.
``LlamaForCausalLM``) converted exactly as it was saved (routers, shared K/V, the KV budget
cache that ``generate()`` uses). The method itself is not copied here: this file imports the
installed ``mixsga_train`` package (``pip install mixsga-train``), so a checkpoint always runs the
same code as training did.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PretrainedConfig, PreTrainedModel

from mixsga_train.attention.persistence import MODEL_TYPE, build_converted, load_converted


class MixSGAConfig(PretrainedConfig):
    """The saved ``config.json``: the base family's keys, ``base_model_type`` and the attention
    config under ``mixsga``."""

    model_type = MODEL_TYPE


def _dtype(dtype) -> torch.dtype | None:
    """transformers' ``dtype`` argument (a torch dtype, its name, or ``"auto"``/None for the saved one)."""
    if dtype is None or dtype == "auto":
        return None
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


class MixSGAForCausalLM(PreTrainedModel):
    """Loader only: both constructors return the converted base-family model, never an instance of
    this class."""

    config_class = MixSGAConfig

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, dtype=None, revision=None, cache_dir=None, **kwargs):
        """The converted model with its weights, from a local folder or a Hub repo id."""
        path = Path(pretrained_model_name_or_path)
        if not path.is_dir():
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(str(pretrained_model_name_or_path), revision=revision, cache_dir=cache_dir))
        return load_converted(path, dtype=_dtype(dtype))

    @classmethod
    def _from_config(cls, config: MixSGAConfig, dtype=None, **kwargs):
        """A freshly initialised converted model (``AutoModelForCausalLM.from_config``)."""
        return build_converted(config.to_dict(), dtype=_dtype(dtype))

