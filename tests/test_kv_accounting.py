"""KV bytes per REAL token: every byte a cache holds is attributed to one slot, and prefill/decode
bytes are summed over real prompt tokens and generated tokens before EOS only (ragged batches)."""

import pytest
import torch
from tiny import tiny_model

from mixsga_train.attention import AttentionConfig, convert_model
from mixsga_train.attention.cache import MixedKVLayer, layer_nbytes
from mixsga_train.evaluation.generation import left_pad
from mixsga_train.evaluation.kv import (
    account_generation,
    cache_bytes_per_token,
    native_kv_bytes_per_token,
    real_slot_masks,
    slot_kv_bytes,
)
from mixsga_train.evaluation.routing_scope import evaluating
from mixsga_train.evaluation.suite import DECODE_TOKENS, evaluate_lm
from mixsga_train.metrics import ExpertFractions

METHODS = {
    "mixsga": dict(method="mixsga", ratio="3:1:6"),
    "gqa": dict(method="gqa", kv_heads=2),
    "cla": dict(method="cla", budget=0.5),
    "native": None,
}
HEAD_BYTES = 2 * 8 * 4  # K + V of one head of width 8, fp32
NATIVE = 4 * 4 * HEAD_BYTES  # 4 layers x 4 KV heads
ROUTED = 4 * (1 + 4)  # per token, 4 mixSGA layers x (uint8 expert id + int32 slot position)


def model_for(name):
    model = tiny_model("llama", layers=4)  # 4 KV heads of width 8
    model.generation_config.eos_token_id = None
    if METHODS[name] is not None:
        convert_model(model, AttentionConfig(**METHODS[name]))
    return model.eval()


def ragged_prompts():
    """Two prompts of 8 and 120 tokens, left padded to 120 (the issue's example)."""
    g = torch.Generator().manual_seed(1)
    return left_pad([torch.randint(3, 96, (n,), generator=g).tolist() for n in (8, 120)], 0)


def generate(model, ids, mask, new, eos=None):
    with evaluating(model, "auto"):
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new,
            do_sample=False,
            return_dict_in_generate=True,
            pad_token_id=0,
            eos_token_id=eos,
        )
    return out.cache, out.sequences[:, ids.shape[1] :]


def reference_slot_bytes(cache):
    """[B, T] bytes per slot computed independently of kv.py: K/V heads of the slot's expert (from the
    layer's head groupings) + 5 bytes per mixSGA layer (a uint8 expert id and the int32 position of the
    token's slot in its expert buffer); CLA borrowers hold nothing."""
    per_layer = []
    for layer in cache.layers:
        if isinstance(layer, MixedKVLayer):
            heads = torch.tensor([g.kv_heads for g in layer.groupings])
            routed = layer.expert_ids is not None
            shape = (layer.batch_size, layer.seq_length)
            ids = layer.expert_ids.long() if routed else torch.zeros(shape, dtype=torch.long)
            per_layer.append(heads[ids] * HEAD_BYTES + (1 + 4 if routed else 0))
        elif layer_nbytes(layer):  # transformers' DynamicLayer: native heads
            keys = layer.keys
            per_layer.append(torch.full((keys.shape[0], keys.shape[2]), keys.shape[1] * HEAD_BYTES))
    return sum(per_layer).double()


@pytest.mark.parametrize("name", list(METHODS))
def test_slot_bytes_sum_to_the_cache_and_match_a_reference_on_a_ragged_batch(name):
    model = model_for(name)
    ids, mask = ragged_prompts()
    cache, new = generate(model, ids, mask, new=5)
    slots = slot_kv_bytes(cache)
    assert slots.shape == (2, 120 + 4)  # the last generated token is never fed back
    assert slots.sum().item() == pytest.approx(sum(layer_nbytes(layer) for layer in cache.layers))
    if hasattr(cache, "nbytes"):
        assert slots.sum().item() == pytest.approx(cache.nbytes())
    assert torch.allclose(slots, reference_slot_bytes(cache))
    account = account_generation(cache, mask, new, stop_ids=set())
    assert (account.prefill_tokens, account.decode_tokens) == (8 + 120, 2 * 4)
    expected = reference_slot_bytes(cache)
    assert account.prefill_bytes_per_token == pytest.approx(expected[:, :120][mask.bool()].mean().item())
    assert account.decode_bytes_per_token == pytest.approx(expected[:, 120:].mean().item())
    budget = {"mixsga": None, "gqa": 0.5, "cla": 0.5, "native": 1.0}[name]
    if budget is not None:  # uniform methods: every real token costs exactly the budget
        assert account.prefill_bytes_per_token == account.decode_bytes_per_token == budget * NATIVE


