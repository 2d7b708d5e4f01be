"""Every feasible mixSGA expert ratio for a KV budget on a grid (paper eq. 11), as a table or as
the Hydra sweep that runs them.

    python experiments/ratio_grid.py --expert-kv-heads 4 2 1 --budget 0.5 --step 0.05
    python experiments/ratio_grid.py --expert-kv-heads 4 2 1 --budget 0.5 --step 0.05 --print-sweep
        -> attention.ratio=[1,17,2],[1,7,2],[3,11,6],[1,2,2],[1,1,2],[3,1,6]
    python experiments/ratio_grid.py --expert-kv-heads 4 2 1 --budget 0.5 --step 0.05 --run -- model=... task=...
        -> python -m mixsga_train.train -m experiment=sweep_ratio_grid attention.expert_kv_heads=[4,2,1]
           attention.ratio=<that grid> model=... task=...

Experts are KV head counts, most expensive first; ``--native-kv-heads`` is the model's H_kv (default:
the first expert's). ``expert_kv_heads`` of the run is set to the given heads unless they are the
paper's [H, H/2, H/4] and --paper-default is given. Single-expert points (e.g. 0:1:0 = plain GQA)
are dropped unless --include-single.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mixsga_train.attention.budget import feasible_ratios, simplest_integer_ratio  # noqa: E402
from mixsga_train.errors import ConfigError  # noqa: E402


def grid(heads: list[int], native: int, budget: float, step: float, include_single: bool = False) -> list[list[int]]:
    """Integer ratios of every feasible point, ordered by the first expert's share (as the paper's Table 11)."""
    return [
        simplest_integer_ratio(s)
        for s in feasible_ratios(heads, native, budget, step, mixtures_only=not include_single)
    ]


def sweep_value(ratios: list[list[int]]) -> str:
    """Hydra choice-sweep of lists: ``[1,17,2],[1,7,2]`` (quote it for the shell: it has brackets)."""
    return ",".join("[" + ",".join(str(x) for x in r) + "]" for r in ratios)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    passthrough: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, passthrough = argv[:i], argv[i + 1 :]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--expert-kv-heads", type=int, nargs="+", required=True)
    p.add_argument("--native-kv-heads", type=int, default=None)
    p.add_argument("--budget", type=float, required=True, help="fraction of native KV, e.g. 0.5")
    p.add_argument("--step", type=float, default=0.05, help="grid step of each share, e.g. 0.05 or 0.1")
    p.add_argument("--include-single", action="store_true", help="keep single-expert points (e.g. 0:1:0 = GQA)")
    p.add_argument("--print-sweep", action="store_true", help="print only the Hydra override (one line)")
    p.add_argument(
        "--run", action="store_true", help="launch the multirun (experiment=sweep_ratio_grid + args after --)"
    )
    p.add_argument("--experiment", default="sweep_ratio_grid")
    args = p.parse_args(argv)
    native = args.native_kv_heads or args.expert_kv_heads[0]
    try:
        ratios = grid(args.expert_kv_heads, native, args.budget, args.step, args.include_single)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not ratios:
        print(
            f"error: no ratio over experts {args.expert_kv_heads} (H_kv={native}) reaches {args.budget} on a "
            f"{args.step} grid; try a finer --step or --include-single",
            file=sys.stderr,
        )
        return 2
    override = f"attention.ratio={sweep_value(ratios)}"
    heads = "attention.expert_kv_heads=[" + ",".join(str(h) for h in args.expert_kv_heads) + "]"
    if args.print_sweep:
        print(override)
        return 0
    if args.run:
        cmd = [
            sys.executable,
            "-m",
            "mixsga_train.train",
            "-m",
            f"experiment={args.experiment}",
            heads,
            override,
            *passthrough,
        ]
        print(" ".join(cmd), flush=True)
        return subprocess.call(cmd, cwd=ROOT, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    shares = feasible_ratios(
        args.expert_kv_heads, native, args.budget, args.step, mixtures_only=not args.include_single
    )
    print(
        f"experts {args.expert_kv_heads} (KV heads; native H_kv={native}), budget {args.budget:g}, step {args.step:g}: "
        f"{len(ratios)} feasible ratios"
    )
    print("| ratio | shares | budget |\n|---|---|---|")
    for r, s in zip(ratios, shares):
        b = sum(float(x) * k for x, k in zip(s, args.expert_kv_heads)) / native
        print(f"| {':'.join(map(str, r))} | {' / '.join(f'{float(x):.2f}' for x in s)} | {100 * b:.1f}% |")
    print(f"\nsweep: '{override}'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
