"""Tiny randomly initialised models of every supported family, with an offline byte-level
tokenizer: what tests and smoke runs train in seconds. ``build_tiny_model`` is the one builder:
the ``tiny`` model source (``tiny_model``) and the test suite both use it."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

if TYPE_CHECKING:
    from .config import ModelConfig

TINY_SPECIAL_TOKENS = ("<eos>", "<pad>", "<bos>")


def tiny_tokenizer(max_len: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer: ids 0-255 are the bytes themselves, then ``<eos>`` 256, ``<pad>`` 257, ``<bos>`` 258.

    Lossless on any text, built in milliseconds, identical on every machine (nothing is trained).
    No token is added automatically (like SmolLM2): callers append ``eos`` where they want one.
    """
    byte_chars = _bytes_to_unicode()
    backend = Tokenizer(models.BPE(vocab={byte_chars[b]: b for b in range(256)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(TINY_SPECIAL_TOKENS))
    eos, pad, bos = TINY_SPECIAL_TOKENS
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=eos, pad_token=pad, bos_token=bos, model_max_length=max_len
    )


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, the alphabet of the ByteLevel pre-tokenizer."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _llama(sizes: dict, head_dim: int, sliding_window: int) -> PretrainedConfig:
    return LlamaConfig(**sizes, head_dim=head_dim)


def _qwen2(sizes: dict, head_dim: int, sliding_window: int) -> PretrainedConfig:
    return Qwen2Config(**sizes)


def _mistral(sizes: dict, head_dim: int, sliding_window: int) -> PretrainedConfig:
    return MistralConfig(**sizes, head_dim=head_dim, sliding_window=None)


def _gemma2(sizes: dict, head_dim: int, sliding_window: int) -> PretrainedConfig:
    return Gemma2Config(
        **sizes,
        head_dim=head_dim,
        query_pre_attn_scalar=head_dim,
        sliding_window=sliding_window,
        attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
    )


def _opt(sizes: dict, head_dim: int, sliding_window: int) -> PretrainedConfig:
    if sizes["num_key_value_heads"] != sizes["num_attention_heads"]:
        raise ValueError("OPT is multi-head only: give as many KV heads as query heads")
    plain = {k: v for k, v in sizes.items() if k not in ("num_key_value_heads", "intermediate_size")}
    return OPTConfig(
        **plain, ffn_dim=sizes["intermediate_size"], word_embed_proj_dim=sizes["hidden_size"], enable_bias=True
    )


# family (``config.model_type``) -> (its config from the shared sizes, its causal-LM class)
TINY_FAMILIES: dict[str, tuple[Callable[[dict, int, int], PretrainedConfig], type[PreTrainedModel]]] = {
    "llama": (_llama, LlamaForCausalLM),
    "qwen2": (_qwen2, Qwen2ForCausalLM),
    "mistral": (_mistral, MistralForCausalLM),
    "gemma2": (_gemma2, Gemma2ForCausalLM),
    "opt": (_opt, OPTForCausalLM),
}


def build_tiny_model(
    family: str,
    *,
    vocab_size: int,
    layers: int,
    hidden: int,
    heads: int,
    kv_heads: int,
    intermediate: int,
    max_positions: int,
    sliding_window: int = 8,
    seed: int = 0,
    token_ids: dict[str, int] | None = None,
) -> PreTrainedModel:
    """A randomly initialised ``family`` model, the same weights for the same arguments (``seed``;
    the global generator is left untouched). ``sliding_window``: Gemma 2's local window on
    alternate layers. ``token_ids``: ``pad_token_id`` / ``bos_token_id`` / ``eos_token_id``.
    Gemma 2 runs eager attention (its softcapping is eager-only in transformers), the others sdpa."""
    if family not in TINY_FAMILIES:
        raise ValueError(f"no tiny {family!r} model; families: {', '.join(TINY_FAMILIES)}")
    make_config, model_cls = TINY_FAMILIES[family]
    sizes = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=intermediate,
        max_position_embeddings=max_positions,
        **(token_ids or {}),
    )
    config = make_config(sizes, hidden // heads, sliding_window)
    config._attn_implementation = "eager" if family == "gemma2" else "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model_cls(config)


def tiny_model(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """The ``tiny`` source: a ``cfg.tiny_family`` model sized by ``cfg.tiny_*`` for ``tokenizer``
    (vocabulary rounded up to a multiple of 64), with exactly ``cfg.max_seq_len`` positions."""
    token_ids = dict(
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id
    )
    return build_tiny_model(
        cfg.tiny_family,
        vocab_size=-(-len(tokenizer) // 64) * 64,
        layers=cfg.tiny_layers,
        hidden=cfg.tiny_hidden,
        heads=cfg.tiny_heads,
        kv_heads=cfg.tiny_kv_heads,
        intermediate=cfg.tiny_intermediate,
        max_positions=cfg.max_seq_len,
        sliding_window=cfg.tiny_sliding_window,
        seed=cfg.tiny_seed,
        token_ids=token_ids,
    )
