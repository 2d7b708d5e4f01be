"""`make bench`: speed and memory of mixSGA vs GQA vs CLA vs the unconverted model, measured in one
process with the methods interleaved (rounds A B C D A B C D ..., medians over rounds), so load
from other processes hits every method alike; the target table uses ratios of those medians.

Per model and method:
  * training step: forward + backward (plain torch, fp32, no optimizer), batch --train-batch x --train-len;
  * decode tokens/s: greedy ``generate()`` with the method's default cache after conversion (mixSGA:
    its KVBudgetCache planned for prompt + new tokens, prompt routed by top-k, new tokens by the
    default ``calibrated`` decode policy, thresholds fitted on random tokens), for every prompt length in
    --prompts (--smollm2-prompts for SmolLM2) and batch in --batches, exactly --new-tokens new
    tokens; tokens/s counts the decode steps only (time from the first to the last new token, taken
    by a stopping criterion), so the prefill does not dilute the comparison;
  * decode memory: the cache's bytes in use and bytes allocated (reserved: in use + growth slack)
    at the end of each generate, and the transient bytes one attention call allocates during a
    decode step (outputs of the ops between the K/V projections and the output projection, counted
    with a torch dispatch mode: RoPE, cache update, read); peak = reserved + largest transient;
  * KV bytes per token measured from the cache a --kv-len prefill leaves (top-k shares exact).

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python experiments/bench_speed.py [--models tiny smollm2]
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
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import StoppingCriteria, StoppingCriteriaList

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mixsga_train.attention import (  # noqa: E402
    AttentionConfig,
    KVBudgetCache,
    calibrate_decode_thresholds,
    convert_model,
)
from mixsga_train.attention.adapters import adapter_for  # noqa: E402
from mixsga_train.attention.cache import layer_nbytes  # noqa: E402
from mixsga_train.evaluation.kv import measure_kv_bytes_per_token, native_kv_bytes_per_token  # noqa: E402
from mixsga_train.evaluation.routing_scope import evaluating  # noqa: E402
from mixsga_train.models.config import ModelConfig  # noqa: E402
from mixsga_train.models.loading import load_model  # noqa: E402

MODELS = {
    "tiny": dict(
        model=ModelConfig(
            name="tiny-llama-mha8",
            source="tiny",
            tiny_layers=4,
            tiny_hidden=256,
            tiny_heads=8,
            tiny_kv_heads=8,
            tiny_intermediate=688,
            max_seq_len=4096,
        ),
        methods={
            "mha": AttentionConfig("mha"),
            "gqa 4kv (50%)": AttentionConfig("gqa", kv_heads=4),
            "cla (50%)": AttentionConfig("cla", budget=0.5),
            "mixsga [8,4,2] 3:1:6 (50%)": AttentionConfig("mixsga", expert_kv_heads=[8, 4, 2], ratio=[3, 1, 6]),
        },
        gqa="gqa 4kv (50%)",
        mixsga="mixsga [8,4,2] 3:1:6 (50%)",
        train_target=1.05,
    ),
    "smollm2": dict(
        model=ModelConfig(name="smollm2-135m", source="gguf_smollm2", max_seq_len=4096),
        methods={
            "mha": AttentionConfig("mha"),
            "gqa 2kv (67%)": AttentionConfig("gqa", kv_heads=2),
            "mixsga [3,1] 1:1 (67%)": AttentionConfig("mixsga", expert_kv_heads=[3, 1], ratio=[1, 1]),
            "cla (50%)": AttentionConfig("cla", budget=0.5),
        },
        gqa="gqa 2kv (67%)",
        mixsga="mixsga [3,1] 1:1 (67%)",
        train_target=1.02,
    ),
}


def build(spec: dict) -> dict:
    out = {}
    for name, att in spec["methods"].items():
        torch.manual_seed(0)
        model, _ = load_model(ModelConfig(**vars(spec["model"])))
        resolved = convert_model(model, att)
        # a trained model is calibrated at the end of training (decode_policy: calibrated); do the
        # same here on random tokens, so decode follows the ratio as it would after training
        calibrate_decode_thresholds(model, [{"input_ids": torch.randint(5, 200, (8, 256))}])
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


class Stamps(StoppingCriteria):
    """Records the time each new token is produced (generate() calls this after every step)."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores, **kwargs):
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def cache_bytes(cache) -> tuple[int, int]:
    """(in use, reserved) bytes of any cache."""
    if isinstance(cache, KVBudgetCache):
        return cache.nbytes(), cache.nbytes_reserved()
    used = sum(layer_nbytes(layer) for layer in cache.layers)
    return used, used  # transformers' DynamicLayer: torch.cat, exactly sized


