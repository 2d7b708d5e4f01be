"""The heterogeneous KV cache: generate() uses it, decodes exactly, and holds the budget in bytes."""

import copy

import pytest
import torch
from tiny import FAMILIES, tiny_model

from mixsga_train.attention import AttentionConfig, build_cache, convert_model, routing_context
from mixsga_train.attention.cache import KVBudgetCache, MixedKVLayer

D_H, H_KV, LAYERS, FP32 = 8, 4, 3, 4
NATIVE_BYTES = LAYERS * 2 * H_KV * D_H * FP32  # K + V, all layers


def converted(base, **cfg):
    model = copy.deepcopy(base)
    convert_model(model, AttentionConfig(**cfg))
    return model.eval()


def greedy(model, ids, mask=None, new=6):
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=new,
        do_sample=False,
        return_dict_in_generate=True,
        pad_token_id=0,
    )
    return out.sequences, out.cache


def replay_logits(model, cache, sequences, mask):
    """Full-sequence forward replaying the cache's routing decisions."""
    ctx = routing_context(model)
    fixed = {}
    for idx, layer in enumerate(cache.layers):
        last = torch.zeros(sequences.shape[0], 1, dtype=torch.long)  # the final token is never cached
        fixed[idx] = torch.cat([layer.expert_ids.long(), last], dim=1)
    ctx.mode, ctx.fixed_ids = "fixed", fixed
    try:
        with torch.no_grad():
            return model(input_ids=sequences, attention_mask=mask).logits
    finally:
        ctx.mode, ctx.fixed_ids = "auto", {}


def recompute_with_same_routing(model, cache, sequences, mask):
    """Greedy next tokens of the replayed full-sequence forward."""
    return replay_logits(model, cache, sequences, mask).argmax(-1)


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_uses_the_cache_and_matches_recomputation(family):
    model = converted(tiny_model(family), method="mixsga", ratio="3:1:6")
    prompt = torch.randint(1, 96, (2, 9))
    mask = torch.ones_like(prompt)
    mask[1, :3] = 0  # a shorter, left-padded second prompt
    seq, cache = greedy(model, prompt, mask, new=8)  # Gemma 2's window is 6: decoding crosses it
    assert isinstance(cache, KVBudgetCache)
    full_mask = torch.cat([mask, torch.ones(2, seq.shape[1] - 9, dtype=mask.dtype)], dim=1)
    predicted = recompute_with_same_routing(model, cache, seq, full_mask)
    assert torch.equal(predicted[:, 8:-1], seq[:, 9:])
    ids = cache.layers[0].expert_ids
    # prompt routed by top-k at within-budget capacities of each real prompt (9 tokens: 3, 0, 6; 6 tokens: 2, 0, 4)
    assert torch.bincount(ids[0, :9].long(), minlength=3).tolist() == [3, 0, 6]
    assert torch.bincount(ids[1, 3:9].long(), minlength=3).tolist() == [2, 0, 4]


def test_recomputation_check_can_fail():
    """Replaying *different* routing changes the logits, so the replay above is a real check."""
    model = converted(tiny_model("llama"), method="mixsga", ratio="3:1:6")
    seq, cache = greedy(model, torch.randint(1, 96, (1, 9)), new=8)
    with torch.no_grad():
        right = replay_logits(model, cache, seq, torch.ones_like(seq))
        for layer in cache.layers:
            layer.expert_ids = (2 - layer.expert_ids.long()).to(torch.uint8)
        wrong = replay_logits(model, cache, seq, torch.ones_like(seq))
    assert (right - wrong).abs().max() > 1e-3


@pytest.mark.parametrize(
    "ratio, budget", [("3:1:6", 0.5), ("1:1:2", 0.5), ("1:1:8", 0.35), ("0:0:1", 0.25), ("1:1:0", 0.75)]
)
def test_measured_bytes_equal_budget_plus_id_bytes(ratio, budget):
    model = converted(tiny_model("llama"), method="mixsga", ratio=ratio)
    _, cache = greedy(model, torch.randint(1, 96, (2, 20)), new=1)  # prefill only: 20 tokens, exact shares
    assert cache.get_seq_length() == 20
    # per token and layer: K/V at the budget, a uint8 expert id and an int32 slot position
    assert cache.kv_bytes_per_token() == pytest.approx(budget * NATIVE_BYTES + LAYERS * (1 + 4))
    assert cache.nbytes_reserved() >= cache.nbytes()


@pytest.mark.parametrize(
    "cfg, budget",
    [
        (dict(method="gqa", kv_heads=1), 0.25),
        (dict(method="gqa", kv_heads=2), 0.5),
        (dict(method="cla", budget=2 / 3), 2 / 3),
    ],
)
def test_baseline_caches_hold_their_budget(cfg, budget):
    model = converted(tiny_model("llama"), **cfg)
    _, cache = greedy(model, torch.randint(1, 96, (2, 10)), new=4)
    assert cache.kv_bytes_per_token() == pytest.approx(budget * NATIVE_BYTES)


