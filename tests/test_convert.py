"""Exact equivalences of the converted layers against reference computations, for every family."""

import copy

import pytest
import torch
from tiny import FAMILIES, tiny_model

from mixsga_train.attention import AttentionConfig, convert_model
from mixsga_train.errors import ConfigError

ATOL = 1e-5


def logits(model, ids, mask=None):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def converted(base, **cfg):
    model = copy.deepcopy(base)
    convert_model(model, AttentionConfig(**cfg))
    return model.eval()


@pytest.fixture(params=FAMILIES)
def family_model(request):
    return request.param, tiny_model(request.param)


def test_identity_conversions_equal_the_original(family_model):
    family, base = family_model
    ids = torch.randint(0, 96, (2, 14))
    ref = logits(base, ids)
    assert torch.allclose(logits(converted(base, method="mixsga", ratio="1:0:0"), ids), ref, atol=ATOL)
    assert torch.allclose(logits(converted(base, method="gqa", kv_heads=4), ids), ref, atol=ATOL)
    assert torch.allclose(logits(converted(base, method="cla", budget=1.0), ids), ref, atol=ATOL)
    assert torch.allclose(logits(converted(base, method="mha"), ids), ref, atol=ATOL)


def test_mixsga_010_equals_gqa_with_half_the_heads(family_model):
    family, base = family_model
    ids = torch.randint(0, 96, (2, 14))
    mix = logits(converted(base, method="mixsga", ratio=[0, 1, 0]), ids)
    gqa = logits(converted(base, method="gqa", kv_heads=2), ids)
    assert torch.allclose(mix, gqa, atol=ATOL)
    assert not torch.allclose(gqa, logits(base, ids), atol=1e-3)  # the comparison is not vacuous


def test_gqa_is_mean_pooling_of_heads():
    base = tiny_model("llama")
    ids = torch.randint(0, 96, (1, 9))
    model = converted(base, method="gqa", kv_heads=2)
    ref_k = base.model.layers[0].self_attn.k_proj.weight.view(4, 8, 64)
    pooled = model.model.layers[0].self_attn.k_proj.weight.view(2, 8, 64)
    assert torch.allclose(pooled[0], ref_k[:2].mean(0)) and torch.allclose(pooled[1], ref_k[2:].mean(0))
    assert model.model.layers[0].self_attn.k_proj.weight.numel() == ref_k.numel() // 2
    logits(model, ids)


def test_uneven_partition_gqa_on_three_kv_heads():
    base = tiny_model("llama", kv_heads=2)
    model = converted(base, method="gqa", kv_heads=1)
    three = tiny_model("llama", kv_heads=3, heads=6, hidden=48)  # 3 KV heads (SmolLM2's shape): groups (0, 1), (2,)
    gqa2 = converted(three, method="gqa", kv_heads=2)
    w = three.model.layers[0].self_attn.k_proj.weight.view(3, 8, 48)
    pooled = gqa2.model.layers[0].self_attn.k_proj.weight.view(2, 8, 48)
    assert torch.allclose(pooled[0], w[:2].mean(0)) and torch.allclose(pooled[1], w[2])
    ids = torch.randint(0, 96, (1, 7))
    assert logits(model, ids).isfinite().all() and logits(gqa2, ids).isfinite().all()


def test_cla_borrowers_reuse_owner_kv_and_drop_their_weights():
    base = tiny_model("llama", layers=4)
    model = converted(base, method="cla", budget=0.5)
    names = {n for n, _ in model.named_parameters()}
    assert "model.layers.0.self_attn.k_proj.weight" in names and "model.layers.1.self_attn.k_proj.weight" not in names
    # layer 1's keys are layer 0's projection of layer 0's input: reproduce by hand
    ids = torch.randint(0, 96, (1, 6))
    captured = {}
    hooks = [
        model.model.layers[i].self_attn.k_proj.register_forward_hook(
            lambda m, a, out, i=i: captured.__setitem__(i, out)
        )
        for i in (0, 1)
    ]
    logits(model, ids)
    for h in hooks:
        h.remove()
    assert captured[1] is captured[0]
    mean_init = converted(base, method="cla", budget=0.5, cla_init="mean")
    w = mean_init.model.layers[0].self_attn.k_proj.weight
    ref = (base.model.layers[0].self_attn.k_proj.weight + base.model.layers[1].self_attn.k_proj.weight) / 2
    assert torch.allclose(w, ref)


def test_mixsga_tokens_of_expert_one_keep_original_kv():
    base = tiny_model("llama")
    model = converted(base, method="mixsga", ratio="3:1:6")
    x = torch.randn(1, 10, 64)
    attn, ref_attn = model.model.layers[0].self_attn, base.model.layers[0].self_attn
    k = attn.k_proj(x).view(1, 10, 4, 8)
    ids = attn.router.last_ids[0]
    ref = ref_attn.k_proj(x).view(1, 10, 4, 8)
    assert torch.equal(torch.bincount(ids, minlength=3), torch.tensor([3, 1, 6]))
    for t in range(10):
        e = int(ids[t])
        groups = {0: [[0], [1], [2], [3]], 1: [[0, 1], [2, 3]], 2: [[0, 1, 2, 3]]}[e]
        for g in groups:
            assert torch.allclose(k[0, t, g], ref[0, t, g].mean(0, keepdim=True).expand(len(g), 8), atol=1e-6)


def test_padding_does_not_change_real_tokens_routing():
    base = tiny_model("llama")
    model = converted(base, method="mixsga", ratio="3:1:6")
    ids = torch.randint(1, 96, (1, 10))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 10, dtype=torch.long)], dim=1)
    a = logits(model, ids)
    r_alone = model.model.layers[0].self_attn.router.last_ids.clone()
    b = logits(model, padded, mask)
    r_pad = model.model.layers[0].self_attn.router.last_ids
    assert torch.equal(r_alone[0], r_pad[0, 3:])
    assert torch.allclose(a[0], b[0, 3:], atol=1e-4)


def test_unsupported_architecture_and_infeasible_config_raise_clear_errors():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ConfigError, match="not supported; supported: gemma2, llama, mistral, opt, qwen2"):
        convert_model(gpt2, AttentionConfig(method="gqa", kv_heads=1))
    base = tiny_model("llama", kv_heads=2)
    with pytest.raises(ConfigError, match="attention.expert_kv_heads: the paper's group sizes"):
        convert_model(copy.deepcopy(base), AttentionConfig(method="mixsga"))
    with pytest.raises(ConfigError, match=r"attention.kv_heads: 3 is not in \[1, 2\]"):
        convert_model(copy.deepcopy(base), AttentionConfig(method="gqa", kv_heads=3))
    with pytest.raises(ConfigError, match="attention.budget.*outside"):
        convert_model(copy.deepcopy(base), AttentionConfig(method="cla", budget=1.5))