@torch.no_grad()
def decode(model, prompt: torch.Tensor, new_tokens: int) -> dict:
    """Decode-only tokens/s (steps 2..new), prefill seconds, and the final cache's bytes."""
    pad = model.generation_config.pad_token_id
    stamps = Stamps()
    with evaluating(model, "auto"):
        start = time.perf_counter()
        out = model.generate(
            input_ids=prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=pad if pad is not None else 0,
            stopping_criteria=StoppingCriteriaList([stamps]),
            return_dict_in_generate=True,
        )
    generated = out.sequences.shape[1] - prompt.shape[1]
    assert generated == new_tokens == len(stamps.times), f"generated {generated} tokens, wanted {new_tokens}"
    used, reserved = cache_bytes(out.past_key_values)
    return {
        "tok_s": prompt.shape[0] * (new_tokens - 1) / (stamps.times[-1] - stamps.times[0]),
        "prefill_s": stamps.times[0] - start,
        "cache_bytes": used,
        "cache_reserved_bytes": reserved,
    }


class TransientBytes(TorchDispatchMode):
    """Bytes of new tensors (outputs not sharing an input's storage) allocated while ``active``."""

    def __init__(self):
        super().__init__()
        self.active, self.total = False, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.active:
            inputs = {t.untyped_storage().data_ptr() for t in _tensors((args, kwargs)) if t.numel()}
            for t in _tensors(out):
                storage = t.untyped_storage()
                if t.numel() and storage.data_ptr() not in inputs:
                    self.total += storage.nbytes()
                    inputs.add(storage.data_ptr())
        return out


def _tensors(tree):
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, (list, tuple)):
        for x in tree:
            yield from _tensors(x)
    elif isinstance(tree, dict):
        for x in tree.values():
            yield from _tensors(x)


@torch.no_grad()
def transient_read_bytes(model, prompt: torch.Tensor, steps: int = 3) -> int:
    """Largest transient allocation of one attention call in a decode step (projections excluded)."""
    counter, calls, forwards = TransientBytes(), [], [0]
    hooks = [model.register_forward_pre_hook(lambda m, a: forwards.__setitem__(0, forwards[0] + 1))]

    def enter(module, args):
        counter.total, counter.active = 0, forwards[0] > 1  # decode steps only (forward 1 is the prefill)

    def leave(module, args, output):
        if counter.active:
            calls.append(counter.total)
        counter.active = False

    for attn in adapter_for(model.config).attention_modules(model):
        hooks += [attn.register_forward_pre_hook(enter), attn.register_forward_hook(leave)]
        for child in attn.modules():
            if isinstance(child, nn.Linear) or type(child).__name__ == "SharedKVBorrower":
                was = {}
                hooks.append(
                    child.register_forward_pre_hook(
                        lambda m, a, was=was: was.__setitem__(0, counter.active) or setattr(counter, "active", False)
                    )
                )
                hooks.append(child.register_forward_hook(lambda m, a, o, was=was: setattr(counter, "active", was[0])))
    try:
        with counter:
            decode(model, prompt, steps)
    finally:
        for h in hooks:
            h.remove()
    return max(calls)


