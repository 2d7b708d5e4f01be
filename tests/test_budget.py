"""Budget math against the paper's own numbers (sections 1.10 and Table 11)."""

import pytest

from mixsga_train.attention.budget import (
    cla_budget,
    cla_sharing_groups,
    feasible_ratios,
    gqa_kv_heads_for_budget,
    mixsga_budget,
    parse_ratio,
    simplest_integer_ratio,
)
from mixsga_train.errors import ConfigError

PAPER = [4, 2, 1]  # group sizes 1, 2, 4 over 4 KV heads


@pytest.mark.parametrize(
    "ratio, budget",
    [
        ("3:1:6", 0.5),
        ("1:1:2", 0.5),
        ("1:6:2", 0.5),
        ("1:9:2", 0.5),
        ("0:1:0", 0.5),
        ("1:1:8", 0.35),
        ("0:0:1", 0.25),
        ("1:1:0", 0.75),
    ],
)
def test_paper_ratio_budgets(ratio, budget):
    assert mixsga_budget(parse_ratio(ratio), PAPER, 4) == pytest.approx(budget, abs=1e-12)
    # the same ratio on an 8-KV-head model (Llama 3.x) gives the same budget
    assert mixsga_budget(parse_ratio(ratio), [8, 4, 2], 8) == pytest.approx(budget, abs=1e-12)


def test_gemma2_grid_is_table_11():
    grid = feasible_ratios([4, 2, 1], 4, 0.5, 0.05)
    got = sorted(tuple(simplest_integer_ratio(r)) for r in grid)
    table_11 = sorted([(1, 17, 2), (1, 7, 2), (3, 11, 6), (1, 2, 2), (1, 1, 2), (3, 1, 6)])
    assert got == table_11


def test_step_01_grid_contains_the_50_percent_family():
    grid = [tuple(simplest_integer_ratio(r)) for r in feasible_ratios([4, 2, 1], 4, 0.5, 0.1)]
    # x : (1-3x) : 2x for x in {0.1, 0.2, 0.3}; x = 0 is 0:1:0 (plain GQA), kept only on request
    assert sorted(grid) == sorted([(1, 7, 2), (1, 2, 2), (3, 1, 6)])
    with_single = [
        tuple(simplest_integer_ratio(r)) for r in feasible_ratios([4, 2, 1], 4, 0.5, 0.1, mixtures_only=False)
    ]
    assert sorted(with_single) == sorted([(0, 1, 0), (1, 7, 2), (1, 2, 2), (3, 1, 6)])


def test_ratio_parsing_errors_name_the_key():
    with pytest.raises(ConfigError, match="attention.ratio.*negative"):
        parse_ratio([1, -1, 2])
    with pytest.raises(ConfigError, match="attention.ratio.*all zero"):
        parse_ratio("0:0:0")
    with pytest.raises(ConfigError, match="attention.ratio.*cannot parse"):
        parse_ratio("3:x:6")
    with pytest.raises(ConfigError, match="attention.ratio.*2 entries"):
        mixsga_budget([1, 1], PAPER, 4)


def test_gqa_heads_for_budget():
    assert gqa_kv_heads_for_budget(0.5, 8) == 4
    assert gqa_kv_heads_for_budget(1 / 3, 3) == 1
    with pytest.raises(ConfigError, match="reachable budgets"):
        gqa_kv_heads_for_budget(0.35, 4)


@pytest.mark.parametrize(
    "layers, budget, expected", [(22, 0.5, 0.5), (4, 0.75, 0.75), (12, 0.25, 0.25), (30, 1 / 3, 1 / 3)]
)
def test_cla_groups_reach_budget(layers, budget, expected):
    groups = cla_sharing_groups(layers, budget)
    assert [i for g in groups for i in g] == list(range(layers))  # consecutive, every layer once
    assert max(map(len, groups)) - min(map(len, groups)) <= 1
    assert cla_budget(groups) == pytest.approx(expected)


@pytest.mark.parametrize(
    "layers, budget, nearest",
    [
        (22, 0.25, "0.227273 (5 of 22 layers) or 0.272727 (6 of 22 layers)"),
        (22, 0.75, "0.727273 (16 of 22 layers) or 0.772727 (17 of 22 layers)"),
        (4, 0.35, "0.25 (1 of 4 layers) or 0.5 (2 of 4 layers)"),
        (3, 0.5, "0.333333 (1 of 3 layers) or 0.666667 (2 of 3 layers)"),
        (8, 0.1, "0.125 (1 of 8 layers)"),
    ],
)
def test_cla_refuses_budgets_off_its_grid_and_names_the_nearest(layers, budget, nearest):
    with pytest.raises(
        ConfigError,
        match=rf"^attention\.budget: CLA cannot reach {budget} with {layers} layers .*use "
        + nearest.replace("(", r"\(").replace(")", r"\)")
        + "$",
    ):
        cla_sharing_groups(layers, budget)


def test_cla_75_percent_mixes_pairs_and_singles():
    groups = cla_sharing_groups(4, 0.75)
    assert sorted(map(len, groups)) == [1, 1, 2]
