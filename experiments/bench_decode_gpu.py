"""Decode-step attention benchmark: fused mixSGA kernel vs torch paths vs GQA / unconverted SDPA.

One decode step of attention for one layer (query length 1, all T cached tokens valid), timed for:

* ``mixsga_kernel``: ``mixed_decode_attention`` as a model would call it (row index computed inside)
* ``mixsga_kernel_core``: the same with the row index precomputed (kernel launches only)
* ``mixsga_segments``: the default torch read path (``segment_attention.py``) on a ``MixedKVLayer``
  holding the same number of tokens per expert: grouped-query attention per expert buffer at the
  expert's head count, partial softmaxes merged by log-sum-exp (no native-size K/V)
* ``mixsga_torch``: the old naive torch path: expand every expert segment to H_kv heads
  (index_select + index_copy into a full [B, T, H_kv, d] buffer), then SDPA with ``enable_gqa``
* ``gqa_sdpa``: a GQA cache with the same budget (H_kv * budget heads), SDPA
* ``mha_sdpa``: the unconverted model's cache (H_kv heads), SDPA

Default shape: Llama-3.2-1B (H_q=32, H_kv=8, d=64, 16 layers), experts [8, 4, 2] at 3:1:6 (50% KV),
bf16, batch 1/8/32, context 1k/2k/4k/8k. ``tokens/s`` is ``1 / (layers * step time)``: attention
only, everything else in the model ignored. Timing: ``triton.testing.do_bench`` (median, L2
flushed between reps) and, unless ``--no-cudagraph``, ``do_bench_cudagraph`` (no launch overhead,
but L2 stays warm across replays, so small caches that fit in L2 look faster there).
Bytes are estimates of what each method must move from memory per step (see ``bytes_for``).

Writes ``experiments/results/decode_bench.{md,json}`` (``decode_bench_cpu_smoke.*`` with
``--cpu-smoke``, which runs tiny shapes on CPU with the Triton interpreter to exercise the code).

End to end (``--mode e2e``, or ``all``, the default): greedy ``generate()`` decode tokens/s of a
randomly initialised Llama-3.2-1B-shaped model (built from a ``LlamaConfig``, no download) in
five variants: ``unconverted`` (SDPA, DynamicCache), ``gqa_torch`` / ``gqa_triton`` (GQA, 4 KV
heads) and ``mixsga_torch`` / ``mixsga_triton`` (mixSGA 3:1:6 over [8, 4, 2] KV heads), the
``_torch`` / ``_triton`` suffix being ``attention.decode_kernel``. Prompts are random tokens of the
given context length, no padding. A logits processor timestamps every step (after a CUDA sync);
decode time per step is the mean over steps 2..N (step 1 may include Triton's JIT compile), and
decode tokens/s = batch / step time. Writes ``decode_e2e.{md,json}`` (rewritten after every row,
so a run cut short keeps what it measured).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(RESULTS_DIR.parents[1]))  # this checkout's mixsga_train, installed or not
METHODS = ["mixsga_kernel", "mixsga_kernel_core", "mixsga_segments", "mixsga_torch", "gqa_sdpa", "mha_sdpa"]
E2E_METHODS = ["unconverted", "gqa_torch", "gqa_triton", "mixsga_torch", "mixsga_triton"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    p.add_argument("--q-heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=16, help="layers per generated token (tokens/s = 1/(layers*t))")
    p.add_argument("--expert-kv-heads", type=int, nargs="+", default=[8, 4, 2])
    p.add_argument("--ratio", default="3:1:6")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warmup (ms)")
    p.add_argument("--rep", type=int, default=100, help="do_bench measurement time (ms)")
    p.add_argument("--no-cudagraph", action="store_true", help="skip the CUDA-graph timings")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--mode", choices=["all", "op", "e2e"], default="all",
                   help="op: one layer's attention step; e2e: generate() on a Llama-3.2-1B-shaped model; all: both")
    p.add_argument("--e2e-batches", type=int, nargs="+", default=None, help="default: --batches")
    p.add_argument("--e2e-contexts", type=int, nargs="+", default=None, help="default: --contexts")
    p.add_argument("--e2e-methods", nargs="+", choices=E2E_METHODS, default=E2E_METHODS)
    p.add_argument("--new-tokens", type=int, default=32, help="e2e: tokens generated per run (>= 3)")
    p.add_argument("--gqa-kv-heads", type=int, default=4, help="e2e: KV heads of the GQA variant")
    p.add_argument("--e2e-layers", type=int, default=None, help="e2e: decoder layers (default: --layers)")
    p.add_argument("--vocab", type=int, default=128256, help="e2e: vocabulary size")
    p.add_argument("--intermediate", type=int, default=8192, help="e2e: MLP width")
    p.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="tiny shapes on CPU (Triton interpreter for the kernel): checks the script, times nothing useful",
    )
    args = p.parse_args(argv)
    if len(args.expert_kv_heads) != len(args.ratio.replace(",", ":").split(":")):
        p.error("--ratio needs one share per --expert-kv-heads entry")
    if args.q_heads % args.kv_heads:
        p.error("--q-heads must be a multiple of --kv-heads")
    if args.cpu_smoke:  # tiny defaults unless given explicitly
        given = set(a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:]))
        for flag, attr, val in [
            ("--batches", "batches", [1, 2]),
            ("--contexts", "contexts", [64, 100]),
            ("--q-heads", "q_heads", 8),
            ("--kv-heads", "kv_heads", 4),
            ("--head-dim", "head_dim", 16),
            ("--expert-kv-heads", "expert_kv_heads", [4, 2, 1]),
            ("--new-tokens", "new_tokens", 4),
            ("--gqa-kv-heads", "gqa_kv_heads", 2),
            ("--e2e-contexts", "e2e_contexts", [16, 40]),
            ("--e2e-layers", "e2e_layers", 2),
            ("--vocab", "vocab", 256),
            ("--intermediate", "intermediate", 256),
        ]:
            if flag not in given:
                setattr(args, attr, val)
    args.e2e_batches = args.e2e_batches or args.batches
    args.e2e_layers = args.e2e_layers or args.layers
    args.e2e_contexts = args.e2e_contexts or args.contexts
    if args.new_tokens < 3:
        p.error("--new-tokens must be >= 3 (step 1 is excluded from the decode timing)")
    return args


def exact_counts(shares: list[float], total: int) -> list[int]:
    """Split ``total`` tokens by ``shares`` exactly (largest remainder)."""
    raw = [s / sum(shares) * total for s in shares]
    counts = [int(math.floor(r)) for r in raw]
    for i in sorted(range(len(raw)), key=lambda i: raw[i] - counts[i], reverse=True)[: total - sum(counts)]:
        counts[i] += 1
    return counts


def build_case(args, B: int, T: int, device, dtype, torch):
    """Random mixed cache in the lead's layout, plus the equivalent GQA / MHA caches."""
    from mixsga_train.attention.budget import mixsga_budget, parse_ratio

    g = torch.Generator(device="cpu").manual_seed(args.seed + 1000 * B + T)
    ks, Hkv, Hq, d = args.expert_kv_heads, args.kv_heads, args.q_heads, args.head_dim
    shares = parse_ratio(args.ratio)
    budget = mixsga_budget(shares, ks, Hkv)
    counts = exact_counts(shares, B * T)
    ids = torch.cat([torch.full((c,), e, dtype=torch.uint8) for e, c in enumerate(counts)])
    ids = ids[torch.randperm(B * T, generator=g)].view(B, T).to(device)
    seg_k, seg_v, positions = [], [], []
    flat_tm = ids.t().reshape(-1)  # time-major
    for e, k in enumerate(ks):
        tm = (flat_tm == e).nonzero().squeeze(1)  # time-major order
        t_idx, b_idx = tm // B, tm % B
        positions.append(b_idx * T + t_idx)  # flat [B*T] position of each segment row
        n = tm.numel()
        seg_k.append(torch.randn(n, k, d, device=device).to(dtype))
        seg_v.append(torch.randn(n, k, d, device=device).to(dtype))
    expand = torch.stack([torch.arange(Hkv) * k // Hkv for k in ks]).to(device=device, dtype=torch.int32)
    q = torch.randn(B, Hq, d, device=device).to(dtype)
    h_gqa = max(1, round(budget * Hkv))
    gqa_k = torch.randn(B, h_gqa, T, d, device=device).to(dtype)
    gqa_v = torch.randn_like(gqa_k)
    mha_k = torch.randn(B, Hkv, T, d, device=device).to(dtype)
    mha_v = torch.randn_like(mha_k)
    return dict(
        q=q, ids=ids, seg_k=seg_k, seg_v=seg_v, expand=expand, positions=positions, counts=counts,
        budget=budget, h_gqa=h_gqa, gqa=(gqa_k, gqa_v), mha=(mha_k, mha_v),
    )


def segment_layer(case, args, torch):
    """A ``MixedKVLayer`` holding the case's routing (random K/V), as the model's cache would after a
    prefill, with the decode kernel's token slots; plus the kernel-read closure for checking."""
    from types import SimpleNamespace

    from mixsga_train.attention.cache import MixedKVLayer
    from mixsga_train.attention.heads import HeadGrouping

    ids = case["ids"].long()
    B, T = ids.shape
    groupings = [HeadGrouping(args.kv_heads, k) for k in args.expert_kv_heads]
    router = SimpleNamespace(last_ids=ids)
    layer = MixedKVLayer(groupings, router, decode_switch=SimpleNamespace())
    dtype, device = case["q"].dtype, case["q"].device
    for start in range(0, T, 1024):  # chunks keep the transient native-size K/V small
        n = min(1024, T - start)
        router.last_ids = ids[:, start:start + n]
        k = torch.randn(B, args.kv_heads, n, args.head_dim, device=device, dtype=dtype)
        layer.update(k, torch.randn_like(k))
    return layer


def segment_read(layer, q, segment_attention):
    """q [B, H_q, d] -> [B, H_q, d] through the default torch read path."""
    return segment_attention(layer, q[:, :, None], None)[:, 0]


def torch_expand_sdpa(q, seg_k, seg_v, expand, positions, B, T, torch, F):
    """The naive torch path: expand each segment to H_kv heads, scatter into a full cache, SDPA."""
    Hkv, d = expand.shape[1], q.shape[-1]
    full_k = torch.empty(B * T, Hkv, d, dtype=q.dtype, device=q.device)
    full_v = torch.empty_like(full_k)
    for e in range(len(seg_k)):
        if seg_k[e].shape[0]:
            idx = expand[e].long()
            full_k.index_copy_(0, positions[e], seg_k[e].index_select(1, idx))
            full_v.index_copy_(0, positions[e], seg_v[e].index_select(1, idx))
    k = full_k.view(B, T, Hkv, d).transpose(1, 2)
    v = full_v.view(B, T, Hkv, d).transpose(1, 2)
    return sdpa(q, k, v, F)


def sdpa(q, k, v, F):
    """q [B, H_q, d] against k/v [B, H, T, d] with H dividing H_q; returns [B, H_q, d]."""
    out = F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=k.shape[1] != q.shape[1])
    return out[:, :, 0]


def bytes_for(method: str, case, B: int, T: int, args, elsize: int) -> dict:
    """Estimated bytes per step: ``kv_cache`` (the cache as stored), ``read`` and ``written``."""
    d, Hkv = args.head_dim, args.kv_heads
    mixed = sum(c * k for c, k in zip(case["counts"], args.expert_kv_heads)) * d * 2 * elsize
    full = B * T * Hkv * d * 2 * elsize
    ids = B * T  # uint8 expert id per token
    if method in ("mixsga_kernel", "mixsga_kernel_core"):
        # K/V once at expert granularity + ids + int32 row index; the full call also builds the
        # row index (one-hot cumsum, ~E*(4+4) B/token written and read), not counted here
        return dict(kv_cache=mixed + ids, read=mixed + ids + 4 * B * T, written=0)
    if method == "mixsga_segments":  # K/V once at expert granularity (+ int32 slot positions)
        return dict(kv_cache=mixed + 5 * ids, read=mixed + 4 * ids, written=0)
    if method == "mixsga_torch":  # read segments, write the full cache, SDPA reads it back
        return dict(kv_cache=mixed + ids, read=mixed + full, written=full)
    if method == "gqa_sdpa":
        g = B * T * case["h_gqa"] * d * 2 * elsize
        return dict(kv_cache=g, read=g, written=0)
    return dict(kv_cache=full, read=full, written=0)  # mha_sdpa


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton
    import torch
    import torch.nn.functional as F

    if not args.cpu_smoke and not torch.cuda.is_available():
        print(
            "bench_decode_gpu: no CUDA device visible; this benchmark needs a GPU. "
            "Run with --cpu-smoke to exercise the script on CPU at tiny sizes.",
            file=sys.stderr,
        )
        return 2
    from mixsga_train.attention.triton_decode import triton_available

    if not triton_available():
        print("bench_decode_gpu: triton is not importable; cannot time the kernel.", file=sys.stderr)
        return 2
    if args.mode in ("all", "op"):
        run_op_bench(args, torch, F)
    if args.mode in ("all", "e2e"):
        run_e2e_bench(args, torch)
    return 0


def run_op_bench(args, torch, F) -> None:
    """One layer's decode-step attention for each method (the original benchmark)."""
    import triton.testing

    from mixsga_train.attention.segment_attention import segment_attention
    from mixsga_train.attention.triton_decode import mixed_decode_attention, segment_row_index

    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    elsize = torch.empty((), dtype=dtype).element_size()
    E = len(args.expert_kv_heads)
    device_name = "cpu (smoke, TRITON_INTERPRET=1)" if args.cpu_smoke else torch.cuda.get_device_name()
    use_graph = not args.cpu_smoke and not args.no_cudagraph

    def time_ms(fn) -> dict:
        if args.cpu_smoke:
            fn()
            ts = []
            for _ in range(3):
                t0 = time.perf_counter()
                fn()
                ts.append((time.perf_counter() - t0) * 1e3)
            return dict(ms=statistics.median(ts), ms_graph=None)
        res = dict(ms=triton.testing.do_bench(fn, warmup=args.warmup, rep=args.rep, return_mode="median"))
        res["ms_graph"] = None
        if use_graph:
            try:
                # replays a captured graph on a side stream; no L2 flush between replays
                res["ms_graph"] = triton.testing.do_bench_cudagraph(fn, rep=args.rep, return_mode="median")
            except Exception as exc:  # record, keep going
                res["graph_error"] = f"{type(exc).__name__}: {exc}"[:200]
        return res

    rows, checks = [], []
    print(f"device: {device_name}; dtype {args.dtype}; H_q={args.q_heads} H_kv={args.kv_heads} d={args.head_dim}; "
          f"experts {args.expert_kv_heads} ratio {args.ratio}; layers {args.layers}")
    for B in args.batches:
        for T in args.contexts:
            case = build_case(args, B, T, device, dtype, torch)
            q, ids, sk, sv, expand = case["q"], case["ids"], case["seg_k"], case["seg_v"], case["expand"]
            rows_idx = segment_row_index(ids, E)
            layer = segment_layer(case, args, torch)
            lk, lv, lrows = layer.kernel_segments()
            fns = {
                "mixsga_segments": lambda: segment_read(layer, q, segment_attention),
                "mixsga_kernel": lambda: mixed_decode_attention(q, sk, sv, ids, expand),
                "mixsga_kernel_core": lambda: mixed_decode_attention(q, sk, sv, ids, expand, row_index=rows_idx),
                "mixsga_torch": lambda: torch_expand_sdpa(q, sk, sv, expand, case["positions"], B, T, torch, F),
                "gqa_sdpa": lambda: sdpa(q, *case["gqa"], F),
                "mha_sdpa": lambda: sdpa(q, *case["mha"], F),
            }
            # correctness: kernel vs the torch path on the same cache
            out_k = fns["mixsga_kernel"]().float()
            out_t = fns["mixsga_torch"]().float()
            err = (out_k - out_t).abs().max().item()
            checks.append(dict(batch=B, context=T, max_abs_err_kernel_vs_torch=err))
            if err > (2e-2 if dtype != torch.float32 else 1e-4):
                print(f"WARNING: B={B} T={T}: kernel and torch path differ by {err:.3g}", file=sys.stderr)
            # the segment read vs the kernel on the layer's own buffers
            seg_err = (segment_read(layer, q, segment_attention).float() - mixed_decode_attention(
                q, lk, lv, layer.kernel_expert_ids(), layer.expand_table, row_index=lrows).float()).abs().max().item()
            checks[-1]["max_abs_err_kernel_vs_segments"] = seg_err
            if seg_err > (2e-2 if dtype != torch.float32 else 1e-4):
                print(f"WARNING: B={B} T={T}: kernel and segment read differ by {seg_err:.3g}", file=sys.stderr)
            del out_k, out_t
            for name in METHODS:
                t = time_ms(fns[name])
                by = bytes_for(name, case, B, T, args, elsize)
                row = dict(
                    method=name, batch=B, context=T, ms=t["ms"], ms_graph=t["ms_graph"],
                    tokens_per_s=1e3 / (args.layers * t["ms"]),
                    tokens_per_s_graph=(1e3 / (args.layers * t["ms_graph"])) if t["ms_graph"] else None,
                    kv_cache_bytes=by["kv_cache"], bytes_read=by["read"], bytes_written=by["written"],
                    read_gb_per_s=by["read"] / (t["ms"] * 1e-3) / 1e9,
                )
                if "graph_error" in t:
                    row["graph_error"] = t["graph_error"]
                rows.append(row)
                g = f" graph {t['ms_graph'] * 1e3:8.1f} us" if t["ms_graph"] else ""
                print(f"B={B:3d} T={T:5d} {name:20s} {t['ms'] * 1e3:9.1f} us{g}  read {fmt_bytes(by['read'])}")
            del case, fns, layer, lk, lv, lrows
            if device.type == "cuda":
                torch.cuda.empty_cache()

    # ratios (time of the kernel / time of the other method; < 1 means the kernel is faster)
    ratios = []
    key = {(r["method"], r["batch"], r["context"]): r for r in rows}
    for B in args.batches:
        for T in args.contexts:
            entry = dict(batch=B, context=T)
            for kern in ("mixsga_kernel", "mixsga_kernel_core"):
                for other in ("gqa_sdpa", "mixsga_torch", "mha_sdpa"):
                    for col in ("ms", "ms_graph"):
                        a, b = key[(kern, B, T)][col], key[(other, B, T)][col]
                        entry[f"{kern}/{other}" + ("" if col == "ms" else "_graph")] = (a / b) if a and b else None
            for col in ("ms", "ms_graph"):  # the torch segment read against GQA's SDPA (> 1: slower)
                a, b = key[("mixsga_segments", B, T)][col], key[("gqa_sdpa", B, T)][col]
                entry["mixsga_segments/gqa_sdpa" + ("" if col == "ms" else "_graph")] = (a / b) if a and b else None
            ratios.append(entry)
    print("\ntime ratios (kernel / other; < 1 = kernel faster), eager [cuda-graph]:")
    for ent in ratios:
        parts = []
        for other in ("gqa_sdpa", "mixsga_torch", "mha_sdpa"):
            r, rg = ent[f"mixsga_kernel/{other}"], ent[f"mixsga_kernel/{other}_graph"]
            rc = ent[f"mixsga_kernel_core/{other}"]
            parts.append(f"vs {other}: {r:.2f} (core {rc:.2f})" + (f" [{rg:.2f}]" if rg else ""))
        print(f"B={ent['batch']:3d} T={ent['context']:5d}  " + "; ".join(parts))

    meta = dict(
        device=device_name,
        cpu_smoke=args.cpu_smoke,
        torch=torch.__version__,
        triton=__import__("triton").__version__,
        dtype=args.dtype,
        q_heads=args.q_heads,
        kv_heads=args.kv_heads,
        head_dim=args.head_dim,
        layers=args.layers,
        expert_kv_heads=args.expert_kv_heads,
        ratio=args.ratio,
        budget=build_budget(args),
        gqa_kv_heads=max(1, round(build_budget(args) * args.kv_heads)),
        timing="cpu perf_counter median of 3 (smoke only)" if args.cpu_smoke
        else f"triton.testing.do_bench median (warmup {args.warmup} ms, rep {args.rep} ms)"
        + ("" if not use_graph else " + do_bench_cudagraph median"),
        note="one layer's decode-step attention only; tokens/s = 1/(layers * step time)",
    )
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = "decode_bench_cpu_smoke" if args.cpu_smoke else "decode_bench"
    (args.out_dir / f"{stem}.json").write_text(
        json.dumps(dict(meta=meta, rows=rows, ratios=ratios, checks=checks), indent=2) + "\n"
    )
    (args.out_dir / f"{stem}.md").write_text(markdown(meta, rows, ratios, checks))
    print(f"\nwrote {args.out_dir / (stem + '.md')} and .json")


def build_budget(args) -> float:
    from mixsga_train.attention.budget import mixsga_budget, parse_ratio

    return mixsga_budget(parse_ratio(args.ratio), args.expert_kv_heads, args.kv_heads)


def markdown(meta, rows, ratios, checks) -> str:
    out = [
        f"# mixSGA decode attention benchmark ({meta['device']})",
        "",
        f"torch {meta['torch']}, triton {meta['triton']}, {meta['dtype']}; H_q={meta['q_heads']}, "
        f"H_kv={meta['kv_heads']}, d={meta['head_dim']}, {meta['layers']} layers; experts "
        f"{meta['expert_kv_heads']} at {meta['ratio']} (budget {meta['budget']:.0%}, GQA baseline "
        f"{meta['gqa_kv_heads']} KV heads). Timing: {meta['timing']}. {meta['note']}.",
        "",
        "| batch | context | method | step (us) | step, CUDA graph (us) | tokens/s | tokens/s, graph | KV cache | bytes read | read GB/s |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        g = f"{r['ms_graph'] * 1e3:.1f}" if r["ms_graph"] else "-"
        tg = f"{r['tokens_per_s_graph']:.0f}" if r["tokens_per_s_graph"] else "-"
        out.append(
            f"| {r['batch']} | {r['context']} | {r['method']} | {r['ms'] * 1e3:.1f} | {g} | {r['tokens_per_s']:.0f} | "
            f"{tg} | {fmt_bytes(r['kv_cache_bytes'])} | {fmt_bytes(r['bytes_read'])} | {r['read_gb_per_s']:.1f} |"
        )
    out += [
        "",
        "## Time ratios (kernel / other; < 1 means the kernel is faster)",
        "",
        "| batch | context | kernel/GQA | kernel/torch path | kernel/unconverted | core/GQA | core/torch path | core/unconverted | graph: kernel/GQA | graph: kernel/torch | graph: kernel/unconverted |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def f(x):
        return f"{x:.2f}" if x else "-"

    for e in ratios:
        out.append(
            f"| {e['batch']} | {e['context']} | {f(e['mixsga_kernel/gqa_sdpa'])} | {f(e['mixsga_kernel/mixsga_torch'])} | "
            f"{f(e['mixsga_kernel/mha_sdpa'])} | {f(e['mixsga_kernel_core/gqa_sdpa'])} | "
            f"{f(e['mixsga_kernel_core/mixsga_torch'])} | {f(e['mixsga_kernel_core/mha_sdpa'])} | "
            f"{f(e['mixsga_kernel/gqa_sdpa_graph'])} | {f(e['mixsga_kernel/mixsga_torch_graph'])} | "
            f"{f(e['mixsga_kernel/mha_sdpa_graph'])} |"
        )
    out += ["", "Segment read (default torch path) / GQA SDPA step time: " + ", ".join(
        f"B{e['batch']}/T{e['context']}: {f(e['mixsga_segments/gqa_sdpa'])}" for e in ratios), ""]
    out += ["", "Max |kernel - segment read| per shape: " + ", ".join(
        f"B{c['batch']}/T{c['context']}: {c['max_abs_err_kernel_vs_segments']:.2g}" for c in checks), ""]
    out += ["", "Max |kernel - torch path| per shape: " + ", ".join(
        f"B{c['batch']}/T{c['context']}: {c['max_abs_err_kernel_vs_torch']:.2g}" for c in checks), ""]
    out += [
        "Methods: `mixsga_kernel` = `mixed_decode_attention` incl. the per-call row index; "
        "`mixsga_kernel_core` = row index precomputed; `mixsga_torch` = expand segments to H_kv heads "
        "(index_select + index_copy, positions precomputed) then SDPA; `gqa_sdpa` / `mha_sdpa` = SDPA on a "
        "dense GQA / native cache. Bytes are estimates (`bytes_for` in the script).",
        "",
    ]
    return "\n".join(out)

# ----------------------------------------------------------------------------------------------
# End to end: generate() on a Llama-3.2-1B-shaped model
# ----------------------------------------------------------------------------------------------


def e2e_model_config(args):
    """Llama-3.2-1B's shape (H_q=32, H_kv=8, d=64, 16 layers, hidden 2048, MLP 8192, vocab 128256,
    tied embeddings) from the benchmark's shape flags; random weights, nothing downloaded."""
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.q_heads * args.head_dim,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.e2e_layers,
        num_attention_heads=args.q_heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim,
        max_position_embeddings=max(args.e2e_contexts) + args.new_tokens + 16,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=0,
    )
    config._attn_implementation = "sdpa"
    return config


def e2e_attention_config(method: str, args):
    from mixsga_train.attention import AttentionConfig

    kind, _, kernel = method.partition("_")
    if kind == "gqa":
        return AttentionConfig(method="gqa", kv_heads=args.gqa_kv_heads, decode_kernel=kernel)
    return AttentionConfig(method="mixsga", expert_kv_heads=list(args.expert_kv_heads), ratio=args.ratio,
                           decode_kernel=kernel)


def build_e2e_model(method: str, args, device, dtype, torch):
    """The same random base weights (seeded) for every method; routers seeded too."""
    from transformers import AutoModelForCausalLM

    from mixsga_train.attention import convert_model

    torch.manual_seed(args.seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(e2e_model_config(args), dtype=dtype)
    if method != "unconverted":
        torch.manual_seed(args.seed + 1)
        convert_model(model, e2e_attention_config(method, args))
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.eval()


def e2e_generate(model, ids, new_tokens: int, torch) -> dict:
    """Greedy generate(); per-step timestamps from a logits processor (called once per step)."""
    from transformers import LogitsProcessor, LogitsProcessorList

    sync = torch.cuda.synchronize if ids.is_cuda else (lambda: None)

    class StepClock(LogitsProcessor):
        def __init__(self):
            self.times = []

        def __call__(self, input_ids, scores):
            sync()
            self.times.append(time.perf_counter())
            return scores

    clock = StepClock()
    sync()
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, logits_processor=LogitsProcessorList([clock]),
                             return_dict_in_generate=True, pad_token_id=0)
    sync()
    t = clock.times
    step = (t[-1] - t[1]) / (len(t) - 2)  # steps 2..N: step 1 may include JIT compilation
    cache = out.cache
    from mixsga_train.attention.cache import dynamic_cache_bytes_per_token

    per_token = cache.kv_bytes_per_token() if hasattr(cache, "kv_bytes_per_token") else dynamic_cache_bytes_per_token(cache)
    return dict(prefill_s=t[0] - start, step_ms=step * 1e3, tokens_per_s=ids.shape[0] / step,
                kv_bytes_per_token=per_token, new=out.sequences[:, ids.shape[1]:].cpu())


def run_e2e_bench(args, torch) -> None:
    import logging

    logging.basicConfig(level=logging.WARNING)  # show decode-kernel fallback warnings, if any
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    device_name = "cpu (smoke, TRITON_INTERPRET=1)" if args.cpu_smoke else torch.cuda.get_device_name()
    meta = dict(
        device=device_name, cpu_smoke=args.cpu_smoke, torch=torch.__version__, triton=__import__("triton").__version__,
        dtype=args.dtype, model=f"random Llama: hidden {args.q_heads * args.head_dim}, {args.e2e_layers} layers, "
        f"H_q={args.q_heads}, H_kv={args.kv_heads}, d={args.head_dim}, MLP {args.intermediate}, vocab {args.vocab}",
        mixsga=f"{args.ratio} over KV heads {args.expert_kv_heads}", gqa_kv_heads=args.gqa_kv_heads,
        new_tokens=args.new_tokens,
        timing="generate() wall clock; decode step = mean of steps 2..N between CUDA-synced logits-processor "
        "timestamps; tokens/s = batch / step",
    )
    print(f"\ne2e generate(): {device_name}; {meta['model']}; {args.dtype}; {args.new_tokens} new tokens")
    rows, tokens = [], {}
    stem = "decode_e2e_cpu_smoke" if args.cpu_smoke else "decode_e2e"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for method in args.e2e_methods:
        model = build_e2e_model(method, args, device, dtype, torch)
        impl = model.config._attn_implementation
        warm = torch.randint(1, args.vocab, (1, 16), device=device)
        e2e_generate(model, warm, 3, torch)  # cuBLAS / Triton warm-up
        for B in args.e2e_batches:
            for T in args.e2e_contexts:
                g = torch.Generator().manual_seed(args.seed + 1000 * B + T)
                ids = torch.randint(1, args.vocab, (B, T), generator=g).to(device)
                row = dict(method=method, attn_implementation=impl, batch=B, context=T)
                try:
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats()
                    res = e2e_generate(model, ids, args.new_tokens, torch)
                    tokens[(method, B, T)] = res.pop("new")
                    row.update(res)
                    if device.type == "cuda":
                        row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
                    ref = tokens.get((method.split("_")[0] + "_torch", B, T))
                    if method.endswith("_triton") and ref is not None:
                        row["tokens_equal_torch_path"] = (tokens[(method, B, T)] == ref).float().mean().item()
                    print(f"B={B:3d} T={T:5d} {method:14s} prefill {row['prefill_s']:7.3f} s  step "
                          f"{row['step_ms']:8.2f} ms  {row['tokens_per_s']:9.1f} tok/s  "
                          f"KV {row['kv_bytes_per_token']:.0f} B/token", flush=True)
                except torch.OutOfMemoryError as exc:
                    row["error"] = f"OOM: {str(exc)[:120]}"
                    print(f"B={B:3d} T={T:5d} {method:14s} OOM", flush=True)
                rows.append(row)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                write_e2e(args.out_dir, stem, meta, rows)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"\nwrote {args.out_dir / (stem + '.md')} and .json")


def e2e_ratios(rows) -> list[dict]:
    """tokens/s of mixsga_triton over each other method, per shape (> 1 = mixsga_triton faster)."""
    key = {(r["method"], r["batch"], r["context"]): r.get("tokens_per_s") for r in rows}
    shapes = sorted({(r["batch"], r["context"]) for r in rows})
    out = []
    for B, T in shapes:
        mine = key.get(("mixsga_triton", B, T))
        entry = dict(batch=B, context=T)
        for other in E2E_METHODS[:-1]:
            theirs = key.get((other, B, T))
            entry[other] = mine / theirs if mine and theirs else None
        out.append(entry)
    return out


def write_e2e(out_dir: Path, stem: str, meta: dict, rows: list[dict]) -> None:
    ratios = e2e_ratios(rows)
    (out_dir / f"{stem}.json").write_text(json.dumps(dict(meta=meta, rows=rows, ratios=ratios), indent=2) + "\n")

    def f(x, spec):
        return format(x, spec) if isinstance(x, (int, float)) else "-"

    lines = [
        f"# End-to-end generate() decode benchmark ({meta['device']})",
        "",
        f"torch {meta['torch']}, triton {meta['triton']}, {meta['dtype']}; {meta['model']}; mixSGA {meta['mixsga']}; "
        f"GQA {meta['gqa_kv_heads']} KV heads; {meta['new_tokens']} new tokens. Timing: {meta['timing']}.",
        "",
        "| batch | context | method | attention impl | prefill (s) | decode step (ms) | decode tokens/s | KV bytes/token | peak GiB | tokens = torch path |",
        "|---:|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['batch']} | {r['context']} | {r['method']} | {r['attn_implementation']} | {r['error']} |||||")
            continue
        lines.append(
            f"| {r['batch']} | {r['context']} | {r['method']} | {r['attn_implementation']} | {f(r['prefill_s'], '.3f')} | "
            f"{f(r['step_ms'], '.2f')} | {f(r['tokens_per_s'], '.1f')} | {f(r['kv_bytes_per_token'], '.0f')} | "
            f"{f(r.get('peak_mem_gib'), '.2f')} | {f(r.get('tokens_equal_torch_path'), '.2f')} |"
        )
    lines += [
        "",
        "## mixsga_triton decode tokens/s relative to each method (> 1 = mixsga_triton faster)",
        "",
        "| batch | context | " + " | ".join(f"vs {m}" for m in E2E_METHODS[:-1]) + " |",
        "|---:|---:|" + "---:|" * (len(E2E_METHODS) - 1),
    ]
    for e in ratios:
        lines.append(f"| {e['batch']} | {e['context']} | " + " | ".join(f(e[m], ".2f") for m in E2E_METHODS[:-1]) + " |")
    lines += [
        "",
        "`tokens = torch path`: fraction of generated tokens equal to the same model with "
        "`decode_kernel: torch` (bf16 rounding differs between the paths, so greedy decoding of a random model "
        "may drift; fp32 gives 1.00).",
        "",
    ]
    (out_dir / f"{stem}.md").write_text("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
