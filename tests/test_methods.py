"""The attention-method registry: a method registered in-test converts, caches, saves and loads
through the normal path; checkpoints saved before the registry (one flat dict for every method)
still load; ``converted(model)`` is the one handle on a converted model."""

import copy
import json
from dataclasses import dataclass

import pytest
import torch
from tiny import tiny_model
from transformers import AutoModelForCausalLM

from mixsga_train.attention import (
    ATTENTION_METHODS,
    AttentionConfig,
    KVBudgetCache,
    convert_model,
    converted,
    load_converted,
    register_attention_method,
    saved_attention,
)
from mixsga_train.attention.heads import HeadGrouping
from mixsga_train.attention.methods import MixedLayout, ResolvedAttention
from mixsga_train.attention.persistence import MODEL_TYPE
from mixsga_train.attention.projections import PooledHeadProjection
from mixsga_train.errors import ConfigError
from mixsga_train.training.loop import _aux_term


@dataclass(kw_only=True)
class FirstHeadGQA(ResolvedAttention):
    """A toy method, written as a new method would be: GQA whose kept heads are each group's
    first native head (instead of the group mean)."""

    method = "gqa_first"

    kv_heads: int

    @classmethod
    def resolve(cls, cfg, native_kv_heads, num_layers):
        if cfg.kv_heads is None or not 1 <= cfg.kv_heads <= native_kv_heads:
            raise ConfigError("attention.kv_heads", f"{cfg.kv_heads} is not in [1, {native_kv_heads}]")
        return cls(
            native_kv_heads=native_kv_heads,
            num_layers=num_layers,
            kv_budget=cfg.kv_heads / native_kv_heads,
            kv_heads=cfg.kv_heads,
            decode_kernel=cfg.decode_kernel,
        )

    def detail(self) -> str:
        return f"{self.kv_heads} first-of-group KV heads"

    @property
    def segment_kv_heads(self):
        return [self.kv_heads]

    @torch.no_grad()
    def convert_layer(self, attn, layer_idx, target):
        grouping = HeadGrouping(self.native_kv_heads, self.kv_heads)
        d = target.head_dim
        for name in ("k_proj", "v_proj"):
            native = getattr(attn, name)
            projection = PooledHeadProjection(native, grouping, d)
            first = native.weight.view(self.native_kv_heads, d, -1)[grouping.representative]
            projection.weight.copy_(first.flatten(0, 1))
            if native.bias is not None:
                projection.bias.copy_(native.bias.view(self.native_kv_heads, d)[grouping.representative].flatten())
            setattr(attn, name, projection)
        return MixedLayout([grouping])


@pytest.fixture
def toy_method():
    register_attention_method(FirstHeadGQA)
    yield FirstHeadGQA
    del ATTENTION_METHODS[FirstHeadGQA.method]


def test_the_builtin_methods_are_registered():
    assert set(ATTENTION_METHODS) >= {"mha", "gqa", "cla", "mixsga"}
    with pytest.raises(ValueError, match="'gqa' is already registered"):
        register_attention_method(type("OtherGQA", (FirstHeadGQA,), {"method": "gqa"}))


def test_a_method_registered_in_a_test_converts_caches_saves_and_loads(toy_method, tmp_path):
    base = tiny_model("llama", kv_heads=4)
    model = copy.deepcopy(base)
    resolved = convert_model(model, AttentionConfig(method="gqa_first", kv_heads=2))
    assert isinstance(resolved, FirstHeadGQA) and converted(model).attention is resolved
    assert resolved.describe() == "gqa_first 2 first-of-group KV heads: 50.0% of native KV"
    # reference: the original model with heads 1 and 3 overwritten by heads 0 and 2 (their group's first)
    reference = copy.deepcopy(base)
    with torch.no_grad():
        for layer in reference.model.layers:
            for proj in (layer.self_attn.k_proj, layer.self_attn.v_proj):
                heads = proj.weight.view(4, -1, proj.weight.shape[1])
                heads[1], heads[3] = heads[0].clone(), heads[2].clone()
    ids = torch.randint(1, 96, (2, 9))
    out = model.eval().generate(
        ids, max_new_tokens=4, do_sample=False, return_dict_in_generate=True, output_logits=True
    )
    ref = reference.eval().generate(
        ids, max_new_tokens=4, do_sample=False, return_dict_in_generate=True, output_logits=True
    )
    assert isinstance(out.past_key_values, KVBudgetCache) and torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    layer_bytes = 2 * 2 * (ids.shape[1] + 3) * model.config.head_dim * 4  # K and V, 2 heads, fp32
    assert out.past_key_values.nbytes() == model.config.num_hidden_layers * layer_bytes * ids.shape[0]
    model.save_pretrained(tmp_path / "toy")
    assert saved_attention(tmp_path / "toy") == resolved
    loaded = load_converted(tmp_path / "toy")
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_unknown_methods_are_named_with_the_registered_ones(toy_method):
    with pytest.raises(ConfigError, match=r"^attention.method: unknown 'gqa_frist'; choose one of .*gqa_first"):
        AttentionConfig(method="gqa_frist").resolve(4, 3)


