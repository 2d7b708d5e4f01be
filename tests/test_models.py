"""Model loading: the offline SmolLM2 GGUF conversion and cache, tiny models of every family, config errors."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import shutil
import time
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from transformers import LlamaForCausalLM

from mixsga_train.attention.adapters import adapter_for, head_dim
from mixsga_train.errors import ConfigError
from mixsga_train.models import gguf
from mixsga_train.models.config import FAMILIES, ModelConfig
from mixsga_train.models.loading import LOADERS, load_model, max_positions
from mixsga_train.models.tiny import build_tiny_model, tiny_tokenizer


def native_kv_heads(config):
    return adapter_for(config).native_kv_heads(config)


def num_layers(config):
    return config.num_hidden_layers


PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """One GGUF conversion for the module: the plain model, its tokenizer, transformers' GGUF model, the cache dir."""
    cache_dir = tmp_path_factory.mktemp("mixsga_cache") / "smollm2-135m"
    loaded = []

    def spy_load_gguf():
        loaded.append(gguf_load_gguf())
        return loaded[-1]

    gguf_load_gguf = gguf.load_gguf
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gguf, "load_gguf", spy_load_gguf)
        model, tokenizer = gguf.load_smollm2_135m(cache_dir)
        assert len(loaded) == 1 and (cache_dir / "config.json").is_file()
        start = time.perf_counter()
        cached_model, _ = gguf.load_smollm2_135m(cache_dir)
        cached_seconds = time.perf_counter() - start
        assert len(loaded) == 1, "the second load must come from the cache, not the GGUF"
    reference = loaded[0][0]
    yield dict(
        model=model,
        tokenizer=tokenizer,
        reference=reference,
        cache_dir=cache_dir,
        cached_model=cached_model,
        cached_seconds=cached_seconds,
    )
    shutil.rmtree(cache_dir.parent)  # 0.5 GB: do not leave it in pytest's kept temp dirs


def _logits(model, tokenizer, text: str = PROMPT) -> torch.Tensor:
    with torch.no_grad():
        return model(**tokenizer(text, return_tensors="pt")).logits


def test_plain_model_matches_gguf_logits(smollm2):
    model, tokenizer = smollm2["model"], smollm2["tokenizer"]
    assert smollm2["reference"].hf_quantizer is not None, "transformers' GGUF load is expected to be marked quantized"
    assert type(model) is LlamaForCausalLM
    assert getattr(model.config, "quantization_config", None) is None
    assert getattr(model, "hf_quantizer", None) is None
    assert model.dtype == torch.float32 and model.config._attn_implementation == "sdpa"
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert (native_kv_heads(model.config), model.config.num_attention_heads, num_layers(model.config)) == (3, 9, 30)
    assert head_dim(model.config) == 64 and max_positions(model.config) == 8192
    reference = _logits(smollm2["reference"], tokenizer)
    assert torch.allclose(_logits(model, tokenizer), reference, atol=1e-5, rtol=0)


def test_cache_reload_is_fast_and_identical(smollm2):
    """The cache is a save_pretrained/from_pretrained round trip: logits must survive it."""
    assert smollm2["cached_seconds"] < 10
    cached = smollm2["cached_model"]
    assert cached.lm_head.weight is cached.model.embed_tokens.weight
    torch.testing.assert_close(
        _logits(cached, smollm2["tokenizer"]), _logits(smollm2["model"], smollm2["tokenizer"]), rtol=0, atol=0
    )
    assert not list(smollm2["cache_dir"].parent.glob(".smollm2-135m.*")), "temporary directory left behind"


def test_tokenizer_has_pad_and_roundtrips(smollm2):
    tokenizer = smollm2["tokenizer"]
    assert tokenizer.pad_token is not None and tokenizer.eos_token is not None
    assert len(tokenizer) == smollm2["model"].config.vocab_size
    assert tokenizer.decode(tokenizer(PROMPT).input_ids) == PROMPT


