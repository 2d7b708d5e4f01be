"""`make bench-quality`: mixSGA vs GQA vs CLA vs the unconverted model on a real pretrained model.

SmolLM2-135M (offline GGUF; 30 layers, 9 query / 3 KV heads) is converted by every method and
continued-pretrained on Wikitext-2 valid, evaluated on Wikitext-2 test (perplexity under top-k and
causal routing, before and after training; word perplexity; measured KV bytes per token; train
tokens/s). Every method gets the same seed, data order (the loop's order depends only on the
seed) and token budget. Runs are sequential subprocesses of ``python -m mixsga_train.train``;
a run directory that already holds metrics.json is skipped, so the script resumes after a crash.
DeepSpeed checkpoints are deleted after each run (1.6 GB each; metrics.json and the model stay).

Experts for H_kv = 3: [3, 1] (the divisors of 3). Each budget is reached by exactly one ratio:
83% = 3:1, 67% = 1:1, 50% = 1:3, and every expert is an even mean-pool (no uneven [2 of 3]
partition). 33% needs every token in the 1-head expert (0:1), i.e. mixSGA degenerates to GQA-1
with an unused router: it is only run with --with-degenerate and otherwise reported as the GQA-1
point (the forward pass is identical; the cache adds a 1-byte id per layer).

    OMP_NUM_THREADS=1 .venv/bin/python experiments/bench_quality.py [--steps 16] [--seeds 0 1] \
        [--with-degenerate] [--dry-run]

On a shared 2-core machine use OMP_NUM_THREADS=1 (two threads per process thrashed: 70 s vs 13 s per step).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from runlib import run_training

ROOT = Path(__file__).resolve().parents[1]

MIX = ["attention=mixsga", "attention.expert_kv_heads=[3,1]"]
# (name, overrides, also run with the extra seeds?)
METHODS = [  # priority order: budget-matched pairs first (50%: CLA vs mixSGA; 67%: GQA vs mixSGA)
    ("cla_50", ["attention=cla", "attention.budget=0.5"], True),
    ("mixsga_50_1-3", MIX + ["attention.ratio=[1,3]"], True),
    ("gqa_2kv_67", ["attention=gqa", "attention.budget=null", "attention.kv_heads=2"], False),
    ("mixsga_67_1-1", MIX + ["attention.ratio=[1,1]"], False),
    ("gqa_1kv_33", ["attention=gqa", "attention.budget=null", "attention.kv_heads=1"], False),
    ("mixsga_83_3-1", MIX + ["attention.ratio=[3,1]"], False),
    ("cla_33", ["attention=cla", "attention.budget=0.3333333333"], False),
    ("mha", ["attention=mha"], False),
]
DEGENERATE = ("mixsga_33_0-1", MIX + ["attention.ratio=[0,1]"], False)


def common(args) -> list[str]:
    return [
        "model=smollm2_135m",
        "task=wikitext2",
        f"task.local_dir={args.data}",
        f"task.seq_len={args.seq_len}",
        f"task.max_eval_tokens={args.eval_tokens}",
        f"trainer.precision={args.precision}",
        "trainer.zero_stage=0",
        "logger=none",
        "experiment_name=bench_quality",
        f"trainer.max_steps={args.steps}",
        f"trainer.micro_batch_size={args.batch}",
        f"trainer.lr={args.lr}",
        "trainer.warmup_ratio=0.1",
        "trainer.eval_batch_size=16",
        "trainer.log_every=5",
    ]


def layer_allocation_methods(path: Path) -> list[tuple[str, list[str], bool]]:
    """One ``mixsga_<budget>_layers`` run per allocation in a ``layer_allocation.json``
    (``experiments/layer_allocation.py``): per-layer ratios over the same experts."""
    out = []
    for allocation in json.loads(path.read_text())["allocations"]:
        name = f"mixsga_{round(100 * allocation['budget'])}_layers"
        out.append((name, MIX + [allocation["override"]], True))
    return out


def plan(args) -> list[tuple[str, list[str]]]:
    methods = METHODS + ([DEGENERATE] if args.with_degenerate else [])
    if args.layer_allocation:
        methods += layer_allocation_methods(ROOT / args.layer_allocation)
    # first seed of every method in METHODS order, then the extra seeds of the 50% points
    runs = [(f"{name}_s{args.seeds[0]}", over + [f"seed={args.seeds[0]}"]) for name, over, _ in methods]
    extra_seeds = [
        (f"{name}_s{seed}", over + [f"seed={seed}"])
        for seed in args.seeds[1:]
        for name, over, extra in methods
        if extra
    ]
    runs[4:4] = extra_seeds  # right after the two budget-matched pairs, so the 50% seed check runs early
    if args.only:
        runs = [r for r in runs if any(o in r[0] for o in args.only)]
    return runs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/bench_quality")
    p.add_argument("--results", default="experiments/results/bench_quality")
    p.add_argument("--data", default="../shared/data/wikitext-2")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--eval-tokens", type=int, default=2048)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument(
        "--precision", default="fp32", help="fp32: this CPU has no AVX-512 BF16/AMX, bf16 is emulated (~20x slower)"
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument(
        "--with-degenerate", action="store_true", help="also run mixSGA 0:1 (33%%, = GQA-1 + an unused router)"
    )
    p.add_argument(
        "--layer-allocation",
        type=Path,
        default=None,
        help="a layer_allocation.json (experiments/layer_allocation.py): add its per-layer-ratio runs",
    )
    p.add_argument("--only", nargs="*", help="run only runs whose name contains one of these")
    p.add_argument(
        "--mix", nargs="*", default=[], help="extra overrides for every mixSGA run, e.g. attention.router_grad=..."
    )
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--no-report", action="store_true")
    args = p.parse_args()
    out = ROOT / args.out
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false")
    commands = []
    for name, over in plan(args):
        run_dir = out / name
        mix = args.mix if "attention=mixsga" in over else []
        cmd = [sys.executable, "-m", "mixsga_train.train", *common(args), *over, *mix, f"hydra.run.dir={run_dir}"]
        commands.append(" ".join(cmd))
        if args.dry_run:
            print(" ".join(cmd))
            continue
        run_training(name, cmd, run_dir, env)
    if args.dry_run or args.no_report:
        return
    results = ROOT / args.results
    results.mkdir(parents=True, exist_ok=True)
    (results / "commands.txt").write_text("\n".join(commands) + "\n")
    subprocess.check_call(
        [
            sys.executable,
            "experiments/report.py",
            str(out),
            "--out",
            str(results),
            "--title",
            "bench-quality: SmolLM2-135M on Wikitext-2",
        ],
        cwd=ROOT,
        env=env,
    )


if __name__ == "__main__":
    main()