def bench_model(key: str, args) -> dict:
    spec = MODELS[key]
    prompts_lens = args.smollm2_prompts if key == "smollm2" else args.prompts
    rounds = args.rounds_smollm2 if key == "smollm2" else args.rounds
    print(f"== {key}: loading {len(spec['methods'])} converted copies", flush=True)
    models = build(spec)
    vocab = next(iter(models.values()))[0].config.vocab_size
    g = torch.Generator().manual_seed(0)
    train_ids = torch.randint(0, vocab, (args.train_batch, args.train_len), generator=g)
    cases = [(p, b) for p in prompts_lens for b in args.batches]
    prompts = {(p, b): torch.randint(0, vocab, (b, p), generator=g) for p, b in cases}
    kv_ids = torch.randint(0, vocab, (1, args.kv_len), generator=g)
    raw = {name: {"train_s": [], **{f"p{p}_b{b}": [] for p, b in cases}} for name in models}
    memory = {name: {} for name in models}
    for name, (model, _) in models.items():  # warm-up (not counted) and the memory measurements
        train_step_s(model, train_ids)
        for p, b in cases:
            memory[name][f"p{p}_b{b}"] = {"transient_bytes": transient_read_bytes(model, prompts[(p, b)])}
    for r in range(1, rounds + 1):
        for name, (model, _) in models.items():
            t = train_step_s(model, train_ids)
            raw[name]["train_s"].append(t)
            line = [f"train {t:.3f} s"]
            for p, b in cases:
                d = decode(model, prompts[(p, b)], args.new_tokens)
                raw[name][f"p{p}_b{b}"].append(d["tok_s"])
                memory[name][f"p{p}_b{b}"].update(
                    cache_bytes=d["cache_bytes"], cache_reserved_bytes=d["cache_reserved_bytes"]
                )
                line.append(f"p{p} b{b} {d['tok_s']:.1f} tok/s")
            print(f"  round {r} {name}: " + ", ".join(line), flush=True)
    rows = {}
    for name, (model, resolved) in models.items():
        native = native_kv_bytes_per_token(model.config, torch.float32)
        row = {
            "kv_budget": resolved.kv_budget,
            "train_s_median": statistics.median(raw[name]["train_s"]),
            "kv_bytes_per_token_native": native,
            "kv_bytes_budget": resolved.kv_budget * native,
            f"kv_bytes_measured_len{args.kv_len}": measure_kv_bytes_per_token(model, kv_ids),
            "raw": raw[name],
        }
        for p, b in cases:
            mem = memory[name][f"p{p}_b{b}"]
            mem["peak_bytes"] = mem["cache_reserved_bytes"] + mem["transient_bytes"]
            row[f"p{p}_b{b}"] = {"tok_s_median": statistics.median(raw[name][f"p{p}_b{b}"]), **mem}
        rows[name] = row
    return {
        "model": spec["model"].name,
        "layers": next(iter(models.values()))[0].config.num_hidden_layers,
        "cases": cases,
        "methods": rows,
        "checks": checks(spec, rows, cases, key),
    }


def checks(spec, rows, cases, key) -> list[dict]:
    """The issue's targets for this model: (measure, value, target, met)."""
    gqa, mix, mha = rows[spec["gqa"]], rows[spec["mixsga"]], rows["mha"]
    out = []

    def add(measure, value, target, at_least):
        out.append(
            {
                "measure": measure,
                "value": value,
                "target": f"{'>=' if at_least else '<='} {target:.2f}",
                "met": value >= target if at_least else value <= target,
            }
        )

    for p, b in cases:
        c = f"p{p}_b{b}"
        add(
            f"{key}: decode tok/s {spec['mixsga']} / {spec['gqa']}, prompt {p}, batch {b}",
            mix[c]["tok_s_median"] / gqa[c]["tok_s_median"],
            1.0,
            True,
        )
    for p, b in cases:
        c = f"p{p}_b{b}"
        add(
            f"{key}: decode tok/s {spec['gqa']} / unconverted, prompt {p}, batch {b}",
            gqa[c]["tok_s_median"] / mha[c]["tok_s_median"],
            1.0,
            True,
        )
    add(
        f"{key}: training step {spec['mixsga']} / {spec['gqa']}",
        mix["train_s_median"] / gqa["train_s_median"],
        spec["train_target"],
        False,
    )
    for p, b in cases:
        c = f"p{p}_b{b}"
        add(
            f"{key}: peak decode memory {spec['mixsga']} / {spec['gqa']}, prompt {p}, batch {b}",
            mix[c]["peak_bytes"] / gqa[c]["peak_bytes"],
            1.02,
            False,
        )
    return out


