"""`make bench`: speed of mixSGA vs GQA vs CLA vs the unconverted model, measured in one process
with the methods interleaved (rounds A B C D A B C D ..., medians over rounds), so load from other
processes hits every method alike.

Per model and method:
  * training step: forward + backward (plain torch, fp32, no optimizer), batch --train-batch x --train-len;
  * decode tokens/s: greedy ``generate()`` with the method's own default cache after conversion
    (mixSGA: its KVBudgetCache, prompt routed by top-k, new tokens by argmax), prompt --prompt-len,
    exactly --new-tokens new tokens, at batch 1 and batch 8;
  * KV bytes per token measured from the cache a prefill leaves (``measure_kv_bytes_per_token``), at
    the decode prompt length and at --kv-len (a multiple of 20: top-k shares are then exact).
Targets checked: mixSGA training step within 2% of GQA's; mixSGA decode at least as fast as GQA at
the same budget; measured KV bytes within one id byte per layer of budget x native.

    .venv/bin/python experiments/bench_speed.py [--models tiny smollm2] [--rounds 3] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mixsga_train.attention import AttentionConfig, convert_model  # noqa: E402
from mixsga_train.evaluation.kv import measure_kv_bytes_per_token, native_kv_bytes_per_token  # noqa: E402
from mixsga_train.evaluation.routing_scope import evaluating  # noqa: E402
from mixsga_train.models.registry import ModelConfig, load_model  # noqa: E402

MODELS = {
    "tiny": dict(
        model=ModelConfig(name="tiny-llama-mha8", source="tiny", tiny_layers=4, tiny_hidden=256, tiny_heads=8,
                          tiny_kv_heads=8, tiny_intermediate=688, max_seq_len=512),
        methods={
            "mha": AttentionConfig("mha"),
            "gqa 4kv (50%)": AttentionConfig("gqa", kv_heads=4),
            "cla (50%)": AttentionConfig("cla", budget=0.5),
            "mixsga [8,4,2] 3:1:6 (50%)": AttentionConfig("mixsga", expert_kv_heads=[8, 4, 2], ratio=[3, 1, 6]),
        },
        pairs=[("gqa 4kv (50%)", "mixsga [8,4,2] 3:1:6 (50%)")],
    ),
    "smollm2": dict(
        model=ModelConfig(name="smollm2-135m", source="gguf_smollm2", max_seq_len=2048),
        methods={
            "mha": AttentionConfig("mha"),
            "gqa 2kv (67%)": AttentionConfig("gqa", kv_heads=2),
            "mixsga [3,1] 1:1 (67%)": AttentionConfig("mixsga", expert_kv_heads=[3, 1], ratio=[1, 1]),
            "cla (50%)": AttentionConfig("cla", budget=0.5),
        },
        pairs=[("gqa 2kv (67%)", "mixsga [3,1] 1:1 (67%)")],
    ),
}


def build(spec: dict) -> dict:
    out = {}
    for name, att in spec["methods"].items():
        torch.manual_seed(0)
        model, _ = load_model(ModelConfig(**vars(spec["model"])))
        resolved = convert_model(model, att)
        out[name] = (model, resolved)
    return out


def train_step_s(model, ids: torch.Tensor) -> float:
    model.train()
    t = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    elapsed = time.perf_counter() - t
    model.zero_grad(set_to_none=True)
    model.eval()
    return elapsed


@torch.no_grad()
def decode_tok_s(model, prompt: torch.Tensor, new_tokens: int) -> float:
    pad = model.generation_config.pad_token_id
    pad = pad if pad is not None else 0
    with evaluating(model, "auto"):
        t = time.perf_counter()
        out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)
        elapsed = time.perf_counter() - t
    generated = out.shape[1] - prompt.shape[1]
    assert generated == new_tokens, f"generated {generated} tokens, wanted {new_tokens}"
    return prompt.shape[0] * new_tokens / elapsed


def bench_model(key: str, args) -> dict:
    spec = MODELS[key]
    print(f"== {key}: loading {len(spec['methods'])} converted copies", flush=True)
    models = build(spec)
    vocab = next(iter(models.values()))[0].config.vocab_size
    g = torch.Generator().manual_seed(0)
    train_ids = torch.randint(0, vocab, (args.train_batch, args.train_len), generator=g)
    prompts = {b: torch.randint(0, vocab, (b, args.prompt_len), generator=g) for b in args.decode_batches}
    kv_ids = torch.randint(0, vocab, (1, args.kv_len), generator=g)
    times = {name: {"train_s": [], **{f"decode_b{b}": [] for b in args.decode_batches}} for name in models}
    rounds = args.rounds_smollm2 if key == "smollm2" and args.rounds_smollm2 else args.rounds
    for name, (model, _) in models.items():  # warm-up, not counted: one step, one short decode per batch size
        train_step_s(model, train_ids)
        for b in args.decode_batches:
            decode_tok_s(model, prompts[b], 4)
    for r in range(1, rounds + 1):
        for name, (model, _) in models.items():
            t = train_step_s(model, train_ids)
            d = {b: decode_tok_s(model, prompts[b], args.new_tokens) for b in args.decode_batches}
            times[name]["train_s"].append(t)
            for b in args.decode_batches:
                times[name][f"decode_b{b}"].append(d[b])
            print(f"  round {r} {name}: train {t:.3f} s, "
                  + ", ".join(f"decode b{b} {d[b]:.1f} tok/s" for b in args.decode_batches), flush=True)
    rows = {}
    ref = "mha"
    for name, (model, resolved) in models.items():
        native = native_kv_bytes_per_token(model.config, torch.float32)
        layers = model.config.num_hidden_layers
        kv_prompt = measure_kv_bytes_per_token(model, prompts[1])
        kv_exact = measure_kv_bytes_per_token(model, kv_ids)
        budget_bytes = resolved.kv_budget * native
        row = {
            "kv_budget": resolved.kv_budget,
            "train_s_median": statistics.median(times[name]["train_s"]),
            "kv_bytes_per_token_native": native,
            "kv_bytes_budget": budget_bytes,
            f"kv_bytes_measured_len{args.prompt_len}": kv_prompt,
            f"kv_bytes_measured_len{args.kv_len}": kv_exact,
            "kv_excess_bytes_per_layer": (kv_exact - budget_bytes) / layers,
            "kv_within_one_id_byte_per_layer": -1e-6 <= kv_exact - budget_bytes <= layers + 1e-6,
            "raw": times[name],
        }
        for b in args.decode_batches:
            row[f"decode_b{b}_tok_s_median"] = statistics.median(times[name][f"decode_b{b}"])
        rows[name] = row
    for name, row in rows.items():
        row["train_step_vs_mha"] = row["train_s_median"] / rows[ref]["train_s_median"]
        for b in args.decode_batches:
            row[f"decode_b{b}_vs_mha"] = row[f"decode_b{b}_tok_s_median"] / rows[ref][f"decode_b{b}_tok_s_median"]
    checks = []
    for gqa, mix in spec["pairs"]:
        train_ratio = rows[mix]["train_s_median"] / rows[gqa]["train_s_median"]
        checks.append({"check": f"train step {mix} / {gqa} <= 1.02", "value": train_ratio, "met": train_ratio <= 1.02})
        for b in args.decode_batches:
            ratio = rows[mix][f"decode_b{b}_tok_s_median"] / rows[gqa][f"decode_b{b}_tok_s_median"]
            checks.append({"check": f"decode b{b} tok/s {mix} / {gqa} >= 1.00", "value": ratio, "met": ratio >= 1.0})
    for name, row in rows.items():
        checks.append({"check": f"KV bytes {name}: measured - budget x native in [0, 1 byte x layers] (len {args.kv_len})",
                       "value": row["kv_excess_bytes_per_layer"], "met": row["kv_within_one_id_byte_per_layer"]})
    return {"model": spec["model"].name, "layers": next(iter(models.values()))[0].config.num_hidden_layers,
            "methods": rows, "checks": checks}


def markdown(result: dict, args, command: str) -> str:
    lines = ["# bench: training-step and decode speed, measured KV bytes\n",
             f"Command: `{command}`\n",
             f"Machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
             f"fp32, shared with other jobs (interleaved rounds: each method sees the same load). {args.rounds} rounds "
             f"({args.rounds_smollm2} for SmolLM2) after a warm-up; medians. Training step: forward+backward, batch {args.train_batch}x{args.train_len}. Decode: greedy "
             f"generate(), prompt {args.prompt_len}, {args.new_tokens} new tokens, each method's default cache. KV bytes: one "
             f"prefill of {args.kv_len} tokens (and of the {args.prompt_len}-token decode prompt).\n"]
    for key, res in result["models"].items():
        dec = " | ".join(f"decode b{b} tok/s (x mha)" for b in args.decode_batches)
        lines += [f"## {res['model']} ({res['layers']} layers)\n",
                  f"| method | KV budget | train step s (x mha) | {dec} | KV bytes/token measured (len {args.kv_len}) "
                  f"| budget x native | excess bytes/layer |",
                  "|---|---|---|" + "---|" * len(args.decode_batches) + "---|---|---|"]
        for name, row in res["methods"].items():
            decs = " | ".join(f"{row[f'decode_b{b}_tok_s_median']:.1f} ({row[f'decode_b{b}_vs_mha']:.3f})" for b in args.decode_batches)
            lines.append(f"| {name} | {100 * row['kv_budget']:.1f}% | {row['train_s_median']:.3f} ({row['train_step_vs_mha']:.3f}) "
                         f"| {decs} | {row[f'kv_bytes_measured_len{args.kv_len}']:.1f} | {row['kv_bytes_budget']:.1f} "
                         f"| {row['kv_excess_bytes_per_layer']:+.2f} |")
        lines += ["", "| target | value | met |", "|---|---|---|"]
        lines += [f"| {c['check']} | {c['value']:.3f} | {'yes' if c['met'] else '**no**'} |" for c in res["checks"]]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["tiny", "smollm2"], choices=list(MODELS))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--rounds-smollm2", type=int, default=3, help="rounds for SmolLM2 (its decode rounds are long)")
    p.add_argument("--train-batch", type=int, default=2)
    p.add_argument("--train-len", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--decode-batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--kv-len", type=int, default=160)
    p.add_argument("--out", default="experiments/results/bench_speed")
    args = p.parse_args()
    command = "HF_HUB_OFFLINE=1 .venv/bin/python experiments/bench_speed.py " + " ".join(sys.argv[1:])
    torch.set_grad_enabled(True)
    result = {"command": command, "args": vars(args), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "models": {}}
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    for key in args.models:
        result["models"][key] = bench_model(key, args)
        (out / "bench_speed.json").write_text(json.dumps(result, indent=1))
        (out / "README.md").write_text(markdown(result, args, command))
    print((out / "README.md").read_text())


if __name__ == "__main__":
    main()
