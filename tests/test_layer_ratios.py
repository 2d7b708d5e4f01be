"""Per-layer mixSGA ratios (``attention.layer_ratios``): the budget is the mean of the layers'
budgets, each layer's router holds its own ratio (at top-k and under the budget decode policy), a
one-hot 1:0:0 layer is the native layer exactly, and the ratios survive save/load."""

import itertools

import pytest
import torch
from tiny import tiny_model

from mixsga_train.attention import AttentionConfig, convert_model, converted, load_converted, saved_attention
from mixsga_train.attention.budget import allocate_layer_ratios
from mixsga_train.errors import ConfigError

HEADS = [4, 2, 1]  # tiny models have 4 native KV heads


def mixsga(layer_ratios, **kw) -> AttentionConfig:
    return AttentionConfig(method="mixsga", expert_kv_heads=HEADS, layer_ratios=layer_ratios, **kw)


def test_budget_is_the_mean_of_the_layer_budgets():
    resolved = mixsga([[1, 0, 0], "0:1:0", [1, 1, 2]]).resolve(4, 3)
    layer_budgets = [1.0, 0.5, (1 * 1 + 1 * 0.5 + 2 * 0.25) / 4]
    assert resolved.kv_budget == pytest.approx(sum(layer_budgets) / 3)
    assert resolved.layer_ratios == [[1, 0, 0], [0, 1, 0], [0.25, 0.25, 0.5]]
    assert resolved.ratio == pytest.approx([1.25 / 3, 1.25 / 3, 0.5 / 3])
    assert "per-layer ratios 1:0:0 / 0:1:0 / 0.25:0.25:0.5" in resolved.describe()


@pytest.mark.parametrize(
    "layer_ratios, budget, key",
    [
        ([[1, 0, 0]] * 2, None, "attention.layer_ratios: has 2 entries but the model has 3 layers"),
        ([[1, 0, 0], [1, 0], [1, 0, 0]], None, "attention.layer_ratios[1]: has 2 shares for 3 experts"),
        ([[1, 0, 0], [0, 0, 0], [1, 0, 0]], None, "attention.layer_ratios[1]: "),
        ("1:0:0", None, "attention.layer_ratios: '1:0:0' is not a list"),
        ([[1, 0, 0]] * 3, 0.5, "attention.budget: 0.5 disagrees with layer_ratios"),
    ],
)
def test_bad_layer_ratios_name_the_key(layer_ratios, budget, key):
    with pytest.raises(ConfigError) as err:
        mixsga(layer_ratios, budget=budget).resolve(4, 3)
    assert str(err.value).startswith(key)


@torch.no_grad()
def test_each_layer_routes_to_its_own_ratio_and_a_full_layer_is_native():
    torch.manual_seed(0)
    reference = tiny_model("llama", kv_heads=4, layers=3)
    model = tiny_model("llama", kv_heads=4, layers=3)
    convert_model(model, mixsga([[1, 0, 0], [0, 0, 1], [1, 1, 2]]))
    handle = converted(model)
    ids = torch.randint(0, reference.config.vocab_size, (2, 16))
    want = reference(ids, output_hidden_states=True).hidden_states
    got = model(ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=1e-6)  # layer 0 is 1:0:0 = the native layer
    assert not torch.allclose(got[2], want[2], atol=1e-3)  # layer 1 keeps 1 of 4 KV heads
    routers = handle.routers
    assert torch.equal(routers[0].last_ids, torch.zeros(2, 16, dtype=torch.long))
    assert torch.equal(routers[1].last_ids, torch.full((2, 16), 2))
    counts = [torch.bincount(routers[2].last_ids[b], minlength=3).tolist() for b in range(2)]
    assert counts == [[4, 4, 8], [4, 4, 8]]  # top-k capacities of 1:1:2 on 16 tokens


