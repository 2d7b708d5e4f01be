"""The budget cache's read path: each expert read at its own head count, exact against the
reference read (native-size K/V rebuilt in token order + the family's own attention)."""

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from tiny import FAMILIES, tiny_model
from torch.utils._python_dispatch import TorchDispatchMode

from mixsga_train.attention import AttentionConfig, convert_model, routing_context
from mixsga_train.attention.cache import GROWTH, MIN_CAPACITY, KVBudgetCache, MixedKVLayer
from mixsga_train.attention.heads import HeadGrouping
from mixsga_train.attention.projections import SharedKVOwner

METHODS = {
    "mixsga": dict(method="mixsga", ratio="3:1:6"),
    "gqa": dict(method="gqa", kv_heads=2),
    "cla": dict(method="cla", budget=2 / 3),
}


def converted(family, cfg, **kw):
    model = tiny_model(family, **kw)
    torch.manual_seed(0)
    convert_model(model, AttentionConfig(**cfg))
    return model.eval()


def generate(model, ids, mask, new=8):
    return model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=new,
        do_sample=False,
        return_dict_in_generate=True,
        output_logits=True,
        pad_token_id=0,
    )


def with_reference_read(model):
    """A copy whose attention is the family's original function: the cache returns expanded K/V."""
    ref = copy.deepcopy(model)
    ref.config._attn_implementation = ref.config._attn_implementation.removeprefix("mixsga_")
    return ref


def padded_prompt(batch=2, length=9):
    ids = torch.randint(1, 96, (batch, length), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    return ids, mask


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_segment_read_equals_reference_read(family, method):
    """Batch 2, left padding, 8 new tokens (Gemma 2: softcapping, and a window of 6 the decode crosses)."""
    model = converted(family, METHODS[method])
    assert model.config._attn_implementation.startswith("mixsga_")
    ids, mask = padded_prompt()
    got, ref = generate(model, ids, mask), generate(with_reference_read(model), ids, mask)
    assert isinstance(got.past_key_values, KVBudgetCache)
    assert torch.equal(got.sequences, ref.sequences)
    for a, b in zip(got.logits, ref.logits):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_the_reference_comparison_can_fail():
    """Reading the wrong expert's buffer changes the logits, so the comparison above is a real check."""
    model = converted("llama", METHODS["mixsga"])
    ids, mask = padded_prompt()
    ref = generate(with_reference_read(model), ids, mask)
    original = MixedKVLayer.segment
    MixedKVLayer.segment = lambda self, e: (lambda s: (s[1], s[0], *s[2:]))(original(self, e))  # K <-> V
    try:
        got = generate(model, ids, mask)
    finally:
        MixedKVLayer.segment = original
    assert max((a - b).abs().max() for a, b in zip(got.logits[1:], ref.logits[1:])) > 1e-3
    assert torch.equal(got.logits[0], ref.logits[0])  # the prefill does not read the cache


@pytest.mark.parametrize(
    "cfg", [dict(method="gqa", kv_heads=2), dict(method="mixsga", ratio="1:1", expert_kv_heads=[2, 1])]
)
def test_uneven_head_groups(cfg):
    """3 native KV heads grouped into 2: one group of 2 heads, one of 1 (the segment is expanded)."""
    model = converted("llama", cfg, kv_heads=3, heads=6, hidden=48)
    ids, mask = padded_prompt()
    got, ref = generate(model, ids, mask, new=4), generate(with_reference_read(model), ids, mask, new=4)
    assert torch.equal(got.sequences, ref.sequences)
    for a, b in zip(got.logits, ref.logits):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_a_chunk_after_cached_tokens(family):
    """n > 1 new tokens after a cached prefix (causal inside the chunk, masks gathered per segment)."""
    model = converted(family, METHODS["mixsga"])
    ref_model = with_reference_read(model)
    ids, mask = padded_prompt(length=12)
    logits = []
    with torch.no_grad():
        for m in (model, ref_model):
            first = m(input_ids=ids[:, :7], attention_mask=mask[:, :7], use_cache=True)
            assert isinstance(first.past_key_values, KVBudgetCache)
            out = m(input_ids=ids[:, 7:], attention_mask=mask, past_key_values=first.past_key_values)
            logits.append(out.logits)
    torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=1e-5)


