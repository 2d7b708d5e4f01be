"""Compare decode policies on the same trained checkpoints (a markdown table on stdout).

A run's ``metrics.json`` holds its evaluation under the policy it trained with (``budget`` by
default); ``mixsga-evaluate RUN attention.decode_policy=P --name eval_P`` adds ``eval_P.json``
beside it. This script lists, per run and policy, causal perplexity, the realised decode K/V
share and the causal expert fractions, and for each mixSGA run the ratio to a baseline run
(``--baseline``, e.g. GQA or CLA at the same budget, matched by seed suffix ``_s<seed>``).

    .venv/bin/python experiments/decode_policies.py outputs/bench_replica_600/continued --baseline gqa_4kv_50
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path


def rows_of(run: Path) -> list[dict]:
    """One row per evaluation file of ``run``: metrics.json (its own policy) and eval_<policy>.json."""
    metrics = json.loads((run / "metrics.json").read_text())
    own = metrics.get("attention", {}).get("decode_policy") or "-"
    out = [
        dict(
            run=run.name,
            policy=own,
            eval=metrics["eval"],
        )
    ]
    for path in sorted(run.glob("eval_*.json")):
        stored = json.loads(path.read_text())
        if "eval" in stored:  # a mixsga-evaluate output (not eval_before.json)
            out.append(dict(run=run.name, policy=path.stem[len("eval_") :], eval=stored["eval"]))
    return out


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", type=Path, help="a folder of run directories")
    p.add_argument("--baseline", default=None, help="run name prefix of the baseline, e.g. gqa_4kv_50")
    args = p.parse_args()
    runs = sorted(d for d in args.runs.iterdir() if (d / "metrics.json").is_file())
    rows = [row for run in runs for row in rows_of(run)]
    baseline = {}
    for row in rows:
        seed = re.search(r"_s(\d+)$", row["run"])
        if args.baseline and row["run"].startswith(args.baseline) and seed:
            baseline[seed.group(1)] = row["eval"]["ppl_causal_routing"]
    print("| run | decode policy | causal ppl | / baseline | top-k ppl | realised decode K/V | causal fractions |")
    print("|---|---|---:|---:|---:|---:|---|")
    for row in rows:
        ev = row["eval"]
        seed = re.search(r"_s(\d+)$", row["run"])
        base = baseline.get(seed.group(1)) if seed else None
        ratio = ev["ppl_causal_routing"] / base if base else None
        fractions = (ev.get("expert_fractions") or {}).get("causal")
        shown = "/".join(f"{f:.2f}" for f in fractions) if fractions else "-"
        print(
            f"| {row['run']} | {row['policy']} | {ev['ppl_causal_routing']:.3f} | {fmt(ratio, '.3f')} | "
            f"{ev['ppl']:.3f} | {fmt(ev.get('kv_share_decode'), '.1%')} | {shown} |"
        )


if __name__ == "__main__":
    main()
