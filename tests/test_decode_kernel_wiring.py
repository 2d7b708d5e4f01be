"""``attention.decode_kernel: triton`` inside ``generate()``: same tokens and logits as the torch path.

The kernel runs on CPU through Triton's interpreter, which must be switched on before Triton is
imported (see tests/test_triton_decode.py), so the generate() comparisons run in one subprocess
(this file with ``--worker``, env ``TRITON_INTERPRET=1``) that reports JSON. The fallback, config
and persistence checks run in this process, where Triton cannot run (no CUDA, no interpreter).
Tiny models, 4 new tokens: the interpreter is slow.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import os
import sys
import tempfile

import pytest
import torch

from mixsga_train.attention import AttentionConfig, convert_model, load_converted
from mixsga_train.errors import ConfigError
from tiny import tiny_model
from interpreter_worker import report, run_worker

HAS_TRITON = importlib.util.find_spec("triton") is not None
NEW_TOKENS = 4
METHODS = {"mixsga": dict(method="mixsga", ratio="3:1:6"), "gqa": dict(method="gqa", kv_heads=2)}
# name: (family, method, attention implementation of the unconverted model, left padding)
CASES = {
    "llama-mixsga": ("llama", "mixsga", "sdpa", True),
    "llama-gqa": ("llama", "gqa", "sdpa", True),
    "qwen2-mixsga": ("qwen2", "mixsga", "sdpa", True),
    "qwen2-gqa": ("qwen2", "gqa", "sdpa", True),
    "opt-mixsga": ("opt", "mixsga", "sdpa", True),
    "opt-gqa": ("opt", "gqa", "sdpa", True),
    "llama-mixsga-eager": ("llama", "mixsga", "eager", True),  # additive float mask
    "llama-gqa-nopad": ("llama", "gqa", "sdpa", False),  # sdpa passes no mask at all
}


def converted_pair(family: str, method: str, impl: str = "sdpa"):
    """The same tiny model converted twice (same router init), decode_kernel torch and triton."""
    base = tiny_model(family)
    base.config._attn_implementation = impl
    models = {}
    for kernel in ("torch", "triton"):
        model = copy.deepcopy(base)
        torch.manual_seed(123)  # routers are randomly initialised: same seed, same routers
        convert_model(model, AttentionConfig(decode_kernel=kernel, **METHODS[method]))
        models[kernel] = model.eval()
    return models


def prompt(pad: bool):
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(1, 96, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    if pad:
        mask[1, :3] = 0  # batch 2, the second prompt left-padded
    return ids, mask


def generate(model, ids, mask):
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                          return_dict_in_generate=True, output_logits=True, pad_token_id=0)


def _run_case(name: str) -> dict:
    from mixsga_train.attention import triton_decode

    family, method, impl, pad = CASES[name]
    models = converted_pair(family, method, impl)
    ids, mask = prompt(pad)
    calls = []
    kernel = triton_decode.mixed_decode_attention

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return kernel(*args, **kwargs)

    triton_decode.mixed_decode_attention = counting
    try:
        out = {k: generate(m, ids, mask) for k, m in models.items()}
    finally:
        triton_decode.mixed_decode_attention = kernel
    err = max((a - b).abs().max().item() for a, b in zip(out["torch"].logits, out["triton"].logits))
    return dict(
        same_tokens=torch.equal(out["torch"].sequences, out["triton"].sequences),
        max_logit_err=err,
        kernel_calls=len(calls),
        impl=models["triton"].config._attn_implementation,
        torch_impl=models["torch"].config._attn_implementation,
        warned=sorted(models["triton"]._mixsga_decode_switch._warned),
        layers=len(out["triton"].cache.layers),
    )


def _worker() -> None:
    """Runs in the subprocess, with TRITON_INTERPRET=1 set before Triton is imported."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    torch.set_num_threads(1)
    results = {}
    for name in CASES:
        try:
            results[name] = _run_case(name)
        except Exception as exc:  # reported per case by the parent
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
    report(results)


@pytest.fixture(scope="module")
def wiring_results():
    return run_worker(__file__)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("name", list(CASES))
def test_triton_decode_generates_like_torch(wiring_results, name):
    res = wiring_results[name]
    assert "error" not in res, res.get("error")
    impl = CASES[name][2]
    assert res["torch_impl"] == impl and res["impl"] == f"mixsga_triton_{impl}"
    assert res["warned"] == []
    # every decode step (NEW_TOKENS - 1 of them) of every layer went through the kernel
    assert res["kernel_calls"] == (NEW_TOKENS - 1) * res["layers"]
    assert res["same_tokens"]
    assert res["max_logit_err"] <= 1e-4, res