def test_per_slot_flatters_mixsga_against_per_real_token():
    """112 left-padding slots of the short prompt sit in mixSGA's cheapest expert (1 of 4 heads): the per-slot
    average counts them, the per-real-token figure does not."""
    model = model_for("mixsga")
    ids, mask = ragged_prompts()
    cache, new = generate(model, ids, mask, new=1)
    per_slot = cache_bytes_per_token(cache)
    real = account_generation(cache, mask, new, stop_ids=set()).prefill_bytes_per_token
    expected = reference_slot_bytes(cache)
    assert per_slot == pytest.approx(expected.mean().item())
    assert real == pytest.approx(expected[mask.bool()].mean().item())
    padding = expected[~mask.bool()]
    assert padding.max().item() < real and per_slot < real


def test_tokens_from_eos_on_are_not_counted():
    model = model_for("mixsga")
    ids, mask = ragged_prompts()
    _, free = generate(model, ids, mask, new=6)
    eos = int(free[0, 2])  # what row 0 emits third becomes the stop token
    cache, new = generate(model, ids, mask, new=6, eos=eos)
    assert int(new[0, 2]) == eos
    stop = [(row == eos).nonzero()[0].item() if (row == eos).any() else 6 for row in new]
    kept = [min(s, cache.get_seq_length() - 120) for s in stop]
    account = account_generation(cache, mask, new, stop_ids={eos})
    assert account.decode_tokens == sum(kept) and kept[0] == 2
    expected = reference_slot_bytes(cache)
    real = torch.cat([expected[b, 120 : 120 + k] for b, k in enumerate(kept)])
    assert account.decode_bytes_per_token == pytest.approx(real.mean().item())
    counts = torch.zeros(3, dtype=torch.long)
    for layer in cache.layers:
        for b, k in enumerate(kept):
            counts += torch.bincount(layer.expert_ids[b, 120 : 120 + k].long(), minlength=3)
    assert account.decode_expert_counts == counts.tolist()
    assert sum(account.decode_expert_fractions) == pytest.approx(1.0)


def test_real_slot_masks():
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    new = torch.tensor([[5, 2, 0, 0], [5, 6, 7, 8]])  # row 0 stops at its second token (EOS id 2)
    prefill, decode = real_slot_masks(mask, new, {2}, length=4 + 3)
    assert prefill.int().tolist() == [[0, 0, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0, 0]]
    assert decode.int().tolist() == [[0, 0, 0, 0, 1, 0, 0], [0, 0, 0, 0, 1, 1, 1]]


def test_evaluate_lm_reports_decode_kv_and_realised_fractions():
    model = model_for("mixsga")
    blocks = torch.randint(3, 96, (3, 20), generator=torch.Generator().manual_seed(2))
    ev = evaluate_lm(model, blocks, words=40, batch_size=2)
    assert ev.decode_tokens == 2 * (DECODE_TOKENS - 1)  # two prompts (batch_size), no EOS configured
    assert ev.kv_bytes_per_token == pytest.approx(0.5 * NATIVE + ROUTED)  # top-k over 20 tokens: exact shares
    native = native_kv_bytes_per_token(model.config, torch.float32)
    assert native == NATIVE
    assert ev.kv_share_decode == pytest.approx(ev.kv_bytes_per_token_decode / native)
    fr = ev.expert_fractions.decode
    heads = (4, 2, 1)
    decode_kv = sum(f * h for f, h in zip(fr, heads)) / 4 * NATIVE + ROUTED  # realised fractions -> bytes
    assert ev.kv_bytes_per_token_decode == pytest.approx(decode_kv)
    assert sum(ev.expert_fractions.causal) == pytest.approx(1.0)
    # the KV the causal perplexity spent: its own fractions priced per expert, id bytes included
    causal_kv = sum(f * h for f, h in zip(ev.expert_fractions.causal, heads)) / 4 + ROUTED / NATIVE
    assert ev.kv_share_causal == pytest.approx(causal_kv)
    assert ev.kv_share_causal <= 0.5 + ROUTED / NATIVE + 1e-9  # the budget policy never overspends
    assert ev.ppl_causal_routing != ev.ppl
    gqa = evaluate_lm(model_for("gqa"), blocks, words=40, batch_size=2)
    assert gqa.kv_share_decode == 0.5 and gqa.kv_share_causal == 0.5
    assert gqa.expert_fractions == ExpertFractions(prefill=None, decode=None, causal=None)
