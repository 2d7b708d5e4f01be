"""Find every metrics.json under a sweep directory, read it as ``RunMetrics`` and flatten each into one row (a dict)."""

from __future__ import annotations

import json
from pathlib import Path

from mixsga_train.metrics import EvalMetrics, RunMetrics


def find_metrics(root: Path) -> list[Path]:
    """Every ``metrics.json`` below ``root`` (recursively), sorted by path."""
    return sorted(Path(root).rglob("metrics.json"))


def format_ratio(ratio) -> str:
    """Normalised shares -> the smallest integer ratio when one with entries <= 40 exists ("3:1:6")."""
    if not ratio:
        return ""
    import math
    from fractions import Fraction

    fracs = [Fraction(r).limit_denominator(1000) for r in ratio]
    denom = math.lcm(*(f.denominator for f in fracs))
    ints = [int(f * denom) for f in fracs]
    g = math.gcd(*ints) or 1
    ints = [i // g for i in ints]
    if max(ints) <= 40:
        return ":".join(str(i) for i in ints)
    return ":".join(f"{r:.3g}" for r in ratio)


def _variant(m: RunMetrics) -> list[str]:
    """What makes a mixSGA run an ablation (empty for the default learned / straight-through / alpha 1)."""
    parts = []
    if m.attention.get("layer_ratios"):
        parts.append("layers " + "/".join(format_ratio(r) for r in m.attention["layer_ratios"]))
    if m.router == "random":
        parts.append("random-router")
    if m.router_grad == "aux_only":
        parts.append("aux_only")
    if m.alpha is not None and m.alpha != 1.0:
        parts.append(f"alpha={m.alpha:g}")
    return parts


def _heads(m: RunMetrics) -> str:
    return "[" + ",".join(str(h) for h in m.expert_kv_heads) + "]" if m.expert_kv_heads else ""


def series_name(m: RunMetrics) -> str:
    """The curve a run belongs to: the method; for mixSGA its experts and any ablation."""
    method = m.method or "?"
    if method != "mixsga":
        return method
    return " ".join(["mixsga", _heads(m), *_variant(m)]).replace("  ", " ").strip()


def config_label(m: RunMetrics) -> str:
    """One configuration (everything but the seed), e.g. ``mixsga [3,1] 1:3`` or ``gqa 1kv``."""
    method = m.method or "?"
    att = m.attention
    if method == "mixsga":
        return " ".join(["mixsga", _heads(m), format_ratio(m.ratio), *_variant(m)]).replace("  ", " ").strip()
    if method == "gqa":
        heads = (m.expert_kv_heads or att.get("expert_kv_heads") or ["?"])[0]
        return f"gqa {heads}kv"
    if method == "cla":
        groups = att.get("cla_groups") or []
        return f"cla {len(groups)}/{att.get('num_layers', '?')} layers"
    return method


def flatten(m: RunMetrics, path: Path, root: Path) -> dict:
    """One run's metrics -> one flat row (what the run did not record is None)."""
    ev, before, train = m.eval, m.eval_before or EvalMetrics(), m.train
    native = m.kv_bytes_per_token_native
    measured = m.kv_bytes_per_token if m.kv_bytes_per_token is not None else ev.kv_bytes_per_token
    budget = m.kv_budget
    layers = m.attention.get("num_layers")
    overhead = measured - budget * native if None not in (measured, budget, native) else None
    heads, native_heads = m.expert_kv_heads, m.attention.get("native_kv_heads")
    decode = ev.expert_fractions.decode
    decode_budget = None
    if m.method == "mixsga" and decode and heads and native_heads and len(decode) == len(heads):
        decode_budget = sum(f * h for f, h in zip(decode, heads)) / native_heads
    realised, source = realised_budget(m.method, ev.kv_share_decode, decode_budget, budget)
    rouge = ev.rouge_l
    return {
        "run": str(path.parent.relative_to(root)) if path.parent != root else ".",
        "model": m.model,
        "task": m.task,
        "method": m.method,
        "series": series_name(m),
        "config": config_label(m),
        "expert_kv_heads": m.expert_kv_heads,
        "ratio": format_ratio(m.ratio) if m.method == "mixsga" else "",
        "router": m.router,
        "router_grad": m.router_grad,
        "alpha": m.alpha,
        "seed": m.seed,
        "kv_budget": budget,
        "kv_bytes_per_token": measured,
        "kv_bytes_per_token_native": native,
        "kv_measured_fraction": measured / native if measured is not None and native else None,
        "kv_overhead_bytes": overhead,
        "kv_overhead_bytes_per_layer": overhead / layers if overhead is not None and layers else None,
        "kv_bytes_per_token_decode": ev.kv_bytes_per_token_decode,
        "kv_share_decode": ev.kv_share_decode,
        "kv_share_causal": ev.kv_share_causal,
        "realised_kv_budget": realised,
        "realised_kv_source": source,
        "params": m.params,
        "train_steps": train.steps if train else None,
        "train_tokens": train.tokens if train else None,
        "train_tokens_per_s": train.tokens_per_s if train else None,
        "train_final_lm_loss": (train.final_lm_loss if train.final_lm_loss is not None else train.final_loss)
        if train
        else None,
        "ppl_before": before.ppl,
        "ppl_causal_before": before.ppl_causal_routing,
        "ppl": ev.ppl,
        "ppl_causal": ev.ppl_causal_routing,
        "word_ppl": ev.word_ppl,
        "word_ppl_causal": ev.word_ppl_causal_routing,
        "routing_agreement": ev.routing_agreement,
        "fractions_prefill": ev.expert_fractions.prefill,
        "fractions_decode": decode,
        "decode_kv_budget": decode_budget,
        "rouge_l": dict(rouge),
        "rouge_l_avg": sum(rouge.values()) / len(rouge) if rouge else None,
    }


def realised_budget(method, kv_share_decode, decode_budget, nominal) -> tuple[float | None, str]:
    """The KV budget a run really decodes at, and where it comes from: the measured decode KV share
    (``kv_share_decode``, bytes per real generated token / native, ids included) when metrics.json has
    it; else, for mixSGA, the budget of its decode expert fractions; else the nominal budget for methods
    whose every token costs the same (GQA, CLA, MHA). mixSGA without decode data has none."""
    if kv_share_decode is not None:
        return kv_share_decode, "measured"
    if decode_budget is not None:
        return decode_budget, "fractions"
    if method != "mixsga" and nominal is not None:
        return nominal, "nominal"
    return None, "unknown"


def collect(root: Path) -> list[dict]:
    """Rows of every readable metrics.json under ``root``; unreadable files are reported and skipped."""
    root = Path(root)
    rows = []
    for path in find_metrics(root):
        try:
            rows.append(flatten(RunMetrics.from_json(json.loads(path.read_text())), path, root))
        except (json.JSONDecodeError, OSError, TypeError, AttributeError) as err:
            print(f"warning: skipping {path}: {err}")
    return rows