def test_greedy_answer_is_paris(smollm2):
    model, tokenizer = smollm2["model"], smollm2["tokenizer"]
    inputs = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert tokenizer.decode(out[0, inputs.input_ids.shape[1] :]).strip().startswith("Paris")


def test_plain_model_is_trainable(smollm2):
    """A gradient reaches the first layer (only one weight takes it, to keep the test cheap)."""
    model, tokenizer = smollm2["cached_model"], smollm2["tokenizer"]
    weight = model.model.layers[0].self_attn.q_proj.weight
    model.requires_grad_(False)
    weight.requires_grad_(True)
    inputs = tokenizer(PROMPT, return_tensors="pt")
    model(**inputs, labels=inputs.input_ids).loss.backward()
    assert weight.grad is not None and weight.grad.abs().sum() > 0


def test_load_model_gguf_source_uses_the_cache(smollm2, monkeypatch):
    monkeypatch.setenv("MIXSGA_CACHE", str(smollm2["cache_dir"].parent))
    model, tokenizer = load_model(ModelConfig(source="gguf_smollm2", family="llama", dtype="bfloat16"))
    assert model.dtype == torch.bfloat16 and tokenizer.pad_token is not None
    assert model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_models_build_and_run(family):
    cfg = ModelConfig(name=f"tiny-{family}", source="tiny", tiny_family=family, max_seq_len=64)
    model, tokenizer = load_model(cfg)
    assert model.config.model_type == family and not model.training
    assert (native_kv_heads(model.config), num_layers(model.config), head_dim(model.config)) == (4, 4, 16)
    assert max_positions(model.config) == 64 and model.config.vocab_size >= len(tokenizer)
    batch = tokenizer(["a short text", "a somewhat longer text of twenty-odd bytes"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, batch.input_ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()
    again, _ = load_model(cfg)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_tiny_family_specifics():
    gemma, _ = load_model(ModelConfig(source="tiny", tiny_family="gemma2", max_seq_len=64))
    assert gemma.config.layer_types == ["sliding_attention", "full_attention"] * 2
    assert gemma.config.sliding_window == 8 and gemma.config.attn_logit_softcapping is not None
    assert gemma.config.final_logit_softcapping is not None
    opt, _ = load_model(ModelConfig(source="tiny", tiny_family="opt", max_seq_len=64))
    assert opt.model.decoder.layers[0].self_attn.k_proj.bias is not None
    qwen, _ = load_model(ModelConfig(source="tiny", tiny_family="qwen2", max_seq_len=64))
    assert qwen.model.layers[0].self_attn.k_proj.bias is not None
    gqa, _ = load_model(ModelConfig(source="tiny", tiny_kv_heads=2, tiny_layers=2, max_seq_len=64))
    assert native_kv_heads(gqa.config) == 2 and num_layers(gqa.config) == 2


def test_tiny_tokenizer_is_byte_level():
    tokenizer = tiny_tokenizer()
    ids = tokenizer("hé").input_ids
    assert ids == list("hé".encode()) and tokenizer.decode(ids) == "hé"
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id) == (256, 257) and len(tokenizer) == 259


def test_unknown_hub_name_offline_suggests_local(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError, match="model.hub_id") as err:
        load_model(ModelConfig(source="hub", hub_id="no-such-org/no-such-model-xyz"))
    assert "model.source=local model.path=" in str(err.value) and "\n" not in str(err.value)


def test_missing_local_path_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"^model\.path: .*does-not-exist"):
        load_model(ModelConfig(source="local", path=str(tmp_path / "does-not-exist")))
    with pytest.raises(ConfigError, match=r"^model\.path: .*config\.json"):
        ModelConfig(source="local", path=str(tmp_path)).validate()


