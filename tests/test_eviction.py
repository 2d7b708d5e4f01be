"""H2O eviction on the budget cache: the scores are kvpress's observed-attention formula, the keep
set is heavy hitters + recent window, an evicted cache reads exactly like a mask over those tokens,
the kept bytes are priced per expert, and unsupported methods fail in one line."""

import copy

import pytest
import torch
from tiny import tiny_model

from mixsga_train.attention import AttentionConfig, build_cache, convert_model
from mixsga_train.evaluation.eviction import (
    EvictionUnsupported,
    evicted_response_nll,
    h2o_keep,
    h2o_scores,
    prefill_and_evict,
)


def converted(base, **cfg):
    model = copy.deepcopy(base)
    torch.manual_seed(3)
    convert_model(model, AttentionConfig(**cfg))
    return model.eval()


def test_h2o_scores_are_the_mean_attention_received_over_the_queries_that_see_each_key():
    attn = torch.softmax(torch.randn(2, 3, 6, 6).masked_fill(torch.ones(6, 6).triu(1).bool(), -torch.inf), -1)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, :2] = False  # left padding: padded queries and keys count nothing
    attn[1, :, :2] = 0.0
    scores = h2o_scores(attn, mask)
    for b in range(2):
        for j in range(6):
            if not mask[b, j]:
                assert scores[b, j] == -torch.inf
                continue
            queries = [i for i in range(j, 6) if mask[b, i]]  # causal: queries at or after the key
            expect = sum(attn[b, h, i, j].item() for h in range(3) for i in queries) / (3 * len(queries))
            assert scores[b, j].item() == pytest.approx(expect, rel=1e-5)


def test_h2o_keeps_the_recent_window_and_the_heaviest_older_tokens():
    scores = torch.tensor([[0.9, 0.1, 0.8, 0.2, 0.3, 0.05, 0.0, 0.0], [0.0, 0.0, 0.5, 0.9, 0.1, 0.2, 0.7, 0.3]])
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[1, :2] = False
    keep = h2o_keep(scores, mask, keep_ratio=0.5)
    # row 0: k = 4 -> the 2 most recent (6, 7) + the 2 heaviest of 0..5 (0, 2)
    assert keep[0].nonzero().squeeze(1).tolist() == [0, 2, 6, 7]
    # row 1: 6 real tokens, k = 3 -> 2 recent (6, 7) + the heaviest of 2..5 (3); padding never kept
    assert keep[1].nonzero().squeeze(1).tolist() == [3, 6, 7]
    assert h2o_keep(scores, mask, keep_ratio=1.0).equal(mask)
    with pytest.raises(ValueError, match="keep_ratio"):
        h2o_keep(scores, mask, keep_ratio=0.0)


@pytest.mark.parametrize("cfg", [dict(method="gqa", kv_heads=2), dict(method="mixsga", ratio="3:1:6")])
def test_an_evicted_cache_reads_like_a_mask_over_the_evicted_tokens(cfg):
    """Keep everything: the continuation's logits equal an ordinary cache's. Evict the same tokens
    in every layer: they equal masking those tokens in the continuation's attention mask."""
    model = converted(tiny_model("llama"), **cfg)
    prompt = torch.randint(1, 96, (2, 12))
    mask = torch.ones_like(prompt)
    mask[1, :3] = 0
    cont = torch.randint(1, 96, (2, 5))
    full_mask = torch.cat([mask, torch.ones_like(cont)], 1)
    with torch.no_grad():
        reference_cache = build_cache(model)
        model(input_ids=prompt, attention_mask=mask, cache=reference_cache)
        reference = model(input_ids=cont, attention_mask=full_mask, cache=reference_cache).logits
        kept_all = prefill_and_evict(model, prompt, mask, 1.0)
        assert torch.allclose(
            model(input_ids=cont, attention_mask=full_mask, cache=kept_all.cache).logits, reference, atol=1e-5
        )

        evicted = torch.zeros(2, 12, dtype=torch.bool)
        evicted[0, [1, 4, 5]] = True
        evicted[1, [3, 8]] = True
        cache = prefill_and_evict(model, prompt, mask, 1.0).cache
        for layer in cache.layers:
            layer.evict(evicted)
        # each continuation right after its own prefill: the decode policy's running totals live in the routers
        got = model(input_ids=cont, attention_mask=full_mask, cache=cache).logits
        masked = full_mask.clone()
        masked[:, :12][evicted] = 0
        plain_cache = build_cache(model)
        model(input_ids=prompt, attention_mask=mask, cache=plain_cache)
        expect = model(input_ids=cont, attention_mask=masked, cache=plain_cache).logits
    assert torch.allclose(got, expect, atol=1e-5)
    assert not torch.allclose(got, reference, atol=1e-3)


