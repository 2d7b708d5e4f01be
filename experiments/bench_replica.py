"""`make bench-replica`: the paper's exact three-expert setting, small enough for a CPU.

1. Pretrain a small MHA Llama from scratch (mixsga_train/conf/model/tiny_llama_mha8.yaml: 4 layers x 256,
   8 query / 8 KV heads, byte-level tokenizer) on the offline Shakespeare corpus with attention=mha.
   The pipeline saves the final weights to <run_dir>/model.
2. Load them back (model.source=local model.path=<run_dir>/model) and continue training, same seed,
   data order and token budget, as: the unconverted model (reference), mixSGA 3:1:6 over KV heads
   [8, 4, 2] (group sizes 1, 2, 4; 50% KV), GQA with 4 KV heads (50%), CLA at 50%, and the ablations
   mixSGA without the consistency loss (alpha=0; paper Table 6), with a random router, and with
   the router trained by the consistency loss alone (router_grad=aux_only, the literal eq. 9).
   The 50% mixSGA / GQA / CLA points run with every seed in --seeds.
3. Report (experiments/report.py) into experiments/results/bench_replica/.

    .venv/bin/python experiments/bench_replica.py [--pretrain-steps 600] [--steps 120] [--seeds 0 1 2]

Extra run sets (seed 0 unless --all-seeds): ``--router-sweep`` (router_grad x trainer.router_lr_mult
at 3:1:6), ``--ratio-grid`` (every 50% ratio over [8, 4, 2] on a 0.05 grid, 0:1:0 included, paper
eq. 11). ``--only`` keeps the runs whose name matches one of its shell patterns (two processes can
split the work), ``--pretrained`` reuses another output folder's pretrained model, ``--layer-allocation`` adds the
per-layer-ratio runs of a ``layer_allocation.py`` result, ``--mix`` adds
overrides to every mixSGA run (e.g. the chosen router defaults).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import subprocess
import sys
from pathlib import Path

from layer_allocation import layer_ratios_override
from runlib import run_training

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mixsga_train.attention.budget import feasible_ratios, simplest_integer_ratio  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MIX = ["attention=mixsga", "attention.expert_kv_heads=[8,4,2]", "attention.ratio=[3,1,6]"]
# (name, overrides, run with every seed?)
METHODS = [
    ("mha", ["attention=mha"], False),
    ("mixsga_50_3-1-6", MIX, True),
    ("gqa_4kv_50", ["attention=gqa", "attention.budget=0.5"], True),
    ("cla_50", ["attention=cla", "attention.budget=0.5"], True),
    ("mixsga_50_3-1-6_noaux", MIX + ["attention.alpha=0"], False),
    ("mixsga_50_3-1-6_random", MIX + ["attention.router=random"], False),
    ("mixsga_50_3-1-6_aux_only", MIX + ["attention.router_grad=aux_only"], False),
]


ROUTER_GRADS = ("straight_through", "counterfactual", "aux_only")
ROUTER_LR_MULTS = (1, 10, 30)


def layer_allocation_methods(path: Path) -> list[tuple[str, list[str], bool]]:
    """The --layer-allocation runs: the 50% per-layer ratios of ``experiments/layer_allocation.py``
    (``mixsga_50_layers``) and the same layer budgets with every half-KV layer using the paper's
    3:1:6 token routing instead of all tokens at 4 heads (``mixsga_50_layers_tokens``)."""
    allocation = next(a for a in json.loads(path.read_text())["allocations"] if abs(a["budget"] - 0.5) < 1e-9)
    rows = allocation["layer_ratios"]
    tokens = [[0.3, 0.1, 0.6] if row == [0, 1, 0] else row for row in rows]

    out = [("mixsga_50_layers", MIX + [layer_ratios_override(rows)], True)]
    if tokens != rows:
        out.append(("mixsga_50_layers_tokens", MIX + [layer_ratios_override(tokens)], True))
    return out


def extra_methods(router_sweep: bool, ratio_grid: bool) -> list[tuple[str, list[str], bool]]:
    """The --router-sweep and --ratio-grid runs as (name, overrides, every seed?)."""
    out = []
    if router_sweep:
        for grad in ROUTER_GRADS:
            for mult in ROUTER_LR_MULTS:
                out.append(
                    (
                        f"mixsga_50_3-1-6_{grad}_lr{mult}",
                        MIX + [f"attention.router_grad={grad}", f"trainer.router_lr_mult={mult}"],
                        False,
                    )
                )
    if ratio_grid:
        for shares in feasible_ratios([8, 4, 2], 8, 0.5, 0.05, mixtures_only=False):
            ratio = simplest_integer_ratio(shares)
            name = "-".join(map(str, ratio))
            out.append((f"mixsga_50_grid_{name}", MIX[:-1] + [f"attention.ratio=[{','.join(map(str, ratio))}]"], True))
    return out


def run(name: str, cmd: list[str], run_dir: Path, env: dict) -> None:
    if run_training(name, cmd, run_dir, env) != 0:
        raise SystemExit(f"{name} failed; see {run_dir.parent / (name + '.log')}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/bench_replica")
    p.add_argument("--results", default="experiments/results/bench_replica")
    p.add_argument("--pretrain-steps", type=int, default=600)
    p.add_argument("--pretrain-lr", type=float, default=2e-3)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=160, help="a multiple of 10, so 3:1:6 top-k shares are exact")
    p.add_argument("--eval-tokens", type=int, default=8000)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--router-sweep", action="store_true", help="router_grad x router_lr_mult at 3:1:6 (seed 0)")
    p.add_argument("--ratio-grid", action="store_true", help="the 50%% ratio grid over [8,4,2], 0:1:0 included")
    p.add_argument("--only", nargs="+", default=None, help="shell patterns of run names to keep, e.g. 'gqa*' 'cla*'")
    p.add_argument(
        "--layer-allocation",
        type=Path,
        default=None,
        help="a layer_allocation.json (experiments/layer_allocation.py): add the per-layer-ratio runs",
    )
    p.add_argument("--pretrained", default=None, help="an output folder whose pretrain_mha/ to reuse")
    p.add_argument("--mix", nargs="*", default=[], help="extra overrides for every mixSGA run")
    p.add_argument("--all-seeds", action="store_true", help="run every method with every seed")
    p.add_argument("--no-report", action="store_true")
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args()
    out = ROOT / args.out
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false")
    py = [sys.executable, "-m", "mixsga_train.train"]
    base = [
        "task=shakespeare",
        f"task.seq_len={args.seq_len}",
        f"task.max_eval_tokens={args.eval_tokens}",
        "trainer.precision=fp32",
        "trainer.zero_stage=0",
        "logger=none",
        "experiment_name=bench_replica",
        f"trainer.micro_batch_size={args.batch}",
        "trainer.eval_batch_size=32",
        "trainer.log_every=25",
    ]
    pre_dir = (ROOT / args.pretrained if args.pretrained else out) / "pretrain_mha"
    pretrain = (
        py
        + base
        + [
            "model=tiny_llama_mha8",
            "attention=mha",
            f"trainer.max_steps={args.pretrain_steps}",
            f"trainer.lr={args.pretrain_lr}",
            "trainer.warmup_ratio=0.05",
            "trainer.min_lr_ratio=0.1",
            "trainer.eval_before=false",
            "seed=0",
            f"hydra.run.dir={pre_dir}",
        ]
    )
    local = [
        "model=tiny_llama_mha8",
        "model.source=local",
        f"model.path={pre_dir / 'model'}",
        "model.name=tiny-llama-mha8-pretrained",
    ]
    runs = []
    methods = METHODS + extra_methods(args.router_sweep, args.ratio_grid)
    if args.layer_allocation:
        methods += layer_allocation_methods(ROOT / args.layer_allocation)
    for i, seed in enumerate(args.seeds):
        for name, over, every_seed in methods:
            tag = f"{name}_s{seed}"
            if args.only and not any(fnmatch.fnmatch(tag, pat) for pat in args.only):
                continue
            if i == 0 or every_seed or args.all_seeds:
                over = over + args.mix if "attention=mixsga" in over else over
                runs.append(
                    (
                        tag,
                        py
                        + base
                        + local
                        + over
                        + [
                            f"trainer.max_steps={args.steps}",
                            f"trainer.lr={args.lr}",
                            "trainer.warmup_ratio=0.05",
                            f"seed={seed}",
                            f"hydra.run.dir={out / 'continued' / tag}",
                        ],
                    )
                )
    commands = [" ".join(pretrain)] + [" ".join(c) for _, c in runs]
    if args.dry_run:
        print("\n".join(commands))
        return
    run("pretrain_mha", pretrain, pre_dir, env)
    for tag, cmd in runs:
        run(tag, cmd, out / "continued" / tag, env)
    if args.no_report:
        return
    results = ROOT / args.results
    results.mkdir(parents=True, exist_ok=True)
    (results / "commands.txt").write_text("\n".join(commands) + "\n")
    subprocess.check_call(
        [
            sys.executable,
            "experiments/report.py",
            str(out / "continued"),
            "--out",
            str(results),
            "--title",
            "bench-replica: 8-KV-head MHA Llama (pretrained here), mixSGA 3:1:6 [8,4,2]",
        ],
        cwd=ROOT,
        env=env,
    )


if __name__ == "__main__":
    main()
