"""Fused mixSGA decode-attention kernel vs the torch reference, and the reference vs a naive loop.

The kernel runs on CPU tensors through Triton's interpreter (``TRITON_INTERPRET=1``). Triton 3.9's
interpreter accepts CPU tensors, with two catches found here:

* the flag must be set before ``triton`` itself is imported: Triton's own library functions
  (``tl.zeros``, ``tl.sum``, ...) are decorated at import time, and a kernel interpreted on top of
  a normally imported Triton fails with "Cannot call @triton.jit'd outside of the scope of a
  kernel". Importing Triton in interpreter mode also cannot be undone within a process. So the
  kernel cases run in one subprocess (this file with ``--worker``, env ``TRITON_INTERPRET=1``)
  and report JSON; the parametrised tests below check those results. The session's own Triton
  stays untouched (GPU tests elsewhere keep working).
* the interpreter cannot ``tl.dot`` bfloat16 (it multiplies the raw uint16 bit patterns,
  triton-lang/triton#11584); the kernel upcasts its dot operands to fp32 when not on CUDA
  (rounding P to bf16 first, as on the GPU).

Shapes are tiny: the interpreter is slow.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import sys

import pytest
import torch
from interpreter_worker import report, run_worker

import mixsga_train.attention.triton_decode as _td_module

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


def expand_index_for(ks: list[int], h_kv: int) -> list[torch.Tensor]:
    """Contiguous (possibly uneven) groups: native head j -> stored head j * k // H_kv."""
    return [torch.arange(h_kv) * k // h_kv for k in ks]


def make_case(
    B: int,
    T: int,
    ks: list[int],
    h_kv: int,
    n_rep: int,
    d: int,
    dtype=torch.float32,
    lengths: list[int] | None = None,
    empty_expert: int | None = None,
    seed: int = 0,
):
    """Random cache in the lead's layout. ``lengths``: per-row valid length (left padding).

    Padding tokens are routed and stored like any token, but their K/V are NaN, so any read of
    them that is not masked out poisons the output.
    """
    g = torch.Generator().manual_seed(seed)
    E = len(ks)
    choices = [e for e in range(E) if e != empty_expert]
    ids = torch.tensor(choices)[torch.randint(len(choices), (B, T), generator=g)].to(torch.uint8)
    kv_mask = None
    if lengths is not None:
        kv_mask = torch.arange(T)[None, :] >= (T - torch.tensor(lengths))[:, None]
    seg_k, seg_v = [], []
    for e, k in enumerate(ks):
        tb = (ids.t() == e).nonzero()  # time-major (t, b)
        sk = torch.randn(tb.shape[0], k, d, generator=g)
        sv = torch.randn(tb.shape[0], k, d, generator=g)
        if kv_mask is not None:
            pad = ~kv_mask[tb[:, 1], tb[:, 0]]
            sk[pad] = float("nan")
            sv[pad] = float("nan")
        seg_k.append(sk.to(dtype))
        seg_v.append(sv.to(dtype))
    q = torch.randn(B, h_kv * n_rep, d, generator=g).to(dtype)
    return q, seg_k, seg_v, ids, expand_index_for(ks, h_kv), kv_mask


def naive_attention(q, seg_k, seg_v, ids, expand_index, kv_mask, scale):
    """Token-by-token loop straight from the layout's definition (float64)."""
    B, Hq, d = q.shape
    T = ids.shape[1]
    h_kv = expand_index[0].numel()
    n_rep = Hq // h_kv
    # row of (b, t) in its expert's segment: walk time-major, count per expert
    row, seen = {}, [0] * len(seg_k)
    for t in range(T):
        for b in range(B):
            e = int(ids[b, t])
            row[(b, t)] = seen[e]
            seen[e] += 1
    out = torch.zeros(B, Hq, d, dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            j = h // n_rep
            logits, vals = [], []
            for t in range(T):
                if kv_mask is not None and not bool(kv_mask[b, t]):
                    continue
                e = int(ids[b, t])
                stored = int(expand_index[e][j])
                k = seg_k[e][row[(b, t)], stored].double()
                v = seg_v[e][row[(b, t)], stored].double()
                logits.append(float(q[b, h].double() @ k) * scale)
                vals.append(v)
            if not logits:
                continue
            m = max(logits)
            w = [math.exp(x - m) for x in logits]
            out[b, h] = sum(wi * vi for wi, vi in zip(w, vals)) / sum(w)
    return out


# ---------------------------------------------------------------------------------------------
# The reference itself
# ---------------------------------------------------------------------------------------------

REF_CASES = {
    "gqa_842": dict(B=2, T=9, ks=[8, 4, 2], h_kv=8, n_rep=2, d=8),
    "mha_uneven_31": dict(B=1, T=11, ks=[3, 1], h_kv=3, n_rep=1, d=6),
    "padded_empty_expert": dict(B=3, T=10, ks=[4, 2, 1], h_kv=4, n_rep=3, d=5, lengths=[10, 6, 1], empty_expert=1),
}


@pytest.mark.parametrize("name", list(REF_CASES))
def test_reference_matches_naive_loop(name):
    q, sk, sv, ids, ei, mask = make_case(**REF_CASES[name], seed=1)
    scale = 0.37
    ref = _td_module.mixed_decode_attention_reference(q, sk, sv, ids, ei, mask, scale=scale)
    naive = naive_attention(q, sk, sv, ids, ei, mask, scale)
    assert ref.shape == q.shape and ref.dtype == q.dtype
    torch.testing.assert_close(ref.double(), naive, atol=1e-5, rtol=1e-5)


def test_reference_default_scale_and_fully_masked_row():
    q, sk, sv, ids, ei, mask = make_case(B=2, T=6, ks=[2, 1], h_kv=2, n_rep=2, d=4, lengths=[6, 0], seed=2)
    ref = _td_module.mixed_decode_attention_reference(q, sk, sv, ids, ei, mask)
    naive = naive_attention(q, sk, sv, ids, ei, mask, 4**-0.5)
    torch.testing.assert_close(ref.double(), naive, atol=1e-5, rtol=1e-5)
    assert torch.equal(ref[1], torch.zeros_like(ref[1]))


def test_reference_rejects_segment_size_mismatch():
    q, sk, sv, ids, ei, _ = make_case(B=1, T=8, ks=[2, 1], h_kv=2, n_rep=1, d=4, seed=3)
    sk[0], sv[0] = sk[0][:-1], sv[0][:-1]
    with pytest.raises(ValueError, match="expert 0"):
        _td_module.mixed_decode_attention_reference(q, sk, sv, ids, ei)


def test_segment_row_index_matches_time_major_order():
    ids = torch.randint(0, 3, (3, 17), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    rows = _td_module.segment_row_index(ids, 3)
    assert rows.dtype == torch.int32 and rows.shape == ids.shape and rows.is_contiguous()
    for e in range(3):
        tb = (ids.t() == e).nonzero()
        assert torch.equal(rows[tb[:, 1], tb[:, 0]].long(), torch.arange(tb.shape[0]))


def test_module_imports_without_triton(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` raise ImportError
    monkeypatch.setitem(sys.modules, "triton.language", None)
    spec = importlib.util.spec_from_file_location("_td_no_triton", _td_module.__file__)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.triton_available() is False
    q, sk, sv, ids, ei, _ = make_case(B=1, T=5, ks=[2, 1], h_kv=2, n_rep=1, d=4, seed=5)
    mod.mixed_decode_attention_reference(q, sk, sv, ids, ei)  # the torch path still works
    with pytest.raises(RuntimeError, match="Triton is not importable"):
        mod.mixed_decode_attention(q, sk, sv, ids, ei)


# ---------------------------------------------------------------------------------------------
# The kernel (interpreter, CPU tensors)
# ---------------------------------------------------------------------------------------------

# T values are not multiples of block_t=16; d=24 is not a power of two (masked head dim)
KERNEL_CASES = {
    "gqa_842_fp32": dict(case=dict(B=1, T=37, ks=[8, 4, 2], h_kv=8, n_rep=4, d=32), dtype=torch.float32),
    "gqa_842_bf16": dict(case=dict(B=1, T=37, ks=[8, 4, 2], h_kv=8, n_rep=4, d=32), dtype=torch.bfloat16),
    "mha_uneven_31_fp32": dict(case=dict(B=2, T=21, ks=[3, 1], h_kv=3, n_rep=1, d=24), dtype=torch.float32),
    "mha_uneven_31_bf16": dict(case=dict(B=2, T=21, ks=[3, 1], h_kv=3, n_rep=1, d=24), dtype=torch.bfloat16),
    "padded_batch_empty_expert_fp32": dict(
        case=dict(B=3, T=29, ks=[4, 2, 1], h_kv=4, n_rep=2, d=16, lengths=[29, 17, 3], empty_expert=1),
        dtype=torch.float32,
    ),
    "padded_batch_bf16_split": dict(
        case=dict(B=2, T=45, ks=[4, 2, 1], h_kv=4, n_rep=2, d=16, lengths=[45, 20]),
        dtype=torch.bfloat16,
        num_splits=3,
    ),
    "gqa_842_fp32_split_4_experts": dict(
        case=dict(B=1, T=50, ks=[8, 4, 2, 1], h_kv=8, n_rep=2, d=16, lengths=[33]), dtype=torch.float32, num_splits=2
    ),
}


def _run_kernel_case(td, name: str) -> dict:
    spec = KERNEL_CASES[name]
    q, sk, sv, ids, ei, mask = make_case(**spec["case"], dtype=spec["dtype"], seed=6)
    out = td.mixed_decode_attention(q, sk, sv, ids, ei, mask, block_t=16, num_splits=spec.get("num_splits"))
    ref = td.mixed_decode_attention_reference(q, sk, sv, ids, ei, mask)
    return {
        "max_err": (out.float() - ref.float()).abs().max().item(),
        "finite": bool(torch.isfinite(out).all()),
        "shape_dtype_ok": out.shape == q.shape and out.dtype == q.dtype,
        "segment_sizes": [x.shape[0] for x in sk],
    }


def _run_extra_checks(td) -> dict:
    res = {}
    # fully masked row -> zeros; explicit scale; expand_index given as one stacked int tensor
    q, sk, sv, ids, ei, mask = make_case(B=2, T=18, ks=[2, 1], h_kv=2, n_rep=2, d=16, lengths=[18, 0], seed=7)
    out = td.mixed_decode_attention(q, sk, sv, ids, torch.stack(ei).to(torch.int32), mask, scale=0.2, block_t=16)
    ref = td.mixed_decode_attention_reference(q, sk, sv, ids, ei, mask, scale=0.2)
    res["masked_row_max_err"] = (out - ref).abs().max().item()
    res["masked_row_is_zero"] = bool((out[1] == 0).all())
    # precomputed row index, default block size, T=0
    q, sk, sv, ids, ei, _ = make_case(B=2, T=70, ks=[2, 1], h_kv=2, n_rep=1, d=16, seed=9)
    rows = td.segment_row_index(ids, 2)
    out = td.mixed_decode_attention(q, sk, sv, ids, ei, row_index=rows)
    res["default_block_max_err"] = (out - td.mixed_decode_attention_reference(q, sk, sv, ids, ei)).abs().max().item()
    empty = [x[:0] for x in sk]
    out = td.mixed_decode_attention(q, empty, empty, ids[:, :0], ei)
    res["t0_is_zero"] = bool((out == 0).all())
    # bad inputs
    q, sk, sv, ids, ei, _ = make_case(B=1, T=8, ks=[2, 1], h_kv=2, n_rep=1, d=16, seed=8)
    for key, call in {
        "kv_shape_mismatch": lambda: td.mixed_decode_attention(q, sk, [sv[0], sv[1][:-1]], ids, ei),
        "segment_count_mismatch": lambda: td.mixed_decode_attention(
            q, [sk[0][:-1], sk[1]], [sv[0][:-1], sv[1]], ids, ei
        ),
        "dtype_mismatch": lambda: td.mixed_decode_attention(q.double(), sk, sv, ids, ei),
    }.items():
        try:
            call()
            res[key] = None
        except ValueError as exc:
            res[key] = str(exc)
    res["triton_available"] = td.triton_available()
    return res


def _worker() -> None:
    """Runs in the subprocess, with TRITON_INTERPRET=1 set before Triton is imported."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    td = _td_module
    results = {"cases": {}, "extra": None}
    for name in KERNEL_CASES:
        try:
            results["cases"][name] = _run_kernel_case(td, name)
        except Exception as exc:  # reported per case by the parent
            results["cases"][name] = {"error": f"{type(exc).__name__}: {exc}"}
    try:
        results["extra"] = _run_extra_checks(td)
    except Exception as exc:
        results["extra"] = {"error": f"{type(exc).__name__}: {exc}"}
    report(results)


@pytest.fixture(scope="module")
def kernel_results():
    return run_worker(__file__)


TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@needs_triton
@pytest.mark.parametrize("name", list(KERNEL_CASES))
def test_kernel_matches_reference(kernel_results, name):
    res = kernel_results["cases"][name]
    assert "error" not in res, res.get("error")
    spec = KERNEL_CASES[name]
    if spec["case"].get("empty_expert") is not None:
        assert res["segment_sizes"][spec["case"]["empty_expert"]] == 0
    assert res["shape_dtype_ok"] and res["finite"]
    assert res["max_err"] <= TOL[spec["dtype"]], res


@needs_triton
def test_kernel_edge_cases_and_input_checks(kernel_results):
    res = kernel_results["extra"]
    assert "error" not in res, res.get("error")
    assert res["triton_available"] is True
    assert res["masked_row_max_err"] <= 1e-5 and res["masked_row_is_zero"]
    assert res["default_block_max_err"] <= 1e-5
    assert res["t0_is_zero"]
    assert res["kv_shape_mismatch"] and "expert 1" in res["kv_shape_mismatch"]
    assert res["segment_count_mismatch"] and "expert 0" in res["segment_count_mismatch"]
    assert res["dtype_mismatch"] and "cast" in res["dtype_mismatch"]


def test_triton_available_follows_interpret_flag(monkeypatch):
    if not HAS_TRITON:
        assert _td_module.triton_available() is False
        return
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _td_module.triton_available() is True
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert _td_module.triton_available() is torch.cuda.is_available()


if __name__ == "__main__" and "--worker" in sys.argv:
    _worker()