def test_unconverted_model_bytes_are_native():
    from mixsga_train.attention.cache import dynamic_cache_bytes_per_token

    _, cache = greedy(tiny_model("llama"), torch.randint(1, 96, (2, 5)), new=3)
    assert dynamic_cache_bytes_per_token(cache) == NATIVE_BYTES


def test_gqa_and_cla_decode_like_full_recomputation():
    for cfg in (dict(method="gqa", kv_heads=1), dict(method="cla", budget=0.5)):
        model = converted(tiny_model("llama", layers=4), **cfg)
        prompt = torch.randint(1, 96, (1, 7))
        seq, _ = greedy(model, prompt, new=6)
        with torch.no_grad():
            assert torch.equal(model(seq).logits.argmax(-1)[:, 6:-1], seq[:, 7:])


def test_cache_stores_each_token_at_its_experts_head_count():
    model = converted(tiny_model("llama"), method="mixsga", ratio="3:1:6")
    _, cache = greedy(model, torch.randint(1, 96, (1, 10)), new=1)
    layer = cache.layers[1]
    assert isinstance(layer, MixedKVLayer) and layer.expert_ids.dtype == torch.uint8
    assert layer.counts.tolist() == [[3, 1, 6]]
    assert [tuple(k.shape[:2]) + (k.shape[3],) for k in layer.key_buffers] == [(4, 1, 8), (2, 1, 8), (1, 1, 8)]
    for e, count in enumerate((3, 1, 6)):  # each expert's slots hold the positions of its tokens, in order
        positions = (layer.expert_ids[0] == e).nonzero().flatten().tolist()
        assert layer.slot_positions[e][0, :count].tolist() == positions


def test_build_cache_is_the_generate_default_and_can_be_passed_explicitly():
    model = converted(tiny_model("llama"), method="mixsga", ratio="3:1:6")
    prompt = torch.randint(1, 96, (1, 8))
    cache = build_cache(model)
    out = model.generate(
        prompt, cache=cache, max_new_tokens=3, do_sample=False, return_dict_in_generate=True, pad_token_id=0
    )
    assert out.cache is cache and cache.get_seq_length() == 10


def test_generate_plans_the_buffers_for_prompt_plus_new_tokens():
    """generate() allocates each buffer once for prompt + max_new_tokens - 1 cached tokens: a GQA
    cache ends with no slack; mixSGA's experts start at their ratio's share (+1 scratch slot) and
    the tokens are what an unplanned, growing cache decodes."""
    base = tiny_model("llama")
    prompt = torch.randint(1, 96, (2, 40))
    gqa = converted(base, method="gqa", budget=0.5)
    _, cache = greedy(gqa, prompt, new=25)
    assert cache.get_seq_length() == 64 and cache.nbytes_reserved() == cache.nbytes()
    assert all(layer.key_buffers[0].shape[2] == 64 for layer in cache.layers)
    unplanned = build_cache(gqa)
    gqa.generate(prompt, cache=unplanned, max_new_tokens=25, do_sample=False, pad_token_id=0)
    assert unplanned.nbytes_reserved() > cache.nbytes_reserved()  # grown 16 -> ... -> 64+ with 1.25x slack

    mix = converted(base, method="mixsga", ratio="3:1:6")
    planned_tokens, planned = greedy(mix, prompt, new=25)
    sizes = [b.shape[2] for b in planned.layers[0].key_buffers]
    assert all(size >= want for size, want in zip(sizes, [21, 8, 40]))  # ceil(0.3/0.1/0.6 x 64) + 1, or grown
    for layer in planned.layers:  # growth stops at the plan: no expert can hold more than all 64 tokens
        assert all(b.shape[2] <= 64 + 1 for b in layer.key_buffers + layer.value_buffers)
    grown = build_cache(mix)
    grown_tokens = mix.generate(prompt, cache=grown, max_new_tokens=25, do_sample=False, pad_token_id=0)
    assert torch.equal(planned_tokens, grown_tokens) and planned.nbytes() == grown.nbytes()


def test_a_planned_buffer_grows_no_further_than_the_plan():
    """argmax decoding with routers that always want the full expert: the full expert, planned at
    30% of 67 tokens, must take ~62. Growing by 1.25x would overshoot to 69 slots; it stops at 68
    (every token + the scratch slot)."""
    model = converted(tiny_model("llama"), method="mixsga", ratio="3:1:6", decode_policy="argmax")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.router.proj.bias.copy_(torch.tensor([20.0, 0.0, -20.0]))
    _, cache = greedy(model, torch.randint(1, 96, (1, 8)), new=60)
    assert cache.get_seq_length() == 67
    full = [layer.key_buffers[0].shape[2] for layer in cache.layers]
    assert all(size == 68 for size in full) and all(layer.counts[0, 0] >= 60 for layer in cache.layers)
