"""PNG plots of aggregated rows (matplotlib, Agg backend). Each function returns the path it wrote,
or None when the sweep has nothing to show for it."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MARKERS = {"mha": "*", "gqa": "s", "cla": "^", "mixsga": "o"}


def _series(aggs: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for a in aggs:
        out.setdefault(a["series"], []).append(a)
    return out


def x_budget(a: dict) -> float:
    """Where a configuration's causal perplexity sits on a budget curve, in %: the KV share its causal
    routing spent (``kv_share_causal``), else its realised decode KV budget, else the nominal one."""
    realised = a.get("kv_share_causal")
    realised = realised if realised is not None else a.get("realised_kv_budget")
    return 100 * (realised if realised is not None else a["kv_budget"])


def ppl_vs_budget(aggs: list[dict], path: Path, title: str = "") -> Path | None:
    """Perplexity after training vs KV budget per method (error bars: std over seeds). Left, the
    headline: causal-routing perplexity at the budget that routing really SPENT, a hollow marker and
    dotted line back to its nominal budget where they differ. Right: top-k routing (the paper's
    non-causal protocol) at the nominal budget, before-training numbers as faint markers."""
    aggs = [a for a in aggs if a["ppl"] is not None and a["kv_budget"] is not None]
    if not aggs:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    panels = (
        (axes[0], "ppl_causal", "causal routing, at the KV that routing spent", True),
        (axes[1], "ppl", "top-k routing (paper protocol, non-causal), at nominal KV", False),
    )
    for ax, key, name, realised in panels:
        for series, rs in sorted(_series(aggs).items()):
            rs = sorted(
                [a for a in rs if a[key] is not None], key=lambda a: x_budget(a) if realised else a["kv_budget"]
            )
            if not rs:
                continue
            xs = [x_budget(a) if realised else 100 * a["kv_budget"] for a in rs]
            ys = [a[key] for a in rs]
            errs = [a.get(key + "_std") or 0.0 for a in rs]
            marker = MARKERS.get(rs[0]["method"], "o")
            line = ax.errorbar(
                xs, ys, yerr=errs, marker=marker, capsize=3, label=series, linestyle="-" if len(xs) > 1 else "none"
            )
            color = line[0].get_color()
            if realised:
                for x, y, a in zip(xs, ys, rs):
                    if abs(x - 100 * a["kv_budget"]) > 0.05:
                        ax.plot([100 * a["kv_budget"], x], [y, y], linestyle=":", color=color, alpha=0.6)
                        ax.scatter(
                            [100 * a["kv_budget"]], [y], marker=marker, facecolors="none", edgecolors=color, alpha=0.6
                        )
            else:
                before = [(100 * a["kv_budget"], a["ppl_before"]) for a in rs if a["ppl_before"] is not None]
                if before:
                    ax.scatter(*zip(*before), marker=marker, facecolors="none", edgecolors=color, alpha=0.5)
        ax.set_yscale("log")
        ax.set_xlabel("KV cache, % of native")
        ax.set_title(name, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("perplexity after training (log)\nhollow: nominal budget (left), before training (right)")
    axes[0].legend(fontsize=8, loc="best")
    fig.suptitle(title or "perplexity vs KV budget")
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def rouge_per_set(aggs: list[dict], path: Path, title: str = "") -> Path | None:
    """Grouped bars: ROUGE-L per eval set (x) for each configuration."""
    sets = []
    for a in aggs:
        sets += [s for s in a["rouge_l"] if not s.endswith("_std") and s not in sets]
    aggs = [a for a in aggs if a["rouge_l"]]
    if not sets or not aggs:
        return None
    width = 0.8 / len(aggs)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(sets) + 0.3 * len(aggs)), 4.5))
    for i, a in enumerate(aggs):
        xs = [j + i * width for j in range(len(sets))]
        ys = [a["rouge_l"].get(s) or 0.0 for s in sets]
        errs = [a["rouge_l"].get(s + "_std") or 0.0 for s in sets]
        ax.bar(xs, ys, width, yerr=errs, capsize=2, label=f"{a['config']} ({100 * (a['kv_budget'] or 0):.0f}%)")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(sets))], sets)
    ax.set_ylabel("ROUGE-L (F x100)")
    ax.set_title(title or "ROUGE-L per eval set", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def ratio_grid(aggs: list[dict], path: Path, title: str = "") -> Path | None:
    """mixSGA ratios (x, ordered by the first expert's share) against ROUGE-L average when the
    runs have it, else perplexity under causal routing (headline) and top-k routing; one panel per
    nominal KV budget, each bar labelled with the budget the run realises at decode."""
    mix = [a for a in aggs if a["method"] == "mixsga" and a["ratio"]]
    if not mix:
        return None
    budgets = sorted({round(a["kv_budget"], 4) for a in mix})
    fig, axes = plt.subplots(
        1,
        len(budgets),
        figsize=(max(6, 1.0 * max(len(mix), 4)) * min(len(budgets), 3) / max(1, min(len(budgets), 3)) + 2, 4.5),
        squeeze=False,
    )
    use_rouge = any(a["rouge_l_avg"] is not None for a in mix)
    for ax, budget in zip(axes[0], budgets):
        rs = sorted(
            [a for a in mix if round(a["kv_budget"], 4) == budget],
            key=lambda a: (
                [float(x) for x in a["ratio"].split(":")][0] / sum(float(x) for x in a["ratio"].split(":")),
                a["series"],
            ),
        )
        labels = [a["ratio"] if len({r["series"] for r in rs}) == 1 else f"{a['ratio']}\n{a['series']}" for a in rs]
        labels = [f"{label}\n{x_budget(a):.1f}% KV" for label, a in zip(labels, rs)]
        xs = list(range(len(rs)))
        if use_rouge:
            ax.bar(
                xs, [a["rouge_l_avg"] or 0.0 for a in rs], yerr=[a.get("rouge_l_avg_std") or 0.0 for a in rs], capsize=3
            )
            ax.set_ylabel("mean ROUGE-L over eval sets")
        else:
            w = 0.4
            ax.bar(
                [x - w / 2 for x in xs],
                [a["ppl_causal"] or 0.0 for a in rs],
                w,
                yerr=[a.get("ppl_causal_std") or 0.0 for a in rs],
                capsize=3,
                label="causal routing",
            )
            ax.bar(
                [x + w / 2 for x in xs],
                [a["ppl"] for a in rs],
                w,
                yerr=[a.get("ppl_std") or 0.0 for a in rs],
                capsize=3,
                label="top-k (paper protocol, non-causal)",
                alpha=0.5,
            )
            ax.set_ylabel("perplexity after training")
            ax.legend(fontsize=8)
        ax.set_xticks(xs, labels, rotation=45 if len(rs) > 5 else 0, fontsize=8)
        ax.set_title(f"{100 * budget:.1f}% KV nominal")
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(title or "mixSGA expert-ratio grid")
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def expert_fractions(aggs: list[dict], path: Path, title: str = "") -> Path | None:
    """Stacked bars of the share of tokens per expert, prefill (top-k) next to decode (the realised
    fractions of generated tokens), for every mixSGA configuration; the gap is how far decode drifts
    from the target ratio."""
    mix = [a for a in aggs if a["method"] == "mixsga" and a["fractions_prefill"]]
    if not mix:
        return None
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(mix) + 2), 4.8))
    n = max(len(a["fractions_prefill"]) for a in mix)
    colors = plt.cm.viridis([i / max(n - 1, 1) for i in range(n)])
    xs, labels = [], []
    for i, a in enumerate(mix):
        for j, (kind, fr) in enumerate((("prefill", a["fractions_prefill"]), ("decode", a["fractions_decode"]))):
            if not fr:
                continue
            x = 3 * i + j
            bottom = 0.0
            heads = a["expert_kv_heads"] or list(range(len(fr)))
            for e, f in enumerate(fr):
                ax.bar(
                    x,
                    f,
                    0.9,
                    bottom=bottom,
                    color=colors[e],
                    label=f"expert {e} ({heads[e]} KV heads)" if i == 0 and j == 0 else None,
                )
                bottom += f
            xs.append(x)
            labels.append(f"{a['config']}\n{kind}")
    ax.set_xticks(xs, labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("share of tokens (all layers)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title(title or "expert fractions: prefill (top-k) vs decode (realised)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
