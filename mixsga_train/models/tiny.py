"""Tiny randomly initialised models of every supported family, with an offline byte-level
tokenizer: what tests and smoke runs train in seconds."""

from __future__ import annotations

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


def tiny_model(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """A randomly initialised ``cfg.tiny_family`` model, the same weights for the same config (``tiny_seed``)."""
    model_cls, config = _tiny_config(cfg, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.tiny_seed)
        return model_cls(config)


def _tiny_config(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> tuple[type[PreTrainedModel], PretrainedConfig]:
    common = dict(
        vocab_size=-(-len(tokenizer) // 64) * 64,
        hidden_size=cfg.tiny_hidden,
        num_hidden_layers=cfg.tiny_layers,
        num_attention_heads=cfg.tiny_heads,
        max_position_embeddings=cfg.max_seq_len,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    llama_like = dict(common, num_key_value_heads=cfg.tiny_kv_heads, intermediate_size=cfg.tiny_intermediate)
    per_head = cfg.tiny_hidden // cfg.tiny_heads
    family = cfg.tiny_family
    if family == "llama":
        model_cls, config = LlamaForCausalLM, LlamaConfig(**llama_like)
    elif family == "qwen2":
        model_cls, config = Qwen2ForCausalLM, Qwen2Config(**llama_like)
    elif family == "mistral":
        model_cls, config = MistralForCausalLM, MistralConfig(**llama_like, sliding_window=None)
    elif family == "gemma2":
        config = Gemma2Config(
            **llama_like,
            head_dim=per_head,
            query_pre_attn_scalar=per_head,
            sliding_window=cfg.tiny_sliding_window,
            attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0,
        )
        model_cls = Gemma2ForCausalLM
    else:
        config = OPTConfig(**common, ffn_dim=cfg.tiny_intermediate, word_embed_proj_dim=cfg.tiny_hidden, enable_bias=True)
        model_cls = OPTForCausalLM
    # Gemma 2's softcapping is eager-only in transformers; the others use sdpa like real checkpoints.
    config._attn_implementation = "eager" if family == "gemma2" else "sdpa"
    return model_cls, config