def _no_triton_runtime(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("CUDA present: Triton can run, no fallback to test")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def _kernel_warnings(caplog):
    return [r for r in caplog.records if "decode_kernel=triton" in r.getMessage()]


def test_without_cuda_or_interpreter_triton_falls_back_once_with_same_tokens(monkeypatch, caplog):
    _no_triton_runtime(monkeypatch)
    models = converted_pair("llama", "mixsga")
    assert models["triton"].config._attn_implementation == "mixsga_triton_sdpa"
    ids, mask = prompt(True)
    with caplog.at_level(logging.WARNING, logger="mixsga_train.attention.decode_kernel"):
        expected = generate(models["torch"], ids, mask)
        got = generate(models["triton"], ids, mask)
        generate(models["triton"], ids, mask)  # a second generate() warns no more
    assert torch.equal(got.sequences, expected.sequences)
    for a, b in zip(got.logits, expected.logits):
        assert torch.allclose(a, b, atol=1e-5)
    warnings = _kernel_warnings(caplog)
    assert len(warnings) == 1 and "TRITON_INTERPRET" in warnings[0].getMessage()
    for layer in got.cache.layers:
        assert_kernel_rows_read_each_token(layer)
        assert layer.expand_table.dtype == torch.int32 and layer.expand_table.shape == (3, 4)


def assert_kernel_rows_read_each_token(layer):
    """The kernel's strided segments, read at the kernel's rows, give every token's cached K/V."""
    keys, values, rows = layer.kernel_segments()
    full_k, full_v = layer.expanded()
    ids = layer.kernel_expert_ids().long()
    for b in range(layer.batch_size):
        for t in range(layer.seq_length):
            e, row, heads = ids[b, t], rows[b, t], layer.expand_table[ids[b, t]].long()
            assert torch.equal(keys[e][row][heads], full_k[b, :, t])
            assert torch.equal(values[e][row][heads], full_v[b, :, t])


def test_gqa_fallback_and_kernel_rows(monkeypatch):
    _no_triton_runtime(monkeypatch)
    models = converted_pair("qwen2", "gqa")
    ids, mask = prompt(True)
    got, expected = generate(models["triton"], ids, mask), generate(models["torch"], ids, mask)
    assert torch.equal(got.sequences, expected.sequences)
    layer = got.cache.layers[0]
    assert layer.expert_ids is None and torch.equal(layer.kernel_expert_ids(), torch.zeros(2, layer.seq_length, dtype=torch.uint8))
    assert_kernel_rows_read_each_token(layer)


@pytest.mark.parametrize("family, cfg, reason", [
    ("gemma2", METHODS["mixsga"], "softcapping"),
    ("llama", dict(method="cla", budget=2 / 3), "mixed KV cache"),
    ("llama", dict(method="mha"), "mixed KV cache"),
])
def test_unsupported_models_keep_torch_path_with_one_warning(family, cfg, reason, caplog):
    model = tiny_model(family)
    impl = model.config._attn_implementation
    with caplog.at_level(logging.WARNING, logger="mixsga_train.attention.decode_kernel"):
        convert_model(model, AttentionConfig(decode_kernel="triton", **cfg))
        model.generate(input_ids=torch.randint(1, 96, (1, 5)), max_new_tokens=3, do_sample=False, pad_token_id=0)
    warnings = _kernel_warnings(caplog)
    assert len(warnings) == 1 and reason in warnings[0].getMessage()
    torch_read = impl if cfg["method"] == "mha" else "mixsga_" + impl  # the segment read, no kernel
    assert model.config._attn_implementation == torch_read and model._mixsga_decode_switch is None


def test_decode_kernel_is_validated():
    with pytest.raises(ConfigError, match=r"^attention\.decode_kernel: unknown 'cuda'"):
        AttentionConfig(method="mixsga", decode_kernel="cuda").resolve(4, 3)
    assert AttentionConfig(method="gqa", kv_heads=2, decode_kernel="triton").resolve(4, 3).decode_kernel == "triton"
    assert AttentionConfig(method="mixsga").resolve(4, 3).decode_kernel == "torch"


def test_decode_kernel_survives_save_and_load():
    model = tiny_model("llama")
    resolved = convert_model(model, AttentionConfig(method="mixsga", ratio="3:1:6", decode_kernel="triton"))
    ids = torch.randint(0, 96, (2, 6))
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        with open(os.path.join(d, "config.json")) as f:
            saved = json.load(f)
        loaded = load_converted(d)
    assert saved["mixsga"]["decode_kernel"] == "triton" and "mixsga_triton" not in json.dumps(saved)
    assert loaded._mixsga_resolved == resolved and loaded._mixsga_resolved.decode_kernel == "triton"
    assert loaded.config._attn_implementation == "mixsga_triton_sdpa"
    with torch.no_grad():  # prefill / training-style forwards are untouched by the switch
        assert torch.equal(model(ids).logits, loaded(ids).logits)


if __name__ == "__main__" and "--worker" in sys.argv:
    _worker()