def markdown(result: dict, args, command: str) -> str:
    lines = [
        "# bench: decode speed and memory, training step, KV bytes\n",
        f"Command: `{command}`\n",
        f"Machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s), fp32, shared with other jobs (interleaved rounds: each method sees "
        f"the same load). {args.rounds} rounds ({args.rounds_smollm2} for SmolLM2) after a warm-up; medians. "
        f"Training step: forward+backward, batch {args.train_batch}x{args.train_len}. Decode: greedy generate(), "
        f"{args.new_tokens} new tokens, tokens/s over the decode steps (prefill excluded). Memory: cache bytes "
        f"allocated at the end of generate (in use + growth slack) + the largest transient allocation of one "
        f"attention call in a decode step.\n",
    ]
    for res in result["models"].values():
        lines += [
            f"## {res['model']} ({res['layers']} layers)\n",
            "| method | KV budget | train step s | case | decode tok/s | cache MiB in use | cache MiB reserved "
            "| transient KiB / attention call | peak MiB |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name, row in res["methods"].items():
            for i, (p, b) in enumerate(res["cases"]):
                c = row[f"p{p}_b{b}"]
                head = (
                    f"| {name} | {100 * row['kv_budget']:.1f}% | {row['train_s_median']:.3f} " if i == 0 else "| | | "
                )
                lines.append(
                    head + f"| p{p} b{b} | {c['tok_s_median']:.1f} | {c['cache_bytes'] / 2**20:.2f} "
                    f"| {c['cache_reserved_bytes'] / 2**20:.2f} | {c['transient_bytes'] / 2**10:.1f} "
                    f"| {c['peak_bytes'] / 2**20:.2f} |"
                )
        lines += [
            "",
            f"KV bytes/token measured at {args.kv_len} tokens: "
            + ", ".join(
                f"{name} {row[f'kv_bytes_measured_len{args.kv_len}']:.0f} "
                f"(budget x native {row['kv_bytes_budget']:.0f})"
                for name, row in res["methods"].items()
            ),
            "",
        ]
    lines += ["## Targets (issue 11)\n", "| measure | value | target | met |", "|---|---|---|---|"]
    for res in result["models"].values():
        lines += [
            f"| {c['measure']} | {c['value']:.3f} | {c['target']} | {'yes' if c['met'] else '**no**'} |"
            for c in res["checks"]
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["tiny", "smollm2"], choices=list(MODELS))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--rounds-smollm2", type=int, default=2, help="rounds for SmolLM2 (its decode rounds are long)")
    p.add_argument("--train-batch", type=int, default=2)
    p.add_argument("--train-len", type=int, default=256)
    p.add_argument("--prompts", type=int, nargs="+", default=[128, 512, 2048])
    p.add_argument("--smollm2-prompts", type=int, nargs="+", default=[128])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--kv-len", type=int, default=160)
    p.add_argument("--out", default="experiments/results/bench_speed")
    args = p.parse_args()
    command = "OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python experiments/bench_speed.py " + " ".join(sys.argv[1:])
    torch.set_grad_enabled(True)
    result = {
        "command": command,
        "args": vars(args),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "models": {},
    }
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    for key in args.models:
        result["models"][key] = bench_model(key, args)
        (out / "bench_speed.json").write_text(json.dumps(result, indent=1))
        (out / "README.md").write_text(markdown(result, args, command))
    print((out / "README.md").read_text())


if __name__ == "__main__":
    main()
