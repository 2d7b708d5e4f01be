"""The router's gradient estimators: the counterfactual gate gives every expert's logit the
first-order loss change of moving the token there, without changing the forward pass."""

import pytest
import torch
from tiny import tiny_model

from mixsga_train.attention import AttentionConfig, convert_model, routing_context
from mixsga_train.attention.routing import RoutingContext, TokenRouter

COSTS = [1.0, 0.5, 0.25]


@pytest.mark.parametrize("capacity", [[0.3, 0.1, 0.6], [0.5, 0.0, 0.5]])
def test_counterfactual_gradient_is_the_kv_difference_times_the_output_gradient(capacity):
    """d loss / d s_e = <KV_e - KV_selected, dL/dout> on the sigmoid scores s."""
    torch.manual_seed(0)
    router = TokenRouter(6, capacity, 0, RoutingContext(mode="topk"), "counterfactual", costs=COSTS)
    x = torch.randn(2, 10, 6)
    kv = torch.randn(2, 10, 3, 5)  # each token's K/V under each expert
    weight = torch.randn(2, 10, 5)
    gates = router.route(x)
    logits = router.last_logits
    logits.retain_grad()
    out = (gates[..., None] * kv).sum(dim=2)
    assert torch.equal(out, kv.gather(2, router.last_ids[..., None, None].expand(-1, -1, 1, 5)).squeeze(2))
    ((out * weight) ** 2).sum().backward()
    grad_out = 2 * out * weight**2
    selected = kv.gather(2, router.last_ids[..., None, None].expand(-1, -1, 1, 5))
    expected = ((kv - selected) * grad_out[:, :, None]).sum(-1)
    expected[..., torch.tensor(capacity) == 0] = 0.0  # experts the ratio gives no tokens get no signal
    s = torch.sigmoid(logits.detach())
    assert torch.allclose(logits.grad, expected * s * (1 - s), atol=1e-5)  # d/dz through the sigmoid score
    assert (logits.grad.gather(2, router.last_ids[..., None]) == 0).all()  # staying put changes nothing


def _model(router_grad: str):
    model = tiny_model("llama", layers=2, seed=3)
    torch.manual_seed(7)
    convert_model(model, AttentionConfig(method="mixsga", ratio="3:1:6", router_grad=router_grad))
    return model


def _loss_with(model, ids, fixed):
    ctx = routing_context(model)
    ctx.mode, ctx.fixed_ids = "fixed", fixed
    return model(ids, labels=ids).loss


def test_counterfactual_pushes_a_token_toward_the_full_expert_exactly_when_moving_it_lowers_the_loss():
    model = _model("counterfactual")
    ids = torch.randint(1, 96, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(ids)
    fixed = {i: layer.self_attn.router.last_ids.clone() for i, layer in enumerate(model.model.layers)}
    with torch.no_grad():
        base = _loss_with(model, ids, fixed).item()
        change = {}
        for t in (fixed[0][0] == 2).nonzero().flatten().tolist():  # tokens of the cheapest expert, layer 0
            moved = {**fixed, 0: fixed[0].clone()}
            moved[0][0, t] = 0
            change[t] = _loss_with(model, ids, moved).item() - base
    lowers, raises = min(change, key=change.get), max(change, key=change.get)
    assert change[lowers] < 0 < change[raises]
    score_grad = _full_expert_logit_grad(model, ids, fixed)
    assert score_grad[lowers] < 0  # gradient descent raises its full-expert logit
    assert score_grad[raises] > 0  # and lowers this one's


def _full_expert_logit_grad(model, ids, fixed):
    """d loss / d logit[token, expert 0] of layer 0 for every token, under the model's router_grad."""
    model.zero_grad()
    captured = {}

    def keep(module, inputs, logits):
        logits.retain_grad()
        captured["logits"] = logits

    handle = model.model.layers[0].self_attn.router.proj.register_forward_hook(keep)
    try:
        _loss_with(model, ids, fixed).backward()
    finally:
        handle.remove()
    return captured["logits"].grad[0, :, 0]


def test_straight_through_gives_non_selected_experts_no_gradient():
    model = _model("straight_through")
    ids = torch.randint(1, 96, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(ids)
    fixed = {i: layer.self_attn.router.last_ids.clone() for i, layer in enumerate(model.model.layers)}
    grad = _full_expert_logit_grad(model, ids, fixed)
    assert (grad[fixed[0][0] != 0] == 0).all() and (grad[fixed[0][0] == 0] != 0).any()


def test_the_gradient_mode_does_not_change_the_forward_pass():
    ids = torch.randint(1, 96, (2, 16), generator=torch.Generator().manual_seed(2))
    outputs = {}
    for mode in ("counterfactual", "straight_through", "aux_only"):
        model = _model(mode).train()
        outputs[mode] = model(ids, labels=ids).logits
        with torch.no_grad():
            assert torch.equal(model(ids).logits, outputs[mode])
    assert torch.equal(outputs["counterfactual"], outputs["straight_through"])
    assert torch.equal(outputs["counterfactual"], outputs["aux_only"])
