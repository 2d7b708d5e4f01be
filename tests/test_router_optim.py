"""The routers' optimizer group: its own lr (router_lr_mult * lr, scaled by the schedule like the
rest) and no weight decay; and the router weight movement diagnostic."""

import pytest
import torch

from mixsga_train.attention import AttentionConfig, convert_model
from mixsga_train.config import TrainerConfig
from mixsga_train.training.distributed import init_distributed
from mixsga_train.training.engine_config import (
    deepspeed_config,
    lr_schedule,
    parameter_groups,
    relative_change,
    router_parameters,
)

from tiny import tiny_model


def test_router_group_has_its_lr_and_no_decay_and_follows_the_schedule():
    import deepspeed

    model = tiny_model("llama", layers=2)
    convert_model(model, AttentionConfig(method="mixsga", ratio="3:1:6"))
    cfg = TrainerConfig(zero_stage=0, lr=1e-3, router_lr_mult=10.0, weight_decay=0.1, warmup_ratio=0.2, max_steps=10)
    groups = parameter_groups(model, cfg)
    router = next(g for g in groups if g.get("name") == "router")
    assert {id(p) for p in router["params"]} == {id(p) for p in router_parameters(model).values()}
    assert len(router["params"]) == 4  # weight and bias of 2 layers
    assert all(".router." not in n for g in groups if g is not router for n, p in model.named_parameters()
               if any(p is q for q in g["params"]))
    dist = init_distributed()
    engine, optimizer, _, _ = deepspeed.initialize(
        model=model, model_parameters=groups, config=deepspeed_config(cfg, dist.world_size),
        lr_scheduler=lr_schedule(cfg, 10),
    )
    by_name = {g.get("name", i): g for i, g in enumerate(optimizer.param_groups)}
    assert by_name["router"]["weight_decay"] == 0.0 and by_name[0]["weight_decay"] == 0.1
    before = {n: p.detach().clone() for n, p in router_parameters(model).items()}
    seen = []
    for _ in range(4):
        loss = engine(input_ids=torch.randint(1, 96, (2, 12)), labels=torch.randint(1, 96, (2, 12))).loss
        engine.backward(loss)
        engine.step()
        seen.append(by_name[0]["lr"])
        assert by_name["router"]["lr"] == pytest.approx(10 * seen[-1])
    assert len(set(seen)) == 4 and max(seen) <= 1e-3  # warm-up then cosine: the schedule moves both groups
    change = relative_change(before, model)
    assert change is not None and change > 0
    expect = (sum(float((router_parameters(model)[n] - w).pow(2).sum()) for n, w in before.items())
              / sum(float(w.pow(2).sum()) for w in before.values())) ** 0.5
    assert change == pytest.approx(expect)


def test_models_without_routers_have_no_router_group():
    model = tiny_model("llama", layers=1)
    cfg = TrainerConfig(router_lr_mult=10.0)
    assert all(g.get("name") != "router" for g in parameter_groups(model, cfg))
    assert relative_change(router_parameters(model), model) is None
