"""Choose the decode policy on the validation split, report it on test: causal perplexity of the same
checkpoints under ``budget`` and ``balanced`` (sink tokens x slack), at the KV each routing spent.

For every mixSGA run directory given and every variant, ``mixsga-evaluate`` re-evaluates the
checkpoint (the weights do not change) on the valid split and on the test split, without
generation (``task.eval_sets=[]``: perplexity and the causal routing's spent KV only), writing
``eval_<split>_<variant>.json`` into the run directory; existing files are skipped (resumable).
SFT runs only: the valid split is selected by ``task.split_sizes=[train, 0, valid]``, which makes
the first ``valid`` records of the seeded permutation (the valid split) the evaluated one.

    OMP_NUM_THREADS=1 .venv/bin/python experiments/decode_policy_sweep.py outputs/bench_sft/mixsga_67_1-1_s0 ... \
        [--split 897 100 100] [--out experiments/results/decode_policy]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _balanced(sink: int, slack: int) -> list[str]:
    return ["attention.decode_policy=balanced", f"attention.sink_tokens={sink}", f"attention.decode_slack={slack}"]


VARIANTS = {  # name: attention overrides
    "budget": ["attention.decode_policy=budget"],
    **{f"balanced_sink{s}_slack{w}": _balanced(s, w) for s, w in ((0, 1), (1, 1), (1, 4), (1, 16), (4, 4))},
}


def split_overrides(split: str, sizes: list[int]) -> list[str]:
    train, valid, test = sizes
    if split == "valid":
        return [f"task.split_sizes=[{train},0,{valid}]"]
    return [f"task.split_sizes=[{train},{valid},{test}]"]


def evaluate(run: Path, split: str, variant: str, sizes: list[int], env: dict) -> None:
    name = f"eval_{split}_{variant}"
    if (run / f"{name}.json").is_file():
        return
    cmd = [
        sys.executable,
        "-m",
        "mixsga_train.evaluate",
        str(run),
        *VARIANTS[variant],
        *split_overrides(split, sizes),
        "task.eval_sets=[]",
        "--name",
        name,
    ]
    print("[run]", " ".join(["python", *cmd[1:]]), flush=True)
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)


def table(runs: list[Path]) -> str:
    lines = [
        "| run | variant | valid causal ppl | valid KV spent | test causal ppl | test KV spent | test top-k ppl |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for run in runs:
        for variant in VARIANTS:
            cells = []
            for split in ("valid", "test"):
                path = run / f"eval_{split}_{variant}.json"
                ev = json.loads(path.read_text())["eval"] if path.is_file() else None
                cells.append(ev)
            valid, test = cells
            if valid is None and test is None:
                continue

            def num(ev, key, spec):
                return "-" if ev is None or ev.get(key) is None else format(ev[key], spec)

            lines.append(
                f"| {run.name} | {variant} | {num(valid, 'ppl_causal_routing', '.3f')} | "
                f"{num(valid, 'kv_share_causal', '.1%')} | {num(test, 'ppl_causal_routing', '.3f')} | "
                f"{num(test, 'kv_share_causal', '.1%')} | {num(test, 'ppl', '.3f')} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", type=Path, nargs="+", help="mixSGA SFT run directories")
    p.add_argument("--split", type=int, nargs=3, default=[897, 100, 100], help="the runs' train / valid / test sizes")
    p.add_argument("--splits", nargs="+", default=["valid", "test"], choices=["valid", "test"])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--out", type=Path, default=Path("experiments/results/decode_policy"))
    args = p.parse_args()
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false")
    runs = [r for r in args.runs if (r / "metrics.json").is_file()]
    for split in args.splits:  # every valid evaluation first: the choice is made there
        for run in runs:
            for variant in args.variants:
                evaluate(run, split, variant, args.split, env)
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(table(runs))
    print(table(runs))


if __name__ == "__main__":
    main()
