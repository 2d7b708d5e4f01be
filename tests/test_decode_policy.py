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


def test_calibrated_thresholds_reproduce_top_k_on_a_known_score_distribution():
    """Scores built so top-k's answer is known: i.i.d. logits, progressive top-k at 3:1:6 over long
    sequences. The calibrated thresholds are the quantiles that leave 30% / (10/70) above them, and
    the per-token rule then picks the same expert as top-k for nearly every token."""
    from mixsga_train.attention.routing import calibrate_thresholds, progressive_topk

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(40, 500, 3, generator=gen)
    ids = progressive_topk(torch.sigmoid(logits), [0.3, 0.1, 0.6], [1.0, 0.5, 0.25])
    tau = calibrate_thresholds(logits.reshape(-1, 3), ids.reshape(-1))
    assert tau[2] == -float("inf")
    normal = torch.distributions.Normal(0.0, 1.0)
    assert tau[0].item() == pytest.approx(normal.icdf(torch.tensor(0.7)).item(), abs=0.03)
    assert tau[1].item() == pytest.approx(normal.icdf(torch.tensor(1 - 1 / 7)).item(), abs=0.05)
    rule = (logits > tau).long().argmax(-1)
    assert (rule == ids).double().mean() > 0.97
    shares = torch.bincount(rule.reshape(-1), minlength=3).double() / rule.numel()
    torch.testing.assert_close(shares, torch.tensor([0.3, 0.1, 0.6], dtype=torch.float64), atol=0.01, rtol=0)


def test_calibrated_policy_decodes_at_the_ratio_where_the_budget_policy_falls_short():
    """A router whose logits favour the cheap expert: ``budget`` follows it and decodes far below the
    budget; ``calibrated`` (thresholds fitted on top-k routing of training-like data) decodes at
    the ratio's shares, and every prefix still holds the budget."""
    from mixsga_train.attention import calibrate_decode_thresholds

    base = tiny_model("llama")
    prompts = torch.randint(1, 96, (4, 12))
    shares = {}
    for policy in ("budget", "calibrated"):
        model = converted(base, method="mixsga", ratio="1:1:2", decode_policy=policy)
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.router.proj.bias.copy_(torch.tensor([-1.0, 0.0, 3.0]))
        calibrate_decode_thresholds(model, [{"input_ids": torch.randint(1, 96, (8, 64))}])
        ctx = routing_context(model)
        ctx.mode = "causal"
        with torch.no_grad():
            model(input_ids=torch.randint(1, 96, (8, 200)))
        ids = torch.cat([layer.self_attn.router.last_ids for layer in model.model.layers])
        assert (prefix_shares(ids, COSTS) <= 0.5 + 1e-12).all()
        shares[policy] = torch.bincount(ids.reshape(-1), minlength=3).double() / ids.numel()
        if policy == "calibrated":  # generate(): top-k prompt, then the policy on generated tokens alone
            ctx.mode = "auto"
            _, cache, _ = generate(model, prompts, torch.ones_like(prompts))
            for layer in cache.layers:
                assert (prefix_shares(layer.expert_ids[:, 12:].long(), COSTS) <= 0.5 + 1e-12).all()
    assert shares["budget"][2] > 0.9  # the router's argmax: nearly everything in the cheapest expert
    ratio = torch.tensor([0.25, 0.25, 0.5], dtype=torch.float64)
    torch.testing.assert_close(shares["calibrated"], ratio, atol=0.06, rtol=0)


def test_calibrated_policy_without_thresholds_routes_like_budget_and_thresholds_survive_save_and_load(tmp_path, caplog):
    from mixsga_train.attention import calibrate_decode_thresholds, load_converted

    base = tiny_model("llama")
    ids = torch.randint(1, 96, (2, 30))
    routed = {}
    for policy in ("budget", "calibrated"):
        model = adversarial(converted(base, method="mixsga", ratio="3:1:6", decode_policy=policy))
        routing_context(model).mode = "causal"
        with caplog.at_level("WARNING"), torch.no_grad():
            model(input_ids=ids)
        routed[policy] = [layer.self_attn.router.last_ids for layer in model.model.layers]
    assert all(torch.equal(a, b) for a, b in zip(routed["budget"], routed["calibrated"]))
    assert "has no thresholds yet, so it routes like 'budget'" in caplog.text
    thresholds = calibrate_decode_thresholds(model, [{"input_ids": torch.randint(1, 96, (4, 40))}])
    model.save_pretrained(tmp_path)
    loaded = load_converted(tmp_path)
    for layer, want in zip(loaded.model.layers, thresholds):
        torch.testing.assert_close(layer.self_attn.router.decode_thresholds, want)


def deviations(ids: torch.Tensor, costs: torch.Tensor, budget: float) -> torch.Tensor:
    """[B, T] expert ids -> [B, T] D_t = spent_t - budget * t after each prefix."""
    return costs[ids].double().cumsum(1) - budget * torch.arange(1, ids.shape[1] + 1, dtype=torch.float64)


def balanced_route(scores, band, mask=None, costs=COSTS, budget=0.5):
    batch = scores.shape[0]
    allowed = torch.ones(len(costs), dtype=torch.bool)
    spent, tokens = torch.zeros(batch, dtype=torch.float64), torch.zeros(batch, dtype=torch.long)
    return budget_decode_route(scores, costs, allowed, budget, spent, tokens, mask, band=band)