def test_local_source_loads_a_saved_tiny_model(tmp_path):
    model, tokenizer = load_model(ModelConfig(source="tiny", tiny_family="qwen2", max_seq_len=64))
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    local, local_tokenizer = load_model(ModelConfig(source="local", path=str(tmp_path), family="qwen2", max_seq_len=64))
    assert local_tokenizer.pad_token_id == tokenizer.pad_token_id
    torch.testing.assert_close(_logits(local, local_tokenizer, "abc"), _logits(model, tokenizer, "abc"), rtol=0, atol=0)
    with pytest.raises(ConfigError, match="^model.max_seq_len"):
        load_model(ModelConfig(source="local", path=str(tmp_path), max_seq_len=65))


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (dict(source="s3"), "model.source"),
        (dict(dtype="fp8"), "model.dtype"),
        (dict(family="gpt2"), "model.family"),
        (dict(source="tiny", tiny_family="bert"), "model.tiny_family"),
        (dict(source="tiny", tiny_kv_heads=3), "model.tiny_kv_heads"),
        (dict(source="tiny", tiny_family="opt", tiny_kv_heads=2), "model.tiny_kv_heads"),
        (dict(source="hub", hub_id=""), "model.hub_id"),
    ],
)
def test_validate_names_the_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        ModelConfig(**overrides).validate()
    assert err.value.key == key


def test_unknown_source_lists_choices():
    with pytest.raises(ConfigError, match="hub, local, gguf_smollm2, tiny"):
        ModelConfig(source="s3").validate()


def test_loaded_family_is_checked():
    with pytest.raises(ConfigError, match="^model.family"):
        load_model(ModelConfig(source="tiny", tiny_family="opt", family="llama", max_seq_len=64))


def test_default_cache_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("MIXSGA_CACHE", str(tmp_path))
    assert gguf.default_cache_dir() == tmp_path / "smollm2-135m"
    monkeypatch.delenv("MIXSGA_CACHE")
    assert gguf.default_cache_dir() == Path.home() / ".cache" / "mixsga_train" / "smollm2-135m"


def test_smollm2_converted_to_mixsga_1_0_matches_and_answers_the_same(smollm2):
    import copy

    from mixsga_train.attention import AttentionConfig, convert_model

    model, tokenizer = smollm2["model"], smollm2["tokenizer"]
    converted = copy.deepcopy(model)
    resolved = convert_model(converted, AttentionConfig(method="mixsga", expert_kv_heads=[3, 1], ratio="1:0"))
    assert resolved.kv_budget == 1.0
    assert torch.allclose(_logits(converted, tokenizer), _logits(model, tokenizer), atol=1e-5, rtol=0)
    ids = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        a = model.generate(**ids, max_new_tokens=6, do_sample=False)
        b = converted.generate(**ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(a, b) and tokenizer.decode(a[0, ids.input_ids.shape[1] :]).strip().startswith("Paris")


def test_the_tiny_builder_refuses_an_unlisted_family():
    with pytest.raises(ValueError, match="no tiny 'bert' model; families: llama, qwen2, mistral, gemma2, opt"):
        build_tiny_model(
            "bert", vocab_size=96, layers=1, hidden=16, heads=2, kv_heads=2, intermediate=16, max_positions=32
        )


def test_a_new_model_source_is_one_loaders_entry(monkeypatch):
    """``LOADERS`` is the registry ``ModelConfig.validate`` and ``load_model`` dispatch through."""
    seen = []

    def load_twice_seeded(cfg, dtype):
        seen.append(dtype)
        return LOADERS["tiny"](cfg, dtype)

    monkeypatch.setitem(LOADERS, "tiny_again", load_twice_seeded)
    model, _ = load_model(ModelConfig(source="tiny_again", tiny_layers=1, max_seq_len=64))
    assert seen == [torch.float32] and model.config.num_hidden_layers == 1
    with pytest.raises(ConfigError, match="hub, local, gguf_smollm2, tiny, tiny_again"):
        ModelConfig(source="nowhere").validate()
