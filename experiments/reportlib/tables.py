"""Aggregate rows over seeds and write them as Markdown and CSV."""

from __future__ import annotations

import csv
import math
from pathlib import Path

NUMERIC = (
    "kv_budget",
    "realised_kv_budget",
    "kv_bytes_per_token",
    "kv_bytes_per_token_decode",
    "kv_share_decode",
    "kv_share_causal",
    "kv_bytes_per_token_native",
    "kv_measured_fraction",
    "kv_overhead_bytes",
    "kv_overhead_bytes_per_layer",
    "params",
    "train_steps",
    "train_tokens",
    "train_tokens_per_s",
    "train_final_lm_loss",
    "ppl_before",
    "ppl_causal_before",
    "ppl",
    "ppl_causal",
    "word_ppl",
    "word_ppl_causal",
    "routing_agreement",
    "decode_kv_budget",
    "rouge_l_avg",
)
METHOD_ORDER = {"mha": 0, "gqa": 1, "cla": 2, "mixsga": 3}


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return None, None
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else None
    return mean, std


def _mean_lists(lists: list) -> list[float] | None:
    lists = [x for x in lists if x]
    if not lists:
        return None
    return [sum(x[i] for x in lists) / len(lists) for i in range(len(lists[0]))]


def eval_sets(rows: list[dict]) -> list[str]:
    names: list[str] = []
    for r in rows:
        names += [n for n in r["rouge_l"] if n not in names]
    return names


