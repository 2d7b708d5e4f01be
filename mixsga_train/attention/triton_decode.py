"""Fused decode attention over mixSGA's heterogeneous (mixed KV-head count) cache.

Cache layout for one layer (native KV heads ``H_kv``, head dim ``d``, batch ``B``, cached length
``T``, ``E`` experts, expert ``e`` keeping ``k_e`` KV heads):

* ``segment_keys[e]``, ``segment_values[e]``: ``[N_e, k_e, d]``, only the tokens routed to expert
  ``e``, in time-major order (time ``t`` first, then batch row ``b``), i.e. the order of
  ``(expert_ids.T == e).nonzero()``. ``N_e`` may be 0. Padding tokens occupy rows like any token.
* ``expand_index[e]``: ``[H_kv]`` integers; native KV head ``j`` of a token in expert ``e`` reads
  the token's stored head ``expand_index[e][j]``.
* ``expert_ids``: ``[B, T]`` (uint8), the expert of every cached token.
* ``kv_mask``: optional bool ``[B, T]``, False for padding tokens to ignore.

``mixed_decode_attention`` is a Triton kernel (flash-decoding style, online softmax in fp32):
one program per (batch row, native KV head, split of T). Each program gathers every token's K/V
straight from that token's expert segment at the expert's own head count (no expansion to full
heads in memory), serving the ``n_rep`` query heads of its KV head. With more than one split a
second small kernel merges the partial results by log-sum-exp.

``mixed_decode_attention_reference`` is the plain-torch definition (fp32, materialises the
expanded K/V); use it as ground truth. ``segment_row_index`` computes the transient per-token
row index the kernel needs.

The module imports without Triton; ``triton_available()`` says whether the kernel can run
(Triton importable, and CUDA present or ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import math
import os
from functools import lru_cache
from typing import Sequence

import torch

try:  # the package must work where Triton is not installed
    import triton
    import triton.language as tl

    _TRITON_IMPORT_ERROR: Exception | None = None
except Exception as exc:  # pragma: no cover - depends on the environment
    triton = None
    tl = None
    _TRITON_IMPORT_ERROR = exc

__all__ = [
    "MAX_EXPERTS",
    "mixed_decode_attention",
    "mixed_decode_attention_reference",
    "segment_row_index",
    "triton_available",
]

MAX_EXPERTS = 4  # the kernel takes one K and one V pointer per expert


def _interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available() -> bool:
    """True when Triton imports and there is a CUDA device or ``TRITON_INTERPRET=1`` is set."""
    if triton is None:
        return False
    return torch.cuda.is_available() or _interpret_mode()


# ----------------------------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------------------------


def segment_row_index(expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Row of every cached token inside its expert's segment.

    ``expert_ids``: ``[B, T]`` integer tensor. Returns int32 ``[B, T]`` (contiguous) with
    ``row[b, t]`` = number of tokens routed to the same expert that come before ``(t, b)`` in
    time-major order. A one-hot cumsum over the time-major flattening: no host sync, so it
    can be captured in a CUDA graph.
    """
    B, T = expert_ids.shape
    classes = torch.arange(num_experts, device=expert_ids.device, dtype=expert_ids.dtype)
    onehot = expert_ids.t().contiguous()[:, :, None] == classes  # [T, B, E], time-major, contiguous
    counts = onehot.view(T * B, num_experts).cumsum(0, dtype=torch.int32)
    rows = torch.where(onehot.view(T * B, num_experts), counts, 0).sum(1, dtype=torch.int32) - 1
    return rows.view(T, B).t().contiguous()


