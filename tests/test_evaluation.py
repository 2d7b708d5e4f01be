"""Evaluation: perplexity by hand, routing modes, generation + ROUGE-L, measured vs nominal KV bytes."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from mixsga_train.attention import AttentionConfig, convert_model, routing_context
from mixsga_train.data.instructions import EvalExample, format_prompt
from mixsga_train.evaluation.generation import generate_and_score, left_pad
from mixsga_train.evaluation.kv import measure_kv_bytes_per_token, native_kv_bytes_per_token, nominal_kv_bytes_per_token
from mixsga_train.evaluation.perplexity import evaluate_perplexity
from mixsga_train.models.registry import ModelConfig, load_model
from tiny import tiny_model

BLOCKS = torch.randint(0, 96, (3, 17), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def tiny_with_tokenizer():
    return load_model(ModelConfig(name="tiny", source="tiny", max_seq_len=128, tiny_layers=2))


def converted(base, **cfg):
    model = copy.deepcopy(base)
    convert_model(model, AttentionConfig(**cfg))
    return model.eval()


def test_perplexity_is_exp_of_mean_cross_entropy_and_restores_training():
    model = tiny_model("llama").train()
    result = evaluate_perplexity(model, BLOCKS, batch_size=2)  # last batch has one block
    with torch.no_grad():
        logits = model.eval()(BLOCKS).logits[:, :-1]
    mean_ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), BLOCKS[:, 1:].reshape(-1))
    assert result.tokens == 3 * 16
    assert result.ppl == pytest.approx(math.exp(mean_ce.item()), rel=1e-5)
    assert result.nll_sum == pytest.approx(mean_ce.item() * 48, rel=1e-5)
    assert result.word_ppl is None and result.agreement is None and result.expert_fractions is None
    model.train()
    evaluate_perplexity(model, BLOCKS, batch_size=3)
    assert model.training


def test_word_perplexity_is_token_perplexity_to_the_tokens_per_word():
    result = evaluate_perplexity(tiny_model("llama"), BLOCKS, batch_size=3, words=20)
    assert result.word_ppl == pytest.approx(result.ppl ** (result.tokens / 20), rel=1e-9)


def test_topk_and_argmax_routing_differ_on_an_untrained_router_and_the_mode_is_restored():
    model = converted(tiny_model("llama"), method="mixsga", ratio="3:1:6")
    ctx = routing_context(model)
    topk = evaluate_perplexity(model, BLOCKS, batch_size=3, routing="topk")
    argmax = evaluate_perplexity(model, BLOCKS, batch_size=3, routing="causal")
    assert topk.ppl != pytest.approx(argmax.ppl, rel=1e-4)
    assert ctx.mode == "auto" and ctx.stats is None
    assert 0.0 <= topk.agreement <= 1.0 and argmax.agreement is None
    # top-k over 17 real tokens per block: largest remainder of 5.1, 1.7, 10.2 (within the 50% budget)
    assert topk.expert_fractions == pytest.approx([5 / 17, 2 / 17, 10 / 17])
    assert sum(argmax.expert_fractions) == pytest.approx(1.0)


def test_routing_argument_is_a_no_op_for_models_without_routers():
    model = converted(tiny_model("llama"), method="gqa", kv_heads=2)
    a = evaluate_perplexity(model, BLOCKS, batch_size=3, routing="topk")
    b = evaluate_perplexity(model, BLOCKS, batch_size=3, routing="causal")
    assert a.ppl == b.ppl and a.agreement is None


def test_left_pad():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_generate_and_score(tiny_with_tokenizer):
    base, tokenizer = tiny_with_tokenizer
    examples = [
        EvalExample(format_prompt("Name a colour."), ["Blue."]),
        EvalExample(format_prompt("Add two and two.", "2 + 2"), ["4", "four"]),
        EvalExample("Hi", ["Hello there."]),  # much shorter: left padding in its batch
    ]
    side = tokenizer.padding_side
    for model in (base, converted(base, method="mixsga", ratio="3:1:6")):
        result = generate_and_score(model, tokenizer, examples, max_new_tokens=4, batch_size=2, max_prompt_len=64)
        assert len(result.predictions) == 3 and all(isinstance(p, str) for p in result.predictions)
        assert 0.0 <= result.rouge_l <= 100.0 and math.isfinite(result.rouge_l)
        assert result.kv.prefill_bytes_per_token > 0 and result.kv.decode_tokens > 0
    assert tokenizer.padding_side == side
    assert sum(result.expert_fractions_decode) == pytest.approx(1.0)
    assert sum(result.expert_fractions_prefill) == pytest.approx(1.0)
    assert routing_context(model).stats is None


def test_sampling_is_reproducible_by_seed(tiny_with_tokenizer):
    model, tokenizer = tiny_with_tokenizer
    examples = [EvalExample(format_prompt("Say something."), ["Something."])]
    runs = [generate_and_score(model, tokenizer, examples, 6, 1, 64, do_sample=True, seed=s).predictions for s in (1, 1)]
    assert runs[0] == runs[1]


@pytest.mark.parametrize(
    "cfg",
    [dict(method="mixsga", ratio="3:1:6"), dict(method="gqa", kv_heads=1), dict(method="cla", budget=0.5), None],
    ids=["mixsga-3:1:6", "gqa-1", "cla-0.5", "unconverted"],
)
def test_measured_kv_bytes_equal_nominal_for_a_prompt(cfg):
    base = tiny_model("llama", layers=4)  # 4 KV heads of width 8
    model = base if cfg is None else converted(base, **cfg)
    native = native_kv_bytes_per_token(model.config, torch.float32)
    assert native == 4 * 2 * 4 * 8 * 4
    prompt = torch.randint(1, 96, (2, 20))  # 20 tokens: 3:1:6 shares are exact (6, 2, 12)
    measured = measure_kv_bytes_per_token(model, prompt)
    assert measured == pytest.approx(nominal_kv_bytes_per_token(model, torch.float32))
    budget = {None: 1.0, "mixsga": 0.5, "gqa": 0.25, "cla": 0.5}[cfg and cfg["method"]]
    ids = 4 * (1 + 4) if cfg and cfg["method"] == "mixsga" else 0  # per layer: uint8 id, int32 slot position
    assert measured == pytest.approx(budget * native + ids)


def test_word_perplexity_counts_words_of_exactly_the_scored_text():
    """A word-level tokenizer (one token = one word): the N * (L - 1) scored tokens are N * (L - 1) words, so
    word perplexity must equal token perplexity. Counting words over all N * L tokens would make it lower."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from mixsga_train.evaluation.perplexity import scored_words

    words = Tokenizer(models.WordLevel({f"w{i}": i for i in range(96)}, unk_token="w0"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    assert words.encode("w5 w7 w9").ids == [5, 7, 9] and words.decode([5, 7, 9]) == "w5 w7 w9"
    count = scored_words(words, BLOCKS)
    assert count == 3 * 16
    result = evaluate_perplexity(tiny_model("llama"), BLOCKS, batch_size=3, words=count)
    assert result.word_ppl == pytest.approx(result.ppl, rel=1e-12)


def test_topk_perplexity_is_not_causal_and_causal_routing_is():
    """Changing only token t+1 of a block changes the logits at positions <= t under top-k routing (the
    choice of experts ranks the whole block), never under the causal routing of the headline perplexity."""
    from mixsga_train.evaluation.perplexity import CAUSAL_MODE
    from mixsga_train.evaluation.routing_scope import evaluating

    model = converted(tiny_model("llama"), method="mixsga", ratio="3:1:6")
    block = torch.randint(3, 96, (1, 24), generator=torch.Generator().manual_seed(3))
    leaks = {"topk": 0, CAUSAL_MODE: 0}
    for t in range(2, 22):
        changed = block.clone()
        changed[0, t + 1] = (block[0, t + 1] + 40) % 96
        for mode in leaks:
            with torch.no_grad(), evaluating(model, mode):
                a, b = model(block).logits[0, : t + 1], model(changed).logits[0, : t + 1]
            leaks[mode] += not torch.allclose(a, b, rtol=0, atol=1e-5)
    assert leaks[CAUSAL_MODE] == 0
    assert leaks["topk"] >= 5  # of 20 positions; the exact count depends on the random router