def aggregate(rows: list[dict]) -> list[dict]:
    """One entry per (model, task, config): means and sample std over seeds, sorted by budget then method."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["task"], r["config"]), []).append(r)
    out = []
    for (_model, _task, config), rs in groups.items():
        first = rs[0]
        agg = {
            k: first[k]
            for k in (
                "model",
                "task",
                "method",
                "series",
                "config",
                "expert_kv_heads",
                "ratio",
                "router",
                "router_grad",
                "alpha",
            )
        }
        agg["config"] = config
        agg["seeds"] = sorted(r["seed"] for r in rs if r["seed"] is not None)
        agg["n"] = len(rs)
        agg["runs"] = [r["run"] for r in rs]
        for key in NUMERIC:
            agg[key], agg[key + "_std"] = mean_std([r[key] for r in rs])
        agg["realised_kv_source"] = "/".join(sorted({r["realised_kv_source"] for r in rs}))
        agg["fractions_prefill"] = _mean_lists([r["fractions_prefill"] for r in rs])
        agg["fractions_decode"] = _mean_lists([r["fractions_decode"] for r in rs])
        agg["rouge_l"] = {}
        for name in eval_sets(rs):
            agg["rouge_l"][name], agg["rouge_l"][name + "_std"] = mean_std([r["rouge_l"].get(name) for r in rs])
        out.append(agg)
    out.sort(
        key=lambda a: (
            a["model"] or "",
            a["task"] or "",
            -(a["kv_budget"] or 0),
            METHOD_ORDER.get(a["method"], 9),
            a["config"],
        )
    )
    return out


def fmt(value, std=None, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and abs(value) >= 1e5:
        text = f"{value:.3g}"
    else:
        text = f"{value:.{digits}f}"
    if std is not None:
        text += f" ± {std:.3g}" if abs(std) >= 1e5 or abs(value) >= 1e5 else f" ± {std:.{digits}f}"
    return text


def fmt_fractions(fr) -> str:
    return "/".join(f"{f:.2f}" for f in fr) if fr else "–"


def fmt_budget(a: dict) -> str:
    """``realised (nominal)`` KV budget in % of native; the realised one marked when only estimated."""
    nominal = f"{100 * a['kv_budget']:.1f}%" if a["kv_budget"] is not None else "–"
    if a["realised_kv_budget"] is None:
        return f"? ({nominal})"
    mark = " (from fractions)" if "fractions" in a["realised_kv_source"] else ""
    return f"{100 * a['realised_kv_budget']:.1f}%{mark} ({nominal})"


def markdown_table(aggs: list[dict]) -> str:
    """The summary table: one row per configuration, mean ± std over seeds. Causal-routing perplexity
    is the headline, next to the KV share that routing spent and the KV budget the run realises at
    decode (nominal in brackets)."""
    sets = eval_sets([{"rouge_l": {k: v for k, v in a["rouge_l"].items() if not k.endswith("_std")}} for a in aggs])
    head = [
        "model",
        "config",
        "seeds",
        "ppl after, causal routing",
        "KV spent by that routing",
        "KV at decode, realised (nominal)",
        "ppl after, top-k (paper protocol, non-causal)",
        "ppl before (causal / top-k)",
        "word ppl after (causal)",
        "KV bytes/real token: prefill \\| decode (% native, prefill +bytes/layer)",
        "train tok/s",
        "expert fractions: prefill \\| decode",
    ] + [f"ROUGE-L {s}" for s in sets]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for a in aggs:
        cells = [
            a["model"] or "?",
            a["config"],
            ",".join(str(s) for s in a["seeds"]) or "–",
            fmt(a["ppl_causal"], a["ppl_causal_std"]),
            f"{100 * a['kv_share_causal']:.1f}%" if a.get("kv_share_causal") is not None else "–",
            fmt_budget(a),
            fmt(a["ppl"], a["ppl_std"]),
            f"{fmt(a['ppl_causal_before'])} / {fmt(a['ppl_before'])}",
            fmt(a["word_ppl_causal"], a["word_ppl_causal_std"]),
            _fmt_kv(a),
            fmt(a["train_tokens_per_s"], digits=0),
            f"{fmt_fractions(a['fractions_prefill'])} \\| {fmt_fractions(a['fractions_decode'])}"
            if a["fractions_prefill"]
            else "–",
        ] + [fmt(a["rouge_l"].get(s), a["rouge_l"].get(s + "_std")) for s in sets]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _fmt_kv(a: dict) -> str:
    """``prefill | decode`` bytes per real token with their share of native."""
    if a["kv_bytes_per_token"] is None:
        return "–"
    text = f"{a['kv_bytes_per_token']:.1f} ({100 * (a['kv_measured_fraction'] or 0):.1f}%"
    if a["kv_overhead_bytes_per_layer"] is not None:
        text += f", {a['kv_overhead_bytes_per_layer']:+.2f}"
    text += ")"
    if a["kv_bytes_per_token_decode"] is not None:
        text += f" \\| {a['kv_bytes_per_token_decode']:.1f} ({100 * (a['kv_share_decode'] or 0):.1f}%)"
    return text


RUN_COLUMNS = (
    "run",
    "model",
    "task",
    "method",
    "series",
    "config",
    "ratio",
    "router",
    "router_grad",
    "alpha",
    "seed",
    "realised_kv_source",
) + NUMERIC


def write_runs_csv(rows: list[dict], path: Path) -> None:
    """Every run, one line; list-valued fields joined with '/'; ROUGE-L per set as rouge_l/<set>."""
    sets = eval_sets(rows)
    header = (
        list(RUN_COLUMNS)
        + ["expert_kv_heads", "fractions_prefill", "fractions_decode"]
        + [f"rouge_l/{s}" for s in sets]
    )
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for r in rows:
            w.writerow(
                [_cell(r[c]) for c in RUN_COLUMNS]
                + [_cell(r["expert_kv_heads"]), _cell(r["fractions_prefill"]), _cell(r["fractions_decode"])]
                + [_cell(r["rouge_l"].get(s)) for s in sets]
            )


def write_summary_csv(aggs: list[dict], path: Path) -> None:
    """One line per configuration: means, stds and the seeds."""
    sets = eval_sets([{"rouge_l": {k: v for k, v in a["rouge_l"].items() if not k.endswith("_std")}} for a in aggs])
    cols = ["model", "task", "method", "series", "config", "ratio", "n", "seeds", "realised_kv_source"]
    nums = [c for k in NUMERIC for c in (k, k + "_std")]
    header = (
        cols
        + nums
        + ["fractions_prefill", "fractions_decode"]
        + [c for s in sets for c in (f"rouge_l/{s}", f"rouge_l/{s}_std")]
    )
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for a in aggs:
            w.writerow(
                [_cell(a[c]) for c in cols]
                + [_cell(a[c]) for c in nums]
                + [_cell(a["fractions_prefill"]), _cell(a["fractions_decode"])]
                + [_cell(a["rouge_l"].get(c)) for s in sets for c in (s, s + "_std")]
            )


def _cell(v):
    if v is None:
        return ""
    if isinstance(v, (list, tuple)):
        return "/".join(_cell(x) for x in v)
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)
