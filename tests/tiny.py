"""Tiny random models of each supported family, fp32, for equivalence tests."""

import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

FAMILIES = ("llama", "qwen2", "gemma2", "opt")


def tiny_model(family: str, kv_heads: int = 4, layers: int = 3, seed: int = 0, heads: int = 8, hidden: int = 64):
    torch.manual_seed(seed)
    common = dict(vocab_size=96, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=256)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(intermediate_size=96, num_key_value_heads=kv_heads, head_dim=8, **common))
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(intermediate_size=96, num_key_value_heads=kv_heads, **common))
    elif family == "gemma2":
        model = Gemma2ForCausalLM(Gemma2Config(intermediate_size=96, num_key_value_heads=kv_heads, head_dim=8,
                                               sliding_window=6, attn_logit_softcapping=50.0,
                                               final_logit_softcapping=30.0, **common))
    elif family == "opt":
        c = dict(common)
        c["num_attention_heads"] = kv_heads
        model = OPTForCausalLM(OPTConfig(ffn_dim=96, word_embed_proj_dim=64, **c))
    else:
        raise ValueError(family)
    return model.eval()


def byte_bpe_tokenizer(sample: str, vocab_size: int = 512):
    """A tiny byte-level BPE (lossless decode) trained on ``sample`` in milliseconds, with <eos>/<pad>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<eos>", "<pad>"], initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator([sample], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")