def _check_inputs(query, segment_keys, segment_values, expert_ids, expand_index, kv_mask):
    if query.dim() != 3:
        raise ValueError(f"query must be [B, H_q, d], got shape {tuple(query.shape)}")
    B, Hq, d = query.shape
    E = len(segment_keys)
    if E == 0 or len(segment_values) != E or len(expand_index) != E:
        raise ValueError(
            f"need one segment_keys/segment_values/expand_index entry per expert, got "
            f"{len(segment_keys)}/{len(segment_values)}/{len(expand_index)}"
        )
    if expert_ids.dim() != 2 or expert_ids.shape[0] != B:
        raise ValueError(f"expert_ids must be [B={B}, T], got shape {tuple(expert_ids.shape)}")
    Hkv = int(expand_index[0].shape[-1])
    if Hq % Hkv:
        raise ValueError(f"H_q={Hq} is not a multiple of H_kv={Hkv} (from expand_index)")
    for e in range(E):
        sk, sv = segment_keys[e], segment_values[e]
        if sk.dim() != 3 or sk.shape[-1] != d or sk.shape != sv.shape:
            raise ValueError(
                f"expert {e}: segment keys/values must both be [N_e, k_e, d={d}], got "
                f"{tuple(sk.shape)} and {tuple(sv.shape)}"
            )
        if int(expand_index[e].shape[-1]) != Hkv:
            raise ValueError(f"expand_index[{e}] has {expand_index[e].shape[-1]} entries, expected H_kv={Hkv}")
    if kv_mask is not None and tuple(kv_mask.shape) != tuple(expert_ids.shape):
        raise ValueError(f"kv_mask must be [B, T] like expert_ids, got {tuple(kv_mask.shape)}")
    return B, Hq, d, E, Hkv


def _check_counts(segment_keys, expert_ids, expand_index, exact: bool = True):
    """Host-side consistency checks (they sync, so only run on CPU tensors). With a caller's
    ``row_index`` (``exact=False``) a segment may hold more rows than tokens routed to it."""
    E = len(segment_keys)
    counts = torch.bincount(expert_ids.reshape(-1).long(), minlength=E)
    if counts.numel() > E:
        raise ValueError(f"expert_ids holds expert {counts.numel() - 1} but only {E} experts are given")
    for e in range(E):
        rows = segment_keys[e].shape[0]
        if int(counts[e]) > rows if not exact else int(counts[e]) != rows:
            raise ValueError(
                f"expert {e}: expert_ids routes {int(counts[e])} tokens there but its segment has "
                f"{segment_keys[e].shape[0]} rows"
            )
        ke = segment_keys[e].shape[1]
        ei = torch.as_tensor(expand_index[e])
        if ei.numel() and (int(ei.min()) < 0 or int(ei.max()) >= ke):
            raise ValueError(f"expand_index[{e}] must lie in 0..{ke - 1}, got {ei.tolist()}")


# ----------------------------------------------------------------------------------------------
# Reference (torch)
# ----------------------------------------------------------------------------------------------


