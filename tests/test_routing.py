"""Progressive top-k (eq. 2), argmax routing (eq. 3) and the aux loss (eq. 4)."""

import math

import torch

from mixsga_train.attention.routing import expert_counts, progressive_topk, router_aux_loss

RHO = [0.3, 0.1, 0.6]


def test_exact_counts_for_full_sequence():
    scores = torch.rand(4, 20, 3, generator=torch.Generator().manual_seed(0))
    ids = progressive_topk(scores, RHO)
    for row in ids:
        assert torch.bincount(row, minlength=3).tolist() == [6, 2, 12]


def test_ceil_rounding_and_remainder_to_last_expert():
    # L = 7: ceil(2.1) = 3, ceil(0.7) = 1, the last expert takes the remaining 3 (not ceil(4.2) = 5)
    ids = progressive_topk(torch.rand(1, 7, 3), RHO)
    assert torch.bincount(ids[0], minlength=3).tolist() == [3, 1, 3]


def test_ragged_padded_batch_counts_real_tokens_only():
    lengths = [10, 7, 3, 1]
    mask = torch.zeros(4, 10, dtype=torch.bool)
    for b, n in enumerate(lengths):
        mask[b, 10 - n:] = True  # left padding
    ids = progressive_topk(torch.rand(4, 10, 3), RHO, mask)
    for b, n in enumerate(lengths):
        real = ids[b][mask[b]]
        expect = [math.ceil(0.3 * n), 0, 0]
        expect[1] = min(math.ceil(round(0.1 * n, 9)), n - expect[0])
        expect[2] = n - expect[0] - expect[1]
        assert torch.bincount(real, minlength=3).tolist() == expect, (n, real)
        assert (ids[b][~mask[b]] == 2).all()  # padding goes to the cheapest expert
    assert expert_counts(ids, 3, mask).sum() == sum(lengths)


def test_each_expert_takes_its_highest_scores_in_order():
    scores = torch.tensor([[[0.9, 0.1, 0.0], [0.8, 0.9, 0.0], [0.1, 0.8, 0.0], [0.2, 0.3, 0.0], [0.95, 0.0, 0.0]]])
    ids = progressive_topk(scores, [0.4, 0.2, 0.4])  # k = 2, 1, rest
    # expert 0 takes positions 4 (0.95) and 0 (0.9); expert 1 takes position 1 (0.9) among the rest
    assert ids[0].tolist() == [0, 1, 2, 2, 0]


def test_ties_go_to_earlier_positions():
    ids = progressive_topk(torch.full((1, 10, 3), 0.5), RHO)
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


def test_argmax_decode_routing_skips_experts_the_ratio_gives_no_tokens():
    from mixsga_train.attention.routing import RoutingContext, TokenRouter

    router = TokenRouter(8, [1.0, 0.0, 0.0], 0, RoutingContext(mode="argmax"))
    with torch.no_grad():
        router.proj.bias.copy_(torch.tensor([-10.0, 10.0, 10.0]))  # raw argmax would never pick expert 0
        gates = router.route(torch.randn(2, 5, 8))
    assert (router.last_ids == 0).all() and torch.equal(gates, torch.nn.functional.one_hot(router.last_ids, 3).float())
