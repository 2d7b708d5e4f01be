"""`make bench-sft`: instruction SFT with ROUGE-L, mixSGA vs GQA vs CLA vs the native model.

SmolLM2-135M-Instruct (offline GGUF; 30 layers, 9 query / 3 KV heads) is converted by every
method and fine-tuned on a local Dolly-15k file (MiniLLM/Alpaca template, loss on response tokens
only), split train / valid / test by the run's seed, so every method of one seed sees the same
split and the same data order. Each run reports ROUGE-L on the held-out Dolly test split and on the
Self-Instruct seed tasks (greedy decoding through ``generate()`` with the method's own cache),
response-token perplexity on the test split under causal and top-k routing, and the realised
decode KV share of its generations. Runs are sequential subprocesses of
``python -m mixsga_train.train``; a run directory that already holds metrics.json is skipped, so
the script resumes after a crash, and ``--shard i/n`` splits the plan for n parallel processes.

Budget pairs (H_kv = 3, experts [3, 1] heads): 67% = GQA-2 / CLA-67% / mixSGA 1:1; 50% = CLA-50%
/ mixSGA 1:3 (GQA cannot keep 1.5 heads). ``--layer-allocation`` adds the per-layer-ratio runs of
a ``layer_allocation.json``.

    OMP_NUM_THREADS=1 .venv/bin/python experiments/bench_sft.py [--steps 40] [--seeds 0 1] \
        [--shard 0/2] [--dry-run]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from bench_quality import MIX, layer_allocation_methods
from runlib import run_training

ROOT = Path(__file__).resolve().parents[1]

METHODS = [  # (run name, overrides): budget-matched groups first
    ("mha", ["attention=mha"]),
    ("gqa_2kv_67", ["attention=gqa", "attention.budget=null", "attention.kv_heads=2"]),
    ("mixsga_67_1-1", MIX + ["attention.ratio=[1,1]"]),
    ("cla_67", ["attention=cla", "attention.budget=0.6666666667"]),
    ("cla_50", ["attention=cla", "attention.budget=0.5"]),
    ("mixsga_50_1-3", MIX + ["attention.ratio=[1,3]"]),
]


def common(args, seed: int) -> list[str]:
    return [
        "model=smollm2_135m",
        "task=dolly",
        f"task.jsonl={args.dolly}",
        f"task.split_sizes=[{args.split[0]},{args.split[1]},{args.split[2]}]",
        f"task.split_seed={seed}",
        f"task.eval_sets=[dolly_test,{args.selfinst}]",
        f"task.eval_max_examples={args.eval_examples}",
        f"task.max_len={args.max_len}",
        f"task.max_prompt_len={args.max_prompt_len}",
        f"task.max_new_tokens={args.max_new_tokens}",
        "trainer=sft",
        f"trainer.precision={args.precision}",
        "trainer.zero_stage=0",
        "trainer.epochs=null",
        f"trainer.max_steps={args.steps}",
        f"trainer.micro_batch_size={args.batch}",
        "trainer.grad_accum=1",
        f"trainer.lr={args.lr}",
        "trainer.warmup_ratio=0.1",
        f"trainer.eval_batch_size={args.eval_batch}",
        f"trainer.eval_before={str(args.eval_before).lower()}",
        "trainer.log_every=5",
        "logger=none",
        "experiment_name=bench_sft",
        f"seed={seed}",
    ]


def plan(args) -> list[tuple[str, list[str]]]:
    methods = list(METHODS)
    if args.layer_allocation:
        methods += [(name, over) for name, over, _ in layer_allocation_methods(ROOT / args.layer_allocation)]
    runs = [(f"{name}_s{seed}", common(args, seed) + over) for seed in args.seeds for name, over in methods]
    if args.only:
        runs = [r for r in runs if any(o in r[0] for o in args.only)]
    index, count = (int(x) for x in args.shard.split("/"))
    return runs[index::count]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/bench_sft")
    p.add_argument("--results", default="experiments/results/bench_sft")
    p.add_argument("--dolly", default="../shared/data/dolly/dolly_head.jsonl")
    p.add_argument("--selfinst", default="../shared/data/selfinst_seed/seed_tasks.jsonl")
    p.add_argument("--split", type=int, nargs=3, default=[897, 100, 100], help="train / valid / test records")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--max-len", type=int, default=320)
    p.add_argument("--max-prompt-len", type=int, default=192)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--eval-examples", type=int, default=100, help="ROUGE-L examples per eval set (at most)")
    p.add_argument("--eval-batch", type=int, default=16)
    p.add_argument("--eval-before", action="store_true", help="also evaluate before training (doubles eval time)")
    p.add_argument("--precision", default="fp32", help="fp32: bf16 is emulated on CPUs without AVX-512 BF16/AMX")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--layer-allocation", type=Path, default=None, help="add the per-layer-ratio runs of this file")
    p.add_argument("--only", nargs="*", help="run only runs whose name contains one of these")
    p.add_argument("--shard", default="0/1", help="i/n: run every n-th run starting at i (parallel processes)")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--no-report", action="store_true")
    args = p.parse_args()
    out = ROOT / args.out
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false")
    commands = []
    for name, over in plan(args):
        run_dir = out / name
        cmd = [sys.executable, "-m", "mixsga_train.train", *over, f"hydra.run.dir={run_dir.relative_to(ROOT)}"]
        commands.append(" ".join(["python", *cmd[1:]]))
        if args.dry_run:
            print(commands[-1])
            continue
        run_training(name, cmd, run_dir, env)
    if args.dry_run or args.no_report:
        return
    results = ROOT / args.results
    results.mkdir(parents=True, exist_ok=True)
    (results / f"commands_{args.shard.replace('/', 'of')}.txt").write_text("\n".join(commands) + "\n")
    subprocess.check_call(
        [sys.executable, "experiments/report.py", str(out), "--out", str(results), "--title", "bench-sft"],
        cwd=ROOT,
        env=env,
    )


if __name__ == "__main__":
    main()
