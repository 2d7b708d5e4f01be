"""Tiny random models of every supported family, fp32, for equivalence tests: the package's own
builder (``mixsga_train.models.tiny.build_tiny_model``) at test sizes."""

import torch

from mixsga_train.models.tiny import TINY_FAMILIES, build_tiny_model

FAMILIES = tuple(TINY_FAMILIES)


def tiny_model(family: str, kv_heads: int = 4, layers: int = 3, seed: int = 0, heads: int = 8, hidden: int = 64):
    """A ``family`` model in eval mode: ``layers`` layers, ``hidden`` wide, ``heads`` query heads sharing
    ``kv_heads`` KV heads (OPT is multi-head only: ``kv_heads`` query heads), a 96-token vocabulary,
    256 positions and a Gemma 2 window of 6 (shorter than the test sequences)."""
    heads = kv_heads if family == "opt" else heads
    torch.manual_seed(seed)  # what a test draws next (inputs) is seeded too
    return build_tiny_model(
        family,
        vocab_size=96,
        layers=layers,
        hidden=hidden,
        heads=heads,
        kv_heads=kv_heads,
        intermediate=96,
        max_positions=256,
        sliding_window=6,
        seed=seed,
    ).eval()


def byte_bpe_tokenizer(sample: str, vocab_size: int = 512):
    """A tiny byte-level BPE (lossless decode) trained on ``sample`` in milliseconds, with <eos>/<pad>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<eos>", "<pad>"], initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator([sample], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")
