"""Progressive top-k (eq. 2) with within-budget capacities, argmax routing (eq. 3) and the aux loss (eq. 4)."""

import pytest
import torch

from mixsga_train.attention.budget import normalise_ratio
from mixsga_train.attention.routing import (
    RoutingContext,
    TokenRouter,
    capacity_counts,
    expert_counts,
    progressive_topk,
    router_aux_loss,
)

RHO = [0.3, 0.1, 0.6]
COSTS = [1.0, 0.5, 0.25]  # experts [8, 4, 2] of 8 native KV heads


def test_exact_counts_for_full_sequence():
    scores = torch.rand(4, 20, 3, generator=torch.Generator().manual_seed(0))
    ids = progressive_topk(scores, RHO, COSTS)
    for row in ids:
        assert torch.bincount(row, minlength=3).tolist() == [6, 2, 12]


def test_rounding_never_exceeds_the_budget():
    # L = 9: largest remainder gives 3, 1, 5 (4.75 > 4.5 native-token units); the cheapest fix moves
    # expert 1's rounded-up token to expert 2: 3, 0, 6 costs exactly 4.5
    assert capacity_counts(9, tuple(RHO), tuple(COSTS)) == (3, 0, 6)
    ids = progressive_topk(torch.rand(1, 9, 3), RHO, COSTS)
    assert torch.bincount(ids[0], minlength=3).tolist() == [3, 0, 6]


# the paper's 50% grid over [8, 4, 2] (same costs as [4, 2, 1]), the single-expert points, and the
# SmolLM2 67% / 50% points over [3, 1] of 3 native heads
CASES = [(r, COSTS) for r in ([3, 1, 6], [1, 2, 2], [1, 8, 2], [1, 1, 2], [3, 11, 6], [1, 17, 2], [1, 7, 2])]
CASES += [([1, 1], [1.0, 1 / 3]), ([1, 3], [1.0, 1 / 3]), ([0, 1, 0], COSTS), ([1, 0, 0], COSTS)]


@pytest.mark.parametrize("ratio,costs", CASES)
def test_capacities_stay_within_budget_and_within_one_of_the_share_for_every_length(ratio, costs):
    rho = normalise_ratio(ratio)
    budget = sum(r * c for r, c in zip(rho, costs))
    for n in range(1, 201):
        counts = capacity_counts(n, tuple(rho), tuple(costs))
        assert sum(counts) == n
        assert sum(k * c for k, c in zip(counts, costs)) <= budget * n + 1e-9, (n, counts)
        assert all(abs(k - r * n) < 1 for k, r in zip(counts, rho)), (n, counts)


def test_ragged_padded_batch_counts_real_tokens_only():
    lengths = [10, 7, 3, 1]
    mask = torch.zeros(4, 10, dtype=torch.bool)
    for b, n in enumerate(lengths):
        mask[b, 10 - n:] = True  # left padding
    ids = progressive_topk(torch.rand(4, 10, 3), RHO, COSTS, mask)
    for b, n in enumerate(lengths):
        real = ids[b][mask[b]]
        assert torch.bincount(real, minlength=3).tolist() == list(capacity_counts(n, tuple(RHO), tuple(COSTS)))
        assert (ids[b][~mask[b]] == 2).all()  # padding goes to the cheapest expert
    assert expert_counts(ids, 3, mask).sum() == sum(lengths)


def test_each_expert_takes_its_highest_scores_in_order():
    scores = torch.tensor([[[0.9, 0.1, 0.0], [0.8, 0.9, 0.0], [0.1, 0.8, 0.0], [0.2, 0.3, 0.0], [0.95, 0.0, 0.0]]])
    ids = progressive_topk(scores, [0.4, 0.2, 0.4], COSTS)  # k = 2, 1, rest
    # expert 0 takes positions 4 (0.95) and 0 (0.9); expert 1 takes position 1 (0.9) among the rest
    assert ids[0].tolist() == [0, 1, 2, 2, 0]


def test_ties_go_to_earlier_positions():
    ids = progressive_topk(torch.full((1, 10, 3), 0.5), RHO, COSTS)
    assert ids[0].tolist() == [0, 0, 0, 1, 2, 2, 2, 2, 2, 2]


def test_aux_loss_is_bce_against_one_hot_over_real_tokens():
    logits = torch.randn(2, 5, 3)
    ids = torch.randint(0, 3, (2, 5))
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, :2] = False
    loss = router_aux_loss(logits, ids, mask)
    target = torch.nn.functional.one_hot(ids, 3).float()
    manual = torch.nn.functional.binary_cross_entropy_with_logits(logits[mask], target[mask])
    assert torch.allclose(loss, manual)


@pytest.mark.parametrize("mode", ["argmax", "causal"])
def test_decode_routing_skips_experts_the_ratio_gives_no_tokens(mode):
    router = TokenRouter(8, [1.0, 0.0, 0.0], 0, RoutingContext(mode=mode), costs=COSTS)
    with torch.no_grad():
        router.proj.bias.copy_(torch.tensor([-10.0, 10.0, 10.0]))  # raw argmax would never pick expert 0
        gates = router.route(torch.randn(2, 5, 8))
    assert (router.last_ids == 0).all() and torch.equal(gates, torch.nn.functional.one_hot(router.last_ids, 3).float())


def test_router_keeps_no_reference_to_its_input():
    import gc
    import weakref

    router = TokenRouter(8, RHO, 0, RoutingContext(), costs=COSTS)
    x = torch.randn(2, 10, 8)
    with torch.no_grad():
        first = router.route(x)
        assert router.route(x) is first  # K and V of one call share the decision
    alive = weakref.ref(x)
    del x
    gc.collect()
    assert alive() is None
    held = [v for v in vars(router).values() if isinstance(v, torch.Tensor) and v.dim() == 3]
    assert all(t.shape[-1] == 3 for t in held)  # only [B, L, E] routing tensors, nothing [B, L, D]


def test_unknown_routing_mode_is_refused():
    router = TokenRouter(8, RHO, 0, RoutingContext(mode="greedy"), costs=COSTS)
    with pytest.raises(ValueError, match="routing mode 'greedy'"):
        router.route(torch.randn(1, 3, 8))