def test_a_row_with_no_token_in_an_expert():
    """Row 0 routes every token to expert 0 while row 1 uses both experts: expert 1's segment has no
    visible slot for row 0 (the CPU flash kernel returns lse 0, not -inf, for such a row; it must
    weigh 0). Decode steps and a chunk after cached tokens both equal the reference read."""
    model = converted("llama", dict(method="mixsga", ratio="1:1", expert_kv_heads=[4, 2]))
    ref_model = with_reference_read(model)
    ids = torch.randint(1, 96, (2, 10), generator=torch.Generator().manual_seed(5))
    routed = torch.zeros_like(ids)
    routed[1, 1::2] = 1  # row 1: every other token in expert 1; row 0: none
    logits = []
    for m in (model, ref_model):
        ctx = routing_context(m)
        ctx.mode = "fixed"  # the router replays the last L ids of fixed_ids[layer] for L new tokens

        def forward(end, ctx=ctx, m=m, **kw):
            ctx.fixed_ids = {layer: routed[:, :end] for layer in range(m.config.num_hidden_layers)}
            return m(input_ids=ids[:, end - kw.pop("new") : end], **kw)

        with torch.no_grad():
            out = forward(4, new=4, use_cache=True)
            cache, steps = out.past_key_values, [out.logits]
            for end in range(5, 8):  # one-token decode steps
                steps.append(forward(end, new=1, past_key_values=cache).logits)
            steps.append(forward(10, new=3, past_key_values=cache).logits)  # a 3-token chunk
        layer = cache.layers[0]
        assert layer.counts.tolist() == [[10, 0], [5, 5]]
        logits.append(torch.cat(steps, 1))
    assert torch.isfinite(logits[0]).all()
    torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=1e-5)


def test_buffers_grow_in_place_and_count_bytes():
    """Appends write only new tokens (buffers keep their storage until full, then grow by GROWTH);
    expanded() equals the tokens as given; bytes in use are exact, reserved bytes include the slack."""
    torch.manual_seed(0)
    groupings = [HeadGrouping(4, k) for k in (4, 2, 1)]
    router = SimpleNamespace(last_ids=None)  # the ids each update stores
    layer = MixedKVLayer(groupings, router)
    batch, d = 3, 8
    keys, values, ids_all = [], [], []
    pointers = set()
    for new in [5] + [1] * 110 + [3]:
        ids = torch.where(torch.rand(batch, new) < 0.8, 0, torch.randint(1, 3, (batch, new)))  # mostly expert 0
        k, v = torch.randn(batch, 4, new, d), torch.randn(batch, 4, new, d)
        # what a mixSGA projection emits: every head of a group holds the group's value
        for e, g in enumerate(groupings):
            pick = (ids == e)[:, None, :, None]
            k = torch.where(pick, k[:, g.representative][:, g.expand_index], k)
            v = torch.where(pick, v[:, g.representative][:, g.expand_index], v)
        router.last_ids = ids
        layer.update(k, v)
        keys.append(k), values.append(v), ids_all.append(ids)
        pointers.add(layer.key_buffers[0].data_ptr())
    longest = int(torch.cat(ids_all, 1).eq(0).sum(1).max())  # geometric growth: O(log) copies, not one per append
    assert 2 <= len(pointers) <= 2 + math.log(longest / MIN_CAPACITY, GROWTH) < 118 / 5
    got_k, got_v = layer.expanded()
    torch.testing.assert_close(got_k, torch.cat(keys, 2), rtol=0, atol=0)
    torch.testing.assert_close(got_v, torch.cat(values, 2), rtol=0, atol=0)
    ids = torch.cat(ids_all, 1)
    assert torch.equal(layer.expert_ids, ids.to(torch.uint8))
    counts = torch.stack([(ids == e).sum(1) for e in range(3)], 1)
    assert torch.equal(layer.counts, counts)
    per_token_kv = sum(2 * g.kv_heads * d * 4 * int(counts[:, e].sum()) for e, g in enumerate(groupings))
    assert layer.nbytes() == per_token_kv + ids.numel() * (1 + 4)
    assert layer.nbytes_reserved() >= layer.nbytes()
    for e in range(3):  # capacity: at least the longest row plus the scratch slot
        assert layer.key_buffers[e].shape[2] >= int(counts[:, e].max()) + 1


