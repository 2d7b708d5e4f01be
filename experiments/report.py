"""`make report SWEEP=<dir>`: a report of every run under a sweep, from metrics.json files alone.

Reads every ``metrics.json`` below SWEEP (recursively; Hydra multirun folders, benchmark folders or
any mix), averages seeds of the same configuration, and writes into --out (default SWEEP/report):

    report.md      summary table (mean ± std over seeds) + links to the plots
    summary.csv    one line per configuration          runs.csv   one line per run
    ppl_vs_budget.png  rouge_l.png  ratio_grid.png  expert_fractions.png   (those with data)

    .venv/bin/python experiments/report.py outputs/<experiment>/multirun_<time> [--out DIR] [--title T]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from reportlib import plots  # noqa: E402
from reportlib.collect import collect  # noqa: E402
from reportlib.tables import aggregate, markdown_table, write_runs_csv, write_summary_csv  # noqa: E402

PLOTS = (
    ("ppl_vs_budget.png", plots.ppl_vs_budget, "Perplexity vs KV budget"),
    ("rouge_l.png", plots.rouge_per_set, "ROUGE-L per eval set"),
    ("ratio_grid.png", plots.ratio_grid, "mixSGA ratio grid"),
    ("expert_fractions.png", plots.expert_fractions, "Expert fractions, prefill vs decode"),
)


def build_report(sweep: Path, out: Path, title: str | None = None) -> dict:
    """Write the report files; returns {"rows", "aggregates", "files"}."""
    sweep, out = Path(sweep), Path(out)
    rows = collect(sweep)
    if not rows:
        raise SystemExit(f"no metrics.json under {sweep}")
    out.mkdir(parents=True, exist_ok=True)
    aggs = aggregate(rows)
    files = {"report.md": out / "report.md", "summary.csv": out / "summary.csv", "runs.csv": out / "runs.csv"}
    write_runs_csv(rows, files["runs.csv"])
    write_summary_csv(aggs, files["summary.csv"])
    sections = []
    for name, fn, caption in PLOTS:
        written = fn(aggs, out / name, title=f"{title + ': ' if title else ''}{caption}")
        if written is not None:
            files[name] = written
            sections.append(f"### {caption}\n\n![{caption}]({name})\n")
    text = [f"# {title or 'Sweep report'}\n",
            f"{len(rows)} runs, {len(aggs)} configurations, read from `{sweep}`. Numbers after training unless "
            "marked 'before'; ± is the sample std over seeds. The headline is perplexity under causal routing (every "
            "token routed from its own past only, as in streaming decoding), placed at the KV budget the run REALISES "
            "at decode (measured bytes per real generated token / native; 'from fractions' where only the decode "
            "expert fractions were recorded), the nominal budget in brackets. 'top-k' routes each evaluation block by "
            "progressive top-k over the whole block (the paper's protocol): it is not causal, a token's expert depends "
            "on later tokens. KV bytes are measured from the cache per real token (no padding, nothing from EOS on); "
            "the signed number is the prefill bytes minus budget x native, per layer (mixSGA stores a 1-byte expert "
            "id per token per layer).\n",
            markdown_table(aggs), *sections]
    files["report.md"].write_text("\n".join(text))
    return {"rows": rows, "aggregates": aggs, "files": files}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep", type=Path, help="a directory holding run directories (searched recursively for metrics.json)")
    p.add_argument("--out", type=Path, default=None, help="output directory (default: SWEEP/report)")
    p.add_argument("--title", default=None)
    args = p.parse_args()
    result = build_report(args.sweep, args.out or args.sweep / "report", args.title)
    for path in result["files"].values():
        print(path)


if __name__ == "__main__":
    main()