def mixed_decode_attention_reference(
    query: torch.Tensor,
    segment_keys: Sequence[torch.Tensor],
    segment_values: Sequence[torch.Tensor],
    expert_ids: torch.Tensor,
    expand_index: Sequence[torch.Tensor],
    kv_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Decode attention over the mixed cache, in plain torch (fp32 math): the ground truth.

    query ``[B, H_q, d]``; segment_keys/values[e] ``[N_e, k_e, d]`` (time-major); expert_ids
    ``[B, T]``; expand_index[e] ``[H_kv]``; kv_mask bool ``[B, T]`` or None; scale defaults to
    ``d ** -0.5``. Expands every token to ``H_kv`` heads (``full_k[b, :, t] =
    segment_keys[e][row(b, t)][expand_index[e]]``), repeats to ``H_q`` (query head ``h`` reads KV
    head ``h // n_rep``) and returns ``softmax(q k^T * scale) v`` as ``[B, H_q, d]`` in the
    query's dtype. A row with no unmasked token returns zeros.
    """
    B, Hq, d, E, Hkv = _check_inputs(query, segment_keys, segment_values, expert_ids, expand_index, kv_mask)
    T = expert_ids.shape[1]
    n_rep = Hq // Hkv
    scale = d**-0.5 if scale is None else scale
    dev = query.device
    full_k = torch.zeros(B, Hkv, T, d, dtype=torch.float32, device=dev)
    full_v = torch.zeros_like(full_k)
    covered = torch.zeros(B, T, dtype=torch.bool, device=dev)
    ids_tm = expert_ids.t()  # [T, B]
    for e in range(E):
        tb = (ids_tm == e).nonzero()  # [N_e, 2] rows (t, b), time-major
        if tb.shape[0] != segment_keys[e].shape[0]:
            raise ValueError(
                f"expert {e}: expert_ids routes {tb.shape[0]} tokens there but its segment has "
                f"{segment_keys[e].shape[0]} rows"
            )
        if tb.shape[0] == 0:
            continue
        idx = torch.as_tensor(expand_index[e], device=dev).long()
        t_idx, b_idx = tb[:, 0], tb[:, 1]
        # advanced indices around a slice: result is [N_e, H_kv, d]
        full_k[b_idx, :, t_idx] = segment_keys[e].float()[:, idx]
        full_v[b_idx, :, t_idx] = segment_values[e].float()[:, idx]
        covered[b_idx, t_idx] = True
    if not bool(covered.all()):
        raise ValueError("expert_ids holds an expert id >= the number of experts given")
    if kv_mask is not None:  # padding content must not matter, even NaN
        pad = ~kv_mask.bool()[:, None, :, None]
        full_k = full_k.masked_fill(pad, 0.0)
        full_v = full_v.masked_fill(pad, 0.0)
    full_k = full_k.repeat_interleave(n_rep, dim=1)  # [B, H_q, T, d]
    full_v = full_v.repeat_interleave(n_rep, dim=1)
    scores = torch.einsum("bhd,bhtd->bht", query.float(), full_k) * scale
    if kv_mask is not None:
        scores = scores.masked_fill(~kv_mask.bool()[:, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = torch.nan_to_num(probs, nan=0.0)  # fully masked rows -> zeros
    out = torch.einsum("bht,bhtd->bhd", probs, full_v)
    return out.to(query.dtype)


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _mixed_decode_kernel(
        Q, Out, PartO, PartLse,
        ExpertIds, RowIdx, KvMask, ExpandIdx,
        K0, V0, K1, V1, K2, V2, K3, V3,
        sk_r0, sk_h0, sv_r0, sv_h0,
        sk_r1, sk_h1, sv_r1, sv_h1,
        sk_r2, sk_h2, sv_r2, sv_h2,
        sk_r3, sk_h3, sv_r3, sv_h3,
        stride_qb, stride_qh,
        stride_ob, stride_oh,
        stride_eb, stride_et,
        stride_mb, stride_mt,
        T, H_KV, N_REP, D, H_Q, NUM_SPLITS, CHUNK,
        qk_scale,
        NUM_E: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_H: tl.constexpr,
        BLOCK_D: tl.constexpr,
        HAS_MASK: tl.constexpr,
        SPLIT: tl.constexpr,
        IEEE: tl.constexpr,
        DOT_FP32: tl.constexpr,
        EVEN_D: tl.constexpr,
        ALIGNED: tl.constexpr,
    ):
        pid = tl.program_id(0)
        split = tl.program_id(1)
        b = pid // H_KV
        j = pid % H_KV

        offs_h = tl.arange(0, BLOCK_H)
        offs_d = tl.arange(0, BLOCK_D)
        mask_h = offs_h < N_REP
        mask_d = offs_d < D
        qh = j * N_REP + offs_h  # query heads served by KV head j
        q = tl.load(
            Q + b * stride_qb + qh[:, None] * stride_qh + offs_d[None, :],
            mask=mask_h[:, None] & mask_d[None, :],
            other=0.0,
        )
        if DOT_FP32:  # interpreter: tl.dot on bf16/fp16 is unsupported there, emulate in fp32
            q = q.to(tl.float32)

        # stored head each expert uses for native KV head j
        hk0 = tl.load(ExpandIdx + j).to(tl.int64)
        if NUM_E > 1:
            hk1 = tl.load(ExpandIdx + H_KV + j).to(tl.int64)
        if NUM_E > 2:
            hk2 = tl.load(ExpandIdx + 2 * H_KV + j).to(tl.int64)
        if NUM_E > 3:
            hk3 = tl.load(ExpandIdx + 3 * H_KV + j).to(tl.int64)

        m_i = tl.full([BLOCK_H], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
        acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)

        t_start = split * CHUNK
        t_end = tl.minimum(T, t_start + CHUNK)
        for t0 in range(t_start, t_end, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            valid = offs_t < t_end
            e = tl.load(ExpertIds + b * stride_eb + offs_t * stride_et, mask=valid, other=0).to(tl.int32)
            r = tl.load(RowIdx + b * T + offs_t, mask=valid, other=0).to(tl.int64)
            if HAS_MASK:
                keep = tl.load(KvMask + b * stride_mb + offs_t * stride_mt, mask=valid, other=0)
                valid = valid & (keep != 0)
            # per-token base pointer inside the token's own expert segment
            kp = K0 + r * sk_r0 + hk0 * sk_h0
            vp = V0 + r * sv_r0 + hk0 * sv_h0
            if NUM_E > 1:
                kp = tl.where(e == 1, K1 + r * sk_r1 + hk1 * sk_h1, kp)
                vp = tl.where(e == 1, V1 + r * sv_r1 + hk1 * sv_h1, vp)
            if NUM_E > 2:
                kp = tl.where(e == 2, K2 + r * sk_r2 + hk2 * sk_h2, kp)
                vp = tl.where(e == 2, V2 + r * sv_r2 + hk2 * sv_h2, vp)
            if NUM_E > 3:
                kp = tl.where(e == 3, K3 + r * sk_r3 + hk3 * sk_h3, kp)
                vp = tl.where(e == 3, V3 + r * sv_r3 + hk3 * sv_h3, vp)
            if ALIGNED:  # every token's K/V row starts 16-byte aligned; the pointer select hides that
                kp = tl.multiple_of(kp, 16)
                vp = tl.multiple_of(vp, 16)
            if EVEN_D:  # no d mask: keeps the K/V loads vectorised
                tile_mask = valid[:, None]
            else:
                tile_mask = valid[:, None] & mask_d[None, :]
            k = tl.load(kp[:, None] + offs_d[None, :], mask=tile_mask, other=0.0)
            if DOT_FP32:
                k = k.to(tl.float32)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = s * qk_scale  # log2 domain
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(vp[:, None] + offs_d[None, :], mask=tile_mask, other=0.0)
            p_lo = p.to(V0.dtype.element_ty)  # P in the cache dtype, as flash attention does
            if DOT_FP32:
                pv = tl.dot(p_lo.to(tl.float32), v.to(tl.float32), input_precision="ieee")
            elif IEEE:
                pv = tl.dot(p_lo, v, input_precision="ieee")
            else:
                pv = tl.dot(p_lo, v)
            acc = acc * alpha[:, None] + pv
            m_i = m_new

        has = l_i > 0.0
        out = acc / tl.where(has, l_i, 1.0)[:, None]
        out_mask = mask_h[:, None] & mask_d[None, :]
        if SPLIT:
            row = (b * H_Q + qh) * NUM_SPLITS + split  # PartLse is [B, H_q, S], PartO [B, H_q, S, D]
            tl.store(PartO + row[:, None] * D + offs_d[None, :], out, mask=out_mask)
            lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
            tl.store(PartLse + row, lse, mask=mask_h)
        else:
            tl.store(
                Out + b * stride_ob + qh[:, None] * stride_oh + offs_d[None, :],
                out.to(Out.dtype.element_ty),
                mask=out_mask,
            )

    @triton.jit
    def _merge_splits_kernel(
        PartO, PartLse, Out,
        stride_ob, stride_oh,
        H_Q, NUM_SPLITS, D,
        BLOCK_S: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        pid = tl.program_id(0)  # one program per (b, query head)
        b = pid // H_Q
        h = pid % H_Q
        offs_s = tl.arange(0, BLOCK_S)
        offs_d = tl.arange(0, BLOCK_D)
        mask_s = offs_s < NUM_SPLITS
        mask_d = offs_d < D
        lse = tl.load(PartLse + pid * NUM_SPLITS + offs_s, mask=mask_s, other=float("-inf"))
        m = tl.max(lse, 0)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        w = tl.exp2(lse - m_safe)  # 0 for empty splits
        o = tl.load(
            PartO + (pid * NUM_SPLITS + offs_s)[:, None] * D + offs_d[None, :],
            mask=mask_s[:, None] & mask_d[None, :],
            other=0.0,
        )
        total = tl.sum(w, 0)
        res = tl.sum(o * w[:, None], 0) / tl.where(total > 0.0, total, 1.0)
        tl.store(Out + b * stride_ob + h * stride_oh + offs_d, res.to(Out.dtype.element_ty), mask=mask_d)


@lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _default_block_t(d: int) -> int:
    return 64 if d <= 128 else 32


def _auto_num_splits(device: torch.device, programs: int, T: int, block_t: int) -> int:
    if device.type != "cuda":
        return 1  # interpreter: one pass is fastest
    target = 2 * _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    splits = -(-target // max(programs, 1))
    return max(1, min(splits, -(-T // block_t)))


def _stack_expand_index(expand_index, device: torch.device) -> torch.Tensor:
    if isinstance(expand_index, torch.Tensor) and expand_index.dim() == 2:
        return expand_index.to(device=device, dtype=torch.int32).contiguous()
    return torch.stack([torch.as_tensor(ei).to(device=device, dtype=torch.int32) for ei in expand_index]).contiguous()


def mixed_decode_attention(
    query: torch.Tensor,
    segment_keys: Sequence[torch.Tensor],
    segment_values: Sequence[torch.Tensor],
    expert_ids: torch.Tensor,
    expand_index: Sequence[torch.Tensor] | torch.Tensor,
    kv_mask: torch.Tensor | None = None,
    scale: float | None = None,
    *,
    row_index: torch.Tensor | None = None,
    num_splits: int | None = None,
    block_t: int | None = None,
    num_warps: int = 4,
) -> torch.Tensor:
    """One decode step of attention over the mixed cache, as a fused Triton kernel.

    Shapes: query ``[B, H_q, d]``; segment_keys[e], segment_values[e] ``[N_e, k_e, d]`` in
    time-major token order, same dtype as the query; expert_ids ``[B, T]`` (uint8 or any integer
    type); expand_index: E tensors ``[H_kv]`` (or one int ``[E, H_kv]`` tensor, which saves a
    stack per call); kv_mask optional bool ``[B, T]`` (False = ignore). ``scale`` defaults to
    ``d ** -0.5``. Returns ``[B, H_q, d]`` in the query's dtype; rows whose tokens are all masked
    give zeros. Query head ``h`` attends with native KV head ``h // (H_q // H_kv)``.

    Keyword-only tuning knobs: ``row_index`` (int32 ``[B, T]`` from ``segment_row_index``; computed
    here when None), ``num_splits`` (split-K over T; auto on CUDA, 1 otherwise), ``block_t``
    (tokens per inner block, a power of two >= 16), ``num_warps``.
    At most ``MAX_EXPERTS`` (4) experts. The last dim of every tensor must be contiguous (copied
    otherwise). On CPU tensors (``TRITON_INTERPRET=1``) segment sizes are checked against
    ``expert_ids``; on CUDA they are not (that check would sync): a mismatch reads out of bounds.
    """
    if triton is None:
        raise RuntimeError(f"Triton is not importable ({_TRITON_IMPORT_ERROR}); use the torch path")
    B, Hq, d, E, Hkv = _check_inputs(query, segment_keys, segment_values, expert_ids, expand_index, kv_mask)
    if E > MAX_EXPERTS:
        raise ValueError(f"the kernel supports at most {MAX_EXPERTS} experts, got {E}")
    dev = query.device
    if dev.type != "cuda" and not _interpret_mode():
        raise RuntimeError("mixed_decode_attention needs CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors")
    for e in range(E):
        if segment_keys[e].dtype != query.dtype or segment_values[e].dtype != query.dtype:
            raise ValueError(
                f"expert {e}: segments are {segment_keys[e].dtype}/{segment_values[e].dtype} but the query is "
                f"{query.dtype}; cast one side"
            )
    T = expert_ids.shape[1]
    if dev.type != "cuda":
        _check_counts(segment_keys, expert_ids, expand_index, exact=row_index is None)
    n_rep = Hq // Hkv
    out = torch.empty(B, Hq, d, dtype=query.dtype, device=dev)
    if B == 0 or Hq == 0:
        return out
    if T == 0:
        return out.zero_()
    scale = d**-0.5 if scale is None else float(scale)

    if query.stride(-1) != 1:
        query = query.contiguous()
    if row_index is None:
        row_index = segment_row_index(expert_ids, E)
    else:
        if tuple(row_index.shape) != (B, T):
            raise ValueError(f"row_index must be [B, T] = [{B}, {T}], got {tuple(row_index.shape)}")
        if row_index.dtype != torch.int32 or not row_index.is_contiguous():
            row_index = row_index.to(torch.int32).contiguous()
    expand = _stack_expand_index(expand_index, dev)
    if kv_mask is None:
        mask_arg = expert_ids  # unused (HAS_MASK=False)
    else:
        mask_arg = (kv_mask if kv_mask.dtype == torch.bool else kv_mask != 0).view(torch.uint8)
    ids = expert_ids

    ks, vs = [], []
    for e in range(E):
        sk, sv = segment_keys[e], segment_values[e]
        ks.append(sk if sk.stride(-1) == 1 else sk.contiguous())
        vs.append(sv if sv.stride(-1) == 1 else sv.contiguous())
    # pad to MAX_EXPERTS pointer slots; an unused or empty slot is never dereferenced, but point
    # it at a real allocation anyway so the launcher never sees a null pointer
    filler_k = next((x for x in ks if x.numel()), ks[0])
    filler_v = next((x for x in vs if x.numel()), vs[0])
    ptr_args, stride_args = [], []
    for e in range(MAX_EXPERTS):
        if e < E and ks[e].numel():
            ptr_args += [ks[e], vs[e]]
            stride_args += [ks[e].stride(0), ks[e].stride(1), vs[e].stride(0), vs[e].stride(1)]
        else:
            ptr_args += [filler_k, filler_v]
            stride_args += [0, 0, 0, 0]

    elsize = query.element_size()
    aligned = all(
        t.data_ptr() % 16 == 0 and (t.stride(0) * elsize) % 16 == 0 and (t.stride(1) * elsize) % 16 == 0
        for t in ptr_args
    )

    block_t = block_t or _default_block_t(d)
    if block_t < 16 or block_t & (block_t - 1):
        raise ValueError(f"block_t must be a power of two >= 16, got {block_t}")
    block_h = max(16, triton.next_power_of_2(n_rep))
    block_d = max(16, triton.next_power_of_2(d))
    programs = B * Hkv
    splits = num_splits or _auto_num_splits(dev, programs, T, block_t)
    splits = max(1, min(int(splits), -(-T // block_t)))
    chunk = -(-(-(-T // splits)) // block_t) * block_t  # tokens per split, a multiple of block_t
    splits = -(-T // chunk)

    if splits > 1:
        part_o = torch.empty(B, Hq, splits, d, dtype=torch.float32, device=dev)
        part_lse = torch.empty(B, Hq, splits, dtype=torch.float32, device=dev)
    else:
        part_o = part_lse = out  # unused

    _mixed_decode_kernel[(programs, splits)](
        query, out, part_o, part_lse,
        ids, row_index, mask_arg, expand,
        *ptr_args,
        *stride_args,
        query.stride(0), query.stride(1),
        out.stride(0), out.stride(1),
        ids.stride(0), ids.stride(1),
        mask_arg.stride(0), mask_arg.stride(1),
        T, Hkv, n_rep, d, Hq, splits, chunk,
        scale * math.log2(math.e),
        NUM_E=E,
        BLOCK_T=block_t,
        BLOCK_H=block_h,
        BLOCK_D=block_d,
        HAS_MASK=kv_mask is not None,
        SPLIT=splits > 1,
        IEEE=query.dtype == torch.float32 or dev.type != "cuda",
        DOT_FP32=dev.type != "cuda" and query.dtype != torch.float32,
        EVEN_D=block_d == d,
        ALIGNED=aligned,
        num_warps=num_warps,
    )
    if splits > 1:
        _merge_splits_kernel[(B * Hq,)](
            part_o, part_lse, out,
            out.stride(0), out.stride(1),
            Hq, splits, d,
            BLOCK_S=triton.next_power_of_2(splits),
            BLOCK_D=block_d,
            num_warps=4,
        )
    return out