def test_cla_owner_drops_its_output_after_the_last_borrower():
    model = converted("llama", dict(method="cla", budget=0.5), layers=4)
    owners = [m for m in model.modules() if isinstance(m, SharedKVOwner)]
    assert owners and all(o.borrowers == 1 for o in owners)
    ids = torch.randint(1, 96, (1, 6))
    with torch.no_grad():
        model(ids)
    assert all(o.last_output is None for o in owners)
    model.train()
    model(ids, labels=ids).loss.backward()  # training forwards still reach every borrower


def test_use_cache_without_a_cache_returns_the_budget_cache():
    model = converted("llama", METHODS["gqa"])
    ids = torch.randint(1, 96, (1, 8))
    with torch.no_grad():
        out = model(ids[:, :6], use_cache=True)
        assert isinstance(out.past_key_values, KVBudgetCache)
        step = model(ids[:, 6:], past_key_values=out.past_key_values)
        full = model(ids, use_cache=False)
    assert full.past_key_values is None
    torch.testing.assert_close(step.logits, full.logits[:, 6:], rtol=0, atol=1e-5)


class SyncCounter(TorchDispatchMode):
    """Counts ops that make the host wait for the device (.item(), nonzero, boolean indexing)."""

    SYNCING = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::item"}

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in self.SYNCING:
            self.calls.append(func._schema.name)
        return func(*args, **(kwargs or {}))


def test_training_routing_and_mixing_do_not_sync_with_the_host():
    model = converted("llama", METHODS["mixsga"])
    model.train()
    attn = model.model.layers[0].self_attn
    x = torch.randn(2, 10, 64, requires_grad=True)
    counter = SyncCounter()
    with counter:
        k = attn.k_proj(x)  # routes (top-k over the sequence) and mixes
        k.sum().backward()
    assert counter.calls == []
    with SyncCounter() as check:  # the counter sees syncing ops
        torch.ones(3).sum().item()
        torch.tensor([True, False, True]).nonzero()
    assert check.calls == ["aten::_local_scalar_dense", "aten::nonzero"]


def test_top_k_routing_of_a_padded_batch_reads_nothing_back_to_the_host(monkeypatch):
    """The per-row capacities of a padded batch come from a gather on the device, not from
    ``.tolist()`` / ``.item()`` of its real-token counts (those wait for the device on a GPU)."""
    from mixsga_train.attention.routing import capacity_counts, progressive_topk

    scores = torch.rand(3, 12, 3)
    mask = torch.ones(3, 12, dtype=torch.bool)
    mask[1, :5] = False
    mask[2, :11] = False

    def refuse(*args, **kwargs):
        raise AssertionError("host read-back in top-k routing")

    monkeypatch.setattr(torch.Tensor, "tolist", refuse)
    monkeypatch.setattr(torch.Tensor, "item", refuse)
    with SyncCounter() as counter:
        ids = progressive_topk(scores, [0.3, 0.1, 0.6], [1.0, 0.5, 0.25], mask)
    monkeypatch.undo()
    assert counter.calls == []
    for row, n in enumerate((12, 7, 1)):
        counts = torch.bincount(ids[row][mask[row]], minlength=3)
        assert tuple(counts.tolist()) == capacity_counts(n, (0.3, 0.1, 0.6), (1.0, 0.5, 0.25))


def test_an_expert_without_tokens_is_skipped():
    """Ratio 1:1:0 leaves the last expert empty (no padding: padding tokens go to the last expert)."""
    model = converted("llama", dict(method="mixsga", ratio="1:1:0"))
    ids, _ = padded_prompt()
    mask = torch.ones_like(ids)
    got, ref = generate(model, ids, mask, new=4), generate(with_reference_read(model), ids, mask, new=4)
    assert all(layer.lengths[2] == 0 for layer in got.past_key_values.layers)
    assert torch.equal(got.sequences, ref.sequences)
    for a, b in zip(got.logits, ref.logits):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
