"""The decode routing policy: ``budget`` keeps every sequence's generated K/V within the budget at
every prefix, ``argmax`` is eq. 3, and ``causal`` routing of a whole block equals token-by-token decoding."""

import copy

import pytest
import torch
from tiny import tiny_model

from mixsga_train.attention import AttentionConfig, convert_model, routing_context
from mixsga_train.attention.routing import budget_decode_route

COSTS = torch.tensor([1.0, 0.5, 0.25])


def prefix_shares(ids: torch.Tensor, costs: torch.Tensor) -> torch.Tensor:
    """[B, T] expert ids -> [B, T] mean K/V cost of each prefix."""
    spent = costs[ids].double().cumsum(1)
    return spent / torch.arange(1, ids.shape[1] + 1, dtype=torch.float64)


def test_budget_policy_holds_every_prefix_against_a_router_that_always_wants_the_full_expert():
    scores = torch.tensor([3.0, 2.0, 1.0]).expand(3, 50, 3)  # preference: full > half > quarter
    mask = torch.ones(3, 50, dtype=torch.bool)
    mask[1, :20] = False  # a ragged batch: left padding counts nothing
    spent, tokens = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.long)
    ids = budget_decode_route(scores, COSTS, torch.ones(3, dtype=torch.bool), 0.5, spent, tokens, mask)
    for b in range(3):
        real = ids[b][mask[b]]
        assert (prefix_shares(real[None], COSTS) <= 0.5 + 1e-12).all()
        assert tokens[b] == len(real) and spent[b] == pytest.approx(COSTS[real].sum().item())
        # greedy quota: the full expert whenever it fits, else the half one, else the quarter one
        expect, used = [], 0.0
        for t in range(1, len(real) + 1):
            e = next(e for e in range(3) if used + COSTS[e].item() <= 0.5 * t + 1e-9)
            expect.append(e)
            used += COSTS[e].item()
        assert real.tolist() == expect
    assert (ids[1][:20] == 2).all()  # padding: the cheapest expert
    # ranking full > half > quarter on every token: the half expert fits every time and spends the budget exactly
    assert (ids[0] == 1).all()


def test_budget_policy_follows_the_router_when_it_already_fits():
    scores = torch.randn(2, 30, 3)
    scores[..., 2] += 10  # prefers the cheapest expert
    ids = budget_decode_route(
        scores,
        COSTS,
        torch.ones(3, dtype=torch.bool),
        0.5,
        torch.zeros(2, dtype=torch.float64),
        torch.zeros(2, dtype=torch.long),
    )
    assert torch.equal(ids, scores.argmax(-1))


def converted(base, **cfg):
    model = copy.deepcopy(base)
    torch.manual_seed(5)
    convert_model(model, AttentionConfig(**cfg))
    return model.eval()


def adversarial(model):
    """Every router strongly prefers the full expert."""
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.router.proj.bias.copy_(torch.tensor([20.0, 0.0, -20.0]))
    return model


def generate(model, prompt, mask, new=12):
    """Greedy decoding of exactly ``new`` tokens (no early EOS): sequences, cache, step logits."""
    out = model.generate(
        input_ids=prompt,
        attention_mask=mask,
        max_new_tokens=new,
        min_new_tokens=new,
        do_sample=False,
        return_dict_in_generate=True,
        output_logits=True,
        pad_token_id=0,
    )
    return out.sequences, out.cache, torch.stack(out.logits, dim=1)  # step logits [B, new, V], unprocessed


@pytest.mark.parametrize("policy,holds", [("budget", True), ("argmax", False)])
def test_generated_kv_stays_within_budget_for_every_prefix_of_every_sequence_and_layer(policy, holds):
    model = adversarial(converted(tiny_model("llama"), method="mixsga", ratio="3:1:6", decode_policy=policy))
    prompt = torch.randint(1, 96, (2, 9))
    mask = torch.ones_like(prompt)
    mask[1, :4] = 0
    _, cache, _ = generate(model, prompt, mask)
    for layer in cache.layers:
        generated = layer.expert_ids[:, 9:].long()  # the prompt is routed by top-k, at its capacities
        shares = prefix_shares(generated, COSTS)
        assert bool((shares <= 0.5 + 1e-12).all()) == holds
    if not holds:
        assert (cache.layers[0].expert_ids[:, 9:] == 0).all()  # argmax: eq. 3 takes the full expert every time


def test_causal_routing_of_a_block_equals_token_by_token_decoding():
    model = converted(tiny_model("llama"), method="mixsga", ratio="3:1:6")
    ctx = routing_context(model)
    prompt = torch.randint(1, 96, (2, 7))
    mask = torch.ones_like(prompt)
    mask[0, :2] = 0
    ctx.mode = "causal"
    seq, cache, step_logits = generate(model, prompt, mask, new=10)
    full_mask = torch.cat([mask, torch.ones(2, seq.shape[1] - 7, dtype=mask.dtype)], dim=1)
    with torch.no_grad():
        logits = model(input_ids=seq, attention_mask=full_mask).logits
    for i, layer in enumerate(model.model.layers):
        block_ids = layer.self_attn.router.last_ids[:, :-1]
        real = full_mask[:, :-1].bool()
        assert torch.equal(block_ids[real], cache.layers[i].expert_ids.long()[real])
        shares = prefix_shares(torch.where(real, block_ids, 2)[1:], COSTS)  # row 1 has no padding
        assert (shares <= 0.5 + 1e-12).all()
    assert torch.allclose(logits[:, 6:-1], step_logits, atol=1e-5)  # the block forward = decoding


def test_one_to_zero_to_zero_decodes_like_the_original_and_zero_one_zero_like_gqa():
    base = tiny_model("llama")
    prompt = torch.randint(1, 96, (2, 8))
    mask = torch.ones_like(prompt)
    mask[1, :3] = 0
    original = generate(base, prompt, mask)[0]
    assert torch.equal(generate(converted(base, method="mixsga", ratio="1:0:0"), prompt, mask)[0], original)
    gqa = generate(converted(base, method="gqa", kv_heads=2), prompt, mask)[0]
    assert torch.equal(generate(converted(base, method="mixsga", ratio="0:1:0"), prompt, mask)[0], gqa)