# config.json's ``mixsga`` block as the code before the registry wrote it (printed by that code for
# tiny_model("llama") converted with these configs): every method's keys in one flat dict.
LEGACY = {
    "gqa": (
        {
            "method": "gqa",
            "native_kv_heads": 4,
            "num_layers": 3,
            "kv_budget": 0.5,
            "expert_kv_heads": [2],
            "ratio": None,
            "alpha": 0.0,
            "router_grad": "straight_through",
            "decode_policy": "budget",
            "router": "learned",
            "cla_groups": None,
            "cla_init": "first",
            "decode_kernel": "torch",
        },
        dict(method="gqa", kv_heads=2),
    ),
    "cla": (
        {
            "method": "cla",
            "native_kv_heads": 4,
            "num_layers": 3,
            "kv_budget": 0.6666666666666666,
            "expert_kv_heads": None,
            "ratio": None,
            "alpha": 0.0,
            "router_grad": "straight_through",
            "decode_policy": "budget",
            "router": "learned",
            "cla_groups": [[0, 1], [2]],
            "cla_init": "mean",
            "decode_kernel": "torch",
        },
        dict(method="cla", budget=2 / 3, cla_init="mean"),
    ),
    "mixsga": (
        {
            "method": "mixsga",
            "native_kv_heads": 4,
            "num_layers": 3,
            "kv_budget": 0.75,
            "expert_kv_heads": [4, 2],
            "ratio": [0.5, 0.5],
            "alpha": 0.5,
            "router_grad": "straight_through",
            "decode_policy": "budget",
            "router": "learned",
            "cla_groups": None,
            "cla_init": "first",
            "decode_kernel": "torch",
        },
        dict(
            method="mixsga",
            ratio="1:1",
            expert_kv_heads=[4, 2],
            alpha=0.5,
            router_grad="straight_through",
            decode_policy="budget",
        ),
    ),
}


@pytest.mark.parametrize("method", list(LEGACY))
def test_checkpoints_saved_before_the_registry_still_load(tmp_path, method):
    legacy, cfg = LEGACY[method]
    model = tiny_model("llama")
    resolved = convert_model(model, AttentionConfig(**cfg))
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config[MODEL_TYPE] == resolved.to_dict() and config[MODEL_TYPE] != legacy  # the new form is typed
    config[MODEL_TYPE] = legacy
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert saved_attention(tmp_path) == resolved
    ids = torch.randint(0, 96, (1, 8))
    with torch.no_grad():
        want = model.eval()(ids).logits
        remote = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True)
        for loaded in (load_converted(tmp_path), remote):
            assert converted(loaded).attention == resolved
            assert torch.equal(loaded(ids).logits, want)


def test_the_converted_handle():
    model = tiny_model("llama")
    assert converted(model) is None
    with pytest.raises(ValueError, match="not converted"):
        from mixsga_train.attention import routing_context

        routing_context(model)
    convert_model(model, AttentionConfig(method="mixsga", ratio="1:1", expert_kv_heads=[4, 2], alpha=0.5))
    handle = converted(model)
    assert handle.num_experts == 2 and len(handle.routers) == 3 and handle.decode_switch is None
    ids = torch.randint(0, 96, (2, 8))
    lm_loss = model.eval()(ids, labels=ids).loss  # eval: no aux term
    loss = model.train()(ids, labels=ids).loss
    assert handle.aux_term().item() == pytest.approx(0.5 * handle.aux_loss().item())
    assert loss.item() == pytest.approx(lm_loss.item() + handle.aux_term().item(), rel=1e-6)
    assert _aux_term(model) == pytest.approx(handle.aux_term().item())
    gqa = tiny_model("llama")
    convert_model(gqa, AttentionConfig(method="gqa", kv_heads=2))
    assert converted(gqa).num_experts == 0 and converted(gqa).routers == [] and converted(gqa).aux_term() is None