@torch.no_grad()
def test_budget_decode_policy_holds_each_layers_own_budget():
    torch.manual_seed(1)
    model = tiny_model("llama", kv_heads=4, layers=3)
    convert_model(model, mixsga([[1, 1, 0], [0, 1, 1], [1, 0, 3]]))
    handle = converted(model)
    for router in handle.routers:  # adversarial: every token prefers the most expensive expert
        router.proj.weight.zero_()
        router.proj.bias.copy_(torch.tensor([5.0, 0.0, -5.0]))
    handle.context.mode = "causal"
    model(torch.randint(0, model.config.vocab_size, (3, 40)))
    costs = torch.tensor([1.0, 0.5, 0.25], dtype=torch.float64)
    for router, budget in zip(handle.routers, [0.75, 0.375, 0.4375]):
        spent = costs[router.last_ids].cumsum(dim=1)
        assert (spent <= budget * torch.arange(1, 41) + 1e-9).all()
        assert spent[:, -1].min() >= (budget - 0.25) * 40 - 1e-9  # the quota is used, not just respected


def test_layer_ratios_survive_save_and_load(tmp_path):
    model = tiny_model("llama", kv_heads=4, layers=3)
    resolved = convert_model(model, mixsga([[1, 0, 0], [0, 0, 1], [1, 1, 2]]))
    model.save_pretrained(tmp_path)
    assert saved_attention(tmp_path) == resolved
    loaded = load_converted(tmp_path)
    assert [r.capacity for r in converted(loaded).routers] == resolved.layer_ratios
    uniform = mixsga(None, ratio=resolved.ratio).resolve(4, 3)
    assert uniform.kv_budget == pytest.approx(resolved.kv_budget)
    assert uniform.weights_key() != resolved.weights_key()  # same mean ratio, different model


COSTS = [1.0, 0.5, 0.25]


def test_allocation_gives_the_budget_to_the_layer_that_needs_it():
    """Layer 0 loses 2 (5) at half (quarter) KV, the others 0.1 (0.3): at 50% the LP optimum is
    8 heads in layer 0, 4 in layer 1 (the first of three equal layers), 2 in layers 2 and 3."""
    sensitivity = [[0, 2, 5], [0, 0.1, 0.3], [0, 0.1, 0.3], [0, 0.1, 0.3]]
    assert allocate_layer_ratios(sensitivity, COSTS, 0.5) == [[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 1]]


def test_allocation_mixes_at_most_one_layer_and_spends_the_budget_exactly():
    shares = allocate_layer_ratios([[0, 1, 3], [0, 0.5, 2]], COSTS, 0.6)
    assert sum(c * x for row in shares for c, x in zip(COSTS, row)) / 2 == pytest.approx(0.6)
    assert sum(any(0 < x < 1 for x in row) for row in shares) <= 1
    assert all(sum(row) == pytest.approx(1) for row in shares)


def test_allocation_is_the_optimum_of_every_grid_allocation():
    """Brute force over every per-layer ratio on a 1/8 grid with the same mean budget: none has a
    lower modelled loss than the greedy's (it solves the LP exactly)."""
    gen = torch.Generator().manual_seed(3)
    grid = [[a / 8, b / 8, (8 - a - b) / 8] for a in range(9) for b in range(9 - a)]
    for _ in range(5):
        sensitivity = (torch.rand(3, 3, generator=gen) * torch.tensor([0.0, 1, 2])).cumsum(1).tolist()
        greedy = allocate_layer_ratios(sensitivity, COSTS, 0.5)
        best = min(
            sum(x * s for row, sens in zip(rows, sensitivity) for x, s in zip(row, sens))
            for rows in itertools.product(grid, repeat=3)
            if abs(sum(c * x for row in rows for c, x in zip(COSTS, row)) / 3 - 0.5) < 1e-9
        )
        loss = sum(x * s for row, sens in zip(greedy, sensitivity) for x, s in zip(row, sens))
        assert loss <= best + 1e-9


def test_allocation_refuses_a_budget_outside_the_experts_costs():
    with pytest.raises(ConfigError, match="outside the experts' cost range"):
        allocate_layer_ratios([[0, 1, 2]], COSTS, 0.2)
