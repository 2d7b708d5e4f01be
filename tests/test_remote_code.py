"""Converted checkpoints load in any tool: ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``
rebuilds the converted model exactly; a plain load refuses instead of returning the unconverted model."""

import copy
import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from mixsga_train.attention import AttentionConfig, KVBudgetCache, convert_model, load_converted, routers
from mixsga_train.attention.persistence import ARCHITECTURE, MODEL_TYPE
from tiny import FAMILIES, tiny_model

METHODS = {
    "mixsga": dict(method="mixsga", ratio="1:1:2"),
    "gqa": dict(method="gqa", kv_heads=1),
    "cla": dict(method="cla", budget=0.5),
}


def saved(tmp_path, family, method):
    model = tiny_model(family, layers=4)
    resolved = convert_model(model, AttentionConfig(**METHODS[method]))
    if method == "mixsga":  # trained-looking routers, so a dropped or re-initialised router would show
        for router in routers(model):
            torch.nn.init.normal_(router.proj.weight, std=0.5)
    folder = tmp_path / f"{family}-{method}"
    model.save_pretrained(folder)
    return model.eval(), resolved, folder


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", list(METHODS))
def test_remote_code_load_rebuilds_the_converted_model(tmp_path, family, method):
    model, resolved, folder = saved(tmp_path, family, method)
    loaded = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    assert type(loaded) is type(model) and loaded._mixsga_resolved == resolved
    assert not loaded.training
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys()
    assert all(torch.equal(state[k], loaded_state[k]) for k in state)
    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    out = loaded.generate(ids[:1], max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
    reference = model.generate(ids[:1], max_new_tokens=5, do_sample=False)
    assert isinstance(out.past_key_values, KVBudgetCache)
    assert torch.equal(out.sequences, reference)


def test_checkpoint_files_name_the_remote_code(tmp_path):
    _, resolved, folder = saved(tmp_path, "llama", "mixsga")
    stored = json.loads((folder / "config.json").read_text())
    assert stored["model_type"] == MODEL_TYPE and stored["architectures"] == [ARCHITECTURE]
    assert stored["base_model_type"] == "llama" and stored["base_architectures"] == ["LlamaForCausalLM"]
    assert stored["auto_map"]["AutoModelForCausalLM"] == "modeling_mixsga.MixSGAForCausalLM"
    assert stored[MODEL_TYPE]["ratio"] == resolved.ratio
    code = (folder / "modeling_mixsga.py").read_text()
    assert "import mixsga_train" in code or "from mixsga_train" in code


@pytest.mark.parametrize("auto_class", [AutoModelForCausalLM, AutoConfig])
def test_plain_load_without_remote_code_fails_loudly(tmp_path, auto_class):
    _, _, folder = saved(tmp_path, "qwen2", "cla")
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        auto_class.from_pretrained(folder, trust_remote_code=False)


def test_from_config_builds_a_fresh_converted_model(tmp_path):
    model, resolved, folder = saved(tmp_path, "gemma2", "mixsga")
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    fresh = AutoModelForCausalLM.from_config(config, trust_remote_code=True)
    assert type(fresh) is type(model) and fresh._mixsga_resolved == resolved
    assert fresh.state_dict().keys() == model.state_dict().keys()


def test_load_converted_reads_both_formats(tmp_path):
    model, resolved, folder = saved(tmp_path, "opt", "gqa")
    ids = torch.randint(0, 96, (1, 9))
    stored = json.loads((folder / "config.json").read_text())
    legacy = {k: v for k, v in stored.items() if k not in ("auto_map", "base_model_type", "base_architectures")}
    legacy.update(model_type=stored["base_model_type"], architectures=stored["base_architectures"])
    for config in (stored, legacy):
        (folder / "config.json").write_text(json.dumps(config))
        loaded = load_converted(folder)
        with torch.no_grad():
            assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_a_deep_copy_saves_its_own_weights(tmp_path):
    model, _, _ = saved(tmp_path, "llama", "mixsga")
    twin = copy.deepcopy(model)
    torch.nn.init.zeros_(routers(twin)[0].proj.weight)
    twin.save_pretrained(tmp_path / "twin")
    loaded = load_converted(tmp_path / "twin")
    assert torch.equal(routers(loaded)[0].proj.weight, torch.zeros_like(routers(loaded)[0].proj.weight))