def test_kept_bytes_are_priced_at_each_kept_tokens_expert():
    model = converted(tiny_model("llama"), method="mixsga", ratio="3:1:6")
    prompt = torch.randint(1, 96, (2, 20))
    mask = torch.ones_like(prompt)
    with torch.no_grad():
        evicted = prefill_and_evict(model, prompt, mask, 0.4)
    head = 2 * 8 * 4  # K + V of one head of width 8, fp32
    heads = torch.tensor([4, 2, 1])
    expect = torch.zeros(2, dtype=torch.float64)
    for layer in evicted.cache.layers:
        kept = ~layer.evicted
        assert kept.sum(1).tolist() == [8, 8]  # ceil(0.4 * 20) tokens per row and layer
        expect += ((heads[layer.expert_ids.long()] * head + 5) * kept).sum(1).double()
    assert torch.equal(evicted.kept_bytes, expect)
    assert evicted.native_bytes.tolist() == [20 * 3 * 4 * head] * 2  # 3 layers x 4 KV heads
    assert 0.4 * 0.5 * 0.8 < evicted.kept_share < 0.4 * 0.5 * 1.25  # about keep_ratio x budget


def test_response_nll_with_everything_kept_equals_the_plain_response_nll():
    from mixsga_train.evaluation.perplexity import evaluate_response_perplexity

    model = converted(tiny_model("llama"), method="gqa", kv_heads=2)
    ids = torch.randint(1, 96, (2, 14))
    labels = ids.clone()
    labels[:, :6] = -100
    labels[1, 11:] = -100  # row 1: right padding after 11 tokens
    attention = torch.ones_like(ids)
    attention[1, 11:] = 0
    batch = {"input_ids": ids, "labels": labels, "attention_mask": attention}
    nll, tokens, evicted = evicted_response_nll(model, batch, 1.0)
    plain = evaluate_response_perplexity(model, [batch], "topk")
    assert tokens == 8 + 5 == plain.tokens
    assert torch.tensor(nll / tokens).exp().item() == pytest.approx(plain.ppl, rel=1e-4)
    assert evicted.kept_share == pytest.approx(0.5)
    nll_half, _, half = evicted_response_nll(model, batch, 0.5)
    assert half.kept_share < 0.5 and nll_half != pytest.approx(nll)


@pytest.mark.parametrize(
    "cfg,match",
    [
        (dict(method="cla", budget=2 / 3), "not cla"),
        (None, "not unconverted"),
        (dict(method="gqa", kv_heads=2, decode_kernel="triton"), "decode_kernel=torch"),
    ],
)
def test_unsupported_combinations_fail_in_one_line(cfg, match):
    base = tiny_model("llama")
    model = base if cfg is None else converted(base, **cfg)
    prompt = torch.randint(1, 96, (1, 6))
    with pytest.raises(EvictionUnsupported, match=match):
        prefill_and_evict(model, prompt, torch.ones_like(prompt), 0.5)


def test_generation_with_everything_kept_equals_plain_generation_and_eviction_changes_it():
    """keep_ratio 1: the prefill-then-generate path gives GQA the same greedy responses as
    generate_and_score (left-padded batches); mixSGA routes the last prompt token by the decode
    policy there (it arrives after the evicted prefill), so only its bytes are compared. A small
    keep ratio keeps proportionally fewer bytes."""
    from mixsga_train.data.instructions import EvalExample, format_prompt
    from mixsga_train.evaluation.eviction import generate_with_eviction
    from mixsga_train.evaluation.generation import generate_and_score
    from mixsga_train.models.config import ModelConfig
    from mixsga_train.models.loading import load_model

    base, tokenizer = load_model(ModelConfig(name="tiny", source="tiny", max_seq_len=128, tiny_layers=2))
    examples = [
        EvalExample(format_prompt("Name a colour."), ["Blue."]),
        EvalExample(format_prompt("Add two and two.", "2 + 2"), ["4", "four"]),
        EvalExample("Hi there, what is new", ["Hello there."]),
    ]
    for cfg in (dict(method="gqa", kv_heads=1), dict(method="mixsga", expert_kv_heads=[2, 1], ratio="1:1")):
        model = converted(base, **cfg)
        kept, rouge, evicted = generate_with_eviction(model, tokenizer, examples, 1.0, 6, 2, 64)
        if cfg["method"] == "gqa":
            plain = generate_and_score(model, tokenizer, examples, max_new_tokens=6, batch_size=2, max_prompt_len=64)
            assert kept == plain.predictions and rouge == pytest.approx(plain.rouge_l)
            assert evicted.kept_share == pytest.approx(0.25)  # 1 of 4 KV heads
        else:  # top-k prompt at 1:1 over [2, 1] of 4 heads: 37.5% of native plus the id bytes
            assert 0.375 < evicted.kept_share < 0.375 * 1.1
        _, _, small = generate_with_eviction(model, tokenizer, examples, 0.2, 6, 2, 64)
        assert small.kept_share < 0.3 * evicted.kept_share
