"""Training only the routers lowers the aux loss and makes argmax agree with top-k (eqs. 3-5)."""

import copy
import tempfile

import torch
from tiny import tiny_model

from mixsga_train.attention import (
    AttentionConfig,
    RoutingStats,
    aux_loss,
    convert_model,
    converted,
    load_converted,
    routers,
    routing_context,
)


def agreement(model, ids):
    ctx = routing_context(model)
    ctx.stats = RoutingStats(3)
    with torch.no_grad():
        model(ids)
    value, ctx.stats = ctx.stats.agreement, None
    return value


def test_router_only_training_lowers_aux_loss_and_raises_agreement():
    model = tiny_model("llama")
    convert_model(model, AttentionConfig(method="mixsga", ratio="3:1:6", alpha=1.0, router_grad="aux_only"))
    for p in model.parameters():
        p.requires_grad_(False)
    params = [p for r in routers(model) for p in r.parameters()]
    for p in params:
        p.requires_grad_(True)
    data = torch.randint(0, 96, (8, 32), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.Adam(params, lr=3e-2)
    model.train()
    before_agree = agreement(model.eval(), data)
    model.train()
    losses = []
    for _ in range(40):
        out = model(data, labels=data)
        losses.append(aux_loss(model).item())
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    after_agree = agreement(model.eval(), data)
    assert losses[-1] < 0.7 * losses[0], losses[::10]
    assert after_agree > before_agree + 0.2, (before_agree, after_agree)


def test_training_loss_includes_alpha_times_aux():
    base = tiny_model("llama")
    ids = torch.randint(0, 96, (2, 16))
    losses = {}
    for alpha in (0.0, 2.0):
        model = copy.deepcopy(base)
        convert_model(model, AttentionConfig(method="mixsga", ratio="3:1:6", alpha=alpha))
        for r in routers(model):  # same router weights in both runs
            torch.manual_seed(r.layer_idx)
            torch.nn.init.normal_(r.proj.weight)
        model.train()
        losses[alpha] = (model(ids, labels=ids).loss.item(), aux_loss(model).item())
    (lm, aux), (total, aux2) = losses[0.0], losses[2.0]
    assert aux == aux2 and abs(total - (lm + 2.0 * aux)) < 1e-5


def test_straight_through_sends_lm_gradient_to_the_router_and_aux_only_does_not():
    base = tiny_model("llama")
    ids = torch.randint(0, 96, (2, 16))
    for mode, expect_grad in (("counterfactual", True), ("straight_through", True), ("aux_only", False)):
        model = copy.deepcopy(base)
        convert_model(model, AttentionConfig(method="mixsga", ratio="3:1:6", alpha=0.0, router_grad=mode))
        model.train()
        model(ids, labels=ids).loss.backward()
        grad = routers(model)[0].proj.weight.grad
        assert (grad is not None and grad.abs().sum() > 0) == expect_grad, mode


def test_save_and_load_round_trip_with_identical_logits():
    for cfg in (
        dict(method="mixsga", ratio="1:1:2", router_grad="aux_only"),
        dict(method="gqa", kv_heads=1),
        dict(method="cla", budget=0.5),
    ):
        model = tiny_model("qwen2", layers=4)
        resolved = convert_model(model, AttentionConfig(**cfg))
        ids = torch.randint(0, 96, (2, 12))
        with tempfile.TemporaryDirectory() as d:
            model.save_pretrained(d)
            loaded = load_converted(d)
        assert converted(loaded).attention == resolved
        with torch.no_grad():
            assert torch.equal(model(ids).logits, loaded(ids).logits), cfg
