"""Find every metrics.json under a sweep directory and flatten each into one row (a dict)."""

from __future__ import annotations

import json
from pathlib import Path


def find_metrics(root: Path) -> list[Path]:
    """Every ``metrics.json`` below ``root`` (recursively), sorted by path."""
    return sorted(Path(root).rglob("metrics.json"))


def format_ratio(ratio) -> str:
    """Normalised shares -> the smallest integer ratio when one with entries <= 40 exists ("3:1:6")."""
    if not ratio:
        return ""
    from fractions import Fraction
    import math

    fracs = [Fraction(r).limit_denominator(1000) for r in ratio]
    denom = math.lcm(*(f.denominator for f in fracs))
    ints = [int(f * denom) for f in fracs]
    g = math.gcd(*ints) or 1
    ints = [i // g for i in ints]
    if max(ints) <= 40:
        return ":".join(str(i) for i in ints)
    return ":".join(f"{r:.3g}" for r in ratio)


def _variant(m: dict) -> list[str]:
    """What makes a mixSGA run an ablation (empty for the default learned / straight-through / alpha 1)."""
    parts = []
    if m.get("router") == "random":
        parts.append("random-router")
    if m.get("router_grad") == "aux_only":
        parts.append("aux_only")
    alpha = m.get("alpha")
    if alpha is not None and alpha != 1.0:
        parts.append(f"alpha={alpha:g}")
    return parts


def _heads(m: dict) -> str:
    heads = m.get("expert_kv_heads")
    return "[" + ",".join(str(h) for h in heads) + "]" if heads else ""


def series_name(m: dict) -> str:
    """The curve a run belongs to: the method; for mixSGA its experts and any ablation."""
    method = m.get("method", "?")
    if method != "mixsga":
        return method
    return " ".join(["mixsga", _heads(m), *_variant(m)]).replace("  ", " ").strip()


def config_label(m: dict) -> str:
    """One configuration (everything but the seed), e.g. ``mixsga [3,1] 1:3`` or ``gqa 1kv``."""
    method = m.get("method", "?")
    att = m.get("attention") or {}
    if method == "mixsga":
        return " ".join(["mixsga", _heads(m), format_ratio(m.get("ratio")), *_variant(m)]).replace("  ", " ").strip()
    if method == "gqa":
        heads = (m.get("expert_kv_heads") or att.get("expert_kv_heads") or ["?"])[0]
        return f"gqa {heads}kv"
    if method == "cla":
        groups = att.get("cla_groups") or []
        return f"cla {len(groups)}/{att.get('num_layers', '?')} layers"
    return method


def _get(d: dict | None, *keys):
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def flatten(m: dict, path: Path, root: Path) -> dict:
    """One metrics.json -> one flat row (missing fields are None)."""
    ev, before, train = m.get("eval") or {}, m.get("eval_before") or {}, m.get("train") or {}
    native = m.get("kv_bytes_per_token_native")
    measured = m.get("kv_bytes_per_token", ev.get("kv_bytes_per_token"))
    budget = m.get("kv_budget")
    layers = _get(m, "attention", "num_layers")
    overhead = measured - budget * native if None not in (measured, budget, native) else None
    rouge = ev.get("rouge_l") or {}
    heads, native_heads = m.get("expert_kv_heads"), _get(m, "attention", "native_kv_heads")
    decode = _get(ev, "expert_fractions", "decode")
    decode_budget = None
    if m.get("method") == "mixsga" and decode and heads and native_heads and len(decode) == len(heads):
        decode_budget = sum(f * h for f, h in zip(decode, heads)) / native_heads
    decode_bytes = ev.get("kv_bytes_per_token_decode")
    realised, source = realised_budget(m.get("method"), ev.get("kv_share_decode"), decode_budget, budget)
    return {
        "run": str(path.parent.relative_to(root)) if path.parent != root else ".",
        "model": m.get("model"),
        "task": m.get("task"),
        "method": m.get("method"),
        "series": series_name(m),
        "config": config_label(m),
        "expert_kv_heads": m.get("expert_kv_heads"),
        "ratio": format_ratio(m.get("ratio")) if m.get("method") == "mixsga" else "",
        "router": m.get("router"),
        "router_grad": m.get("router_grad"),
        "alpha": m.get("alpha"),
        "seed": m.get("seed"),
        "kv_budget": budget,
        "kv_bytes_per_token": measured,
        "kv_bytes_per_token_native": native,
        "kv_measured_fraction": measured / native if measured is not None and native else None,
        "kv_overhead_bytes": overhead,
        "kv_overhead_bytes_per_layer": overhead / layers if overhead is not None and layers else None,
        "kv_bytes_per_token_decode": decode_bytes,
        "kv_share_decode": ev.get("kv_share_decode"),
        "realised_kv_budget": realised,
        "realised_kv_source": source,
        "params": m.get("params"),
        "train_steps": train.get("steps"),
        "train_tokens": train.get("tokens"),
        "train_tokens_per_s": train.get("tokens_per_s"),
        "train_final_lm_loss": train.get("final_lm_loss", train.get("final_loss")),
        "ppl_before": before.get("ppl"),
        "ppl_causal_before": before.get("ppl_causal_routing"),
        "ppl": ev.get("ppl"),
        "ppl_causal": ev.get("ppl_causal_routing"),
        "word_ppl": ev.get("word_ppl"),
        "word_ppl_causal": ev.get("word_ppl_causal_routing"),
        "routing_agreement": ev.get("routing_agreement"),
        "fractions_prefill": _get(ev, "expert_fractions", "prefill"),
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
            rows.append(flatten(json.loads(path.read_text()), path, root))
        except (json.JSONDecodeError, OSError, TypeError, AttributeError) as err:
            print(f"warning: skipping {path}: {err}")
    return rows