@pytest.mark.parametrize("preferred", [0, 1, 2])
@pytest.mark.parametrize("sink,slack", [(0, 1.0), (1, 1.0), (4, 1.0), (1, 4.0)])
def test_balanced_policy_keeps_every_prefix_inside_its_band_for_any_router(preferred, sink, slack):
    """Whatever the router wants (always full, always half, always quarter, or random), every
    prefix's deviation from the budget stays in [-floor, credit], so the realised share of T tokens
    is within floor/T below and credit/T above the budget; the sinks take the full expert."""
    from mixsga_train.attention.routing import DecodeBand

    band = DecodeBand.for_router(COSTS.tolist(), [True] * 3, 0.5, sink, slack)
    assert band.credit == pytest.approx(max(sink, 1) * 0.5) and band.floor == pytest.approx(slack * 0.75)
    scores = torch.randn(4, 300, 3)
    scores[:3, :, preferred] += 50  # rows 0-2: an extreme router; row 3: random preferences
    mask = torch.ones(4, 300, dtype=torch.bool)
    mask[2, :40] = False  # left padding: the sink is the first *real* token
    ids = balanced_route(scores, band, mask)
    for b in range(4):
        real = ids[b][mask[b]]
        dev = deviations(real[None], COSTS, 0.5)[0]
        assert (dev <= band.credit + 1e-9).all() and (dev >= -band.floor - 1e-9).all()
        assert (real[:sink] == 0).all()
    assert (ids[2, :40] == 2).all()  # padding: the cheapest expert


def test_balanced_policy_spends_the_budget_where_the_one_sided_quota_undershoots():
    """A router that prefers the cheapest expert: ``budget`` follows it (25% of native spent for a 50%
    budget), ``balanced`` forces upgrades and lands on the budget; with a router that already fits
    both agree, apart from the sink."""
    from mixsga_train.attention.routing import DecodeBand

    band = DecodeBand.for_router(COSTS.tolist(), [True] * 3, 0.5, 1, 4.0)
    cheap = torch.randn(2, 400, 3)
    cheap[..., 2] += 50
    one_sided = balanced_route(cheap, None)
    two_sided = balanced_route(cheap, band)
    assert COSTS[one_sided].mean().item() == pytest.approx(0.25)
    assert abs(COSTS[two_sided].double().mean().item() - 0.5) <= band.floor / 400 + 1e-9
    assert (two_sided[:, 0] == 0).all() and (one_sided[:, 0] == 2).all()  # the sink keeps its heads
    # where the router's choices already keep the band, balanced is exactly the router's argmax
    fits = torch.tensor([[0, 2, 2, 1, 1, 0, 2, 2, 1, 1] * 10])  # spends 0.5 per 10 tokens.repeat(2, 1)
    scores = torch.nn.functional.one_hot(fits, 3).float() * 10
    assert torch.equal(balanced_route(scores, band), fits)


def test_balanced_policy_protects_the_sink_only_when_routing_starts_at_the_sequence_start():
    """Causal routing of a block starts at token 0, so token 0 keeps the full expert; a prompt routed
    by top-k followed by decoding has no sink among the generated tokens. Generated K/V stays within
    [-floor, credit] of the budget at every prefix of every layer."""
    from mixsga_train.attention.routing import DecodeBand

    model = converted(tiny_model("llama"), method="mixsga", ratio="3:1:6", decode_policy="balanced")
    with torch.no_grad():
        for layer in model.model.layers:  # every router strongly prefers the cheapest expert
            layer.self_attn.router.proj.bias.copy_(torch.tensor([-20.0, 0.0, 20.0]))
    ctx = routing_context(model)
    band = DecodeBand.for_router(COSTS.tolist(), [True] * 3, 0.5, 1, 4.0)
    ctx.mode = "causal"
    with torch.no_grad():
        model(input_ids=torch.randint(1, 96, (2, 40)))
    for layer in model.model.layers:
        ids = layer.self_attn.router.last_ids
        assert (ids[:, 0] == 0).all()
        dev = deviations(ids, COSTS, 0.5)
        assert (dev <= band.credit + 1e-9).all() and (dev >= -band.floor - 1e-9).all()
    ctx.mode = "auto"
    prompt = torch.randint(1, 96, (2, 9))
    _, cache, _ = generate(model, prompt, torch.ones_like(prompt), new=30)
    for layer in cache.layers:
        generated = layer.expert_ids[:, 9:].long()
        assert (generated[:, 0] == 2).all()  # no sink credit spent on the first generated token
        dev = deviations(generated, COSTS, 0.5)
        assert (dev <= band.credit + 1e-9).all() and (dev >= -band.floor - 1e-9).all()
        assert (generated != 2).any()  # the floor forced upgrades the router did not want


def test_balanced_policy_settings_are_validated_and_reach_the_routing_context():
    from mixsga_train.attention import converted as handle_of
    from mixsga_train.errors import ConfigError

    base = tiny_model("llama")
    model = converted(base, method="mixsga", ratio="3:1:6", decode_policy="balanced", sink_tokens=4, decode_slack=8)
    ctx = handle_of(model).context
    assert (ctx.decode_policy, ctx.sink_tokens, ctx.decode_slack) == ("balanced", 4, 8.0)
    for key, value in (("sink_tokens", -1), ("decode_slack", 0.5)):
        with pytest.raises(ConfigError, match=f"attention.{key}"):
            converted(base, method="mixsga", ratio="3:1:6", **{key: value})
