"""KV-budget arithmetic: expert ratios, GQA head counts and CLA sharing patterns.

Budgets are fractions of the model's *native* KV cache (paper section 1.9-1.10): an expert that
keeps ``k`` of the ``H_kv`` native KV heads stores ``k / H_kv`` of a native token's K/V.
"""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

from ..errors import ConfigError


def parse_ratio(ratio: str | list | tuple, key: str = "attention.ratio") -> list[float]:
    """Parse ``"3:1:6"`` or ``[3, 1, 6]`` into a list of non-negative numbers (not normalised)."""
    if isinstance(ratio, str):
        parts = ratio.replace(",", ":").split(":")
        try:
            values = [float(p) for p in parts]
        except ValueError:
            raise ConfigError(key, f"cannot parse {ratio!r}; write it as a list [3,1,6] or a string '3:1:6'") from None
    else:
        try:
            values = [float(v) for v in ratio]
        except (TypeError, ValueError):
            raise ConfigError(key, f"cannot parse {ratio!r}; write it as a list [3,1,6] or a string '3:1:6'") from None
    if any(v < 0 or math.isnan(v) for v in values):
        raise ConfigError(key, f"{ratio!r} has a negative entry; every share must be >= 0")
    if sum(values) <= 0:
        raise ConfigError(key, f"{ratio!r} is all zero; at least one expert needs a positive share")
    return values


def normalise_ratio(ratio: list[float]) -> list[float]:
    """Capacity ratios rho_e with sum 1 (paper eq. 2)."""
    total = sum(ratio)
    return [r / total for r in ratio]


def format_ratio(ratio: list[float]) -> str:
    """``[3.0, 1.0, 6.0] -> "3:1:6"`` (integers printed without decimals)."""
    return ":".join(str(int(r)) if float(r).is_integer() else f"{r:g}" for r in ratio)


def mixsga_budget(ratio: list[float], expert_kv_heads: list[int], native_kv_heads: int) -> float:
    """KV budget of a ratio: sum_e rho_e * k_e / H_kv (paper section 1.10, general form)."""
    if len(ratio) != len(expert_kv_heads):
        raise ConfigError(
            "attention.ratio",
            f"has {len(ratio)} entries but attention.expert_kv_heads has {len(expert_kv_heads)}; "
            "give one share per expert",
        )
    rho = normalise_ratio(ratio)
    return sum(r * k for r, k in zip(rho, expert_kv_heads)) / native_kv_heads


def paper_expert_kv_heads(native_kv_heads: int, num_experts: int = 3) -> list[int]:
    """The paper's experts: group sizes 1, 2, 4, ... i.e. H_kv / 2^(e-1) heads (section 1.6)."""
    heads = [native_kv_heads // 2**e for e in range(num_experts)]
    if any(h == 0 or native_kv_heads % 2**e for e, h in enumerate(heads)):
        raise ConfigError(
            "attention.expert_kv_heads",
            f"the paper's group sizes 1,2,4 need H_kv divisible by {2 ** (num_experts - 1)}, but this model has "
            f"{native_kv_heads} KV heads; set expert_kv_heads explicitly, e.g. [{native_kv_heads}, 1]",
        )
    return heads


def feasible_ratios(
    expert_kv_heads: list[int],
    native_kv_heads: int,
    budget: float,
    step: float,
    mixtures_only: bool = True,
    tol: float = 1e-9,
) -> list[list[Fraction]]:
    """Every ratio on a grid of ``step`` whose budget equals ``budget`` (paper eq. 11).

    The paper's constraint: sum_e x_e = 1 and sum_e x_e * k_e / H_kv = budget, each x_e in [0, 1].
    The first E-1 shares walk the grid; the last one is fixed by sum = 1. Returns shares as
    Fractions (exact), ordered by the first expert's share, then the second, ...
    ``mixtures_only`` drops single-expert points (e.g. 0:1:0, which is plain GQA): with it, the
    Gemma-2 grid at step 0.05 is exactly the paper's six Table 11 ratios.
    """
    n = round(1 / step)
    if not math.isclose(n * step, 1.0, abs_tol=1e-9):
        raise ConfigError("step", f"{step} does not divide 1; use e.g. 0.05 or 0.1")
    target = Fraction(budget).limit_denominator(10**6)
    out = []
    for head in itertools.product(range(n + 1), repeat=len(expert_kv_heads) - 1):
        if sum(head) > n:
            continue
        shares = [Fraction(h, n) for h in head] + [Fraction(n - sum(head), n)]
        b = sum(s * k for s, k in zip(shares, expert_kv_heads)) / native_kv_heads
        if abs(b - target) <= tol and (not mixtures_only or sum(s > 0 for s in shares) > 1):
            out.append(shares)
    return out


def simplest_integer_ratio(shares: list[Fraction]) -> list[int]:
    """``[3/10, 1/10, 6/10] -> [3, 1, 6]``: the smallest integers with the same proportions."""
    denom = math.lcm(*(s.denominator for s in shares))
    ints = [int(s * denom) for s in shares]
    g = math.gcd(*ints)
    return [i // g for i in ints]


def gqa_budget(kv_heads: int, native_kv_heads: int) -> float:
    """GQA keeping ``kv_heads`` mean-pooled heads keeps kv_heads / H_kv of the native cache."""
    return kv_heads / native_kv_heads


def gqa_kv_heads_for_budget(budget: float, native_kv_heads: int) -> int:
    """The integer head count whose budget is ``budget`` exactly, else a ConfigError listing the reachable ones."""
    k = budget * native_kv_heads
    if k < 1 - 1e-9 or not math.isclose(k, round(k), abs_tol=1e-6) or round(k) > native_kv_heads:
        reachable = ", ".join(f"{i / native_kv_heads:.4g}" for i in range(1, native_kv_heads + 1))
        raise ConfigError(
            "attention.budget",
            f"GQA cannot reach {budget} with {native_kv_heads} native KV heads; reachable budgets: {reachable}",
        )
    return round(k)


def cla_sharing_groups(num_layers: int, budget: float) -> list[list[int]]:
    """Consecutive layer groups for Cross-Layer Attention at ``budget`` (1 K/V per group).

    CLA keeps K/V in ``budget * num_layers`` layers, which must be a whole number (like GQA's head
    counts): any other budget is refused, naming the nearest reachable ones. Group sizes differ by
    at most one, larger groups first: 50% on 30 layers gives 15 pairs; 75% on 4 layers gives a pair
    and two single layers, which is how non-integer sharing factors are reached.
    """
    if not 0 < budget <= 1:
        raise ConfigError("attention.budget", f"{budget} is outside (0, 1]; pick e.g. 0.5")
    owners = budget * num_layers
    if not math.isclose(owners, round(owners), abs_tol=1e-6) or round(owners) < 1:
        nearest = sorted({max(1, math.floor(owners)), min(num_layers, math.ceil(owners))})
        options = " or ".join(f"{k / num_layers:.6g} ({k} of {num_layers} layers)" for k in nearest)
        raise ConfigError(
            "attention.budget",
            f"CLA cannot reach {budget} with {num_layers} layers (K/V in whole layers); use {options}",
        )
    groups = round(owners)
    base, extra = divmod(num_layers, groups)
    sizes = [base + 1] * extra + [base] * (groups - extra)
    out, start = [], 0
    for size in sizes:
        out.append(list(range(start, start + size)))
        start += size
    return out


def cla_budget(groups: list[list[int]]) -> float:
    """Fraction of layers that own a K/V: len(groups) / num_layers."""
    return len(groups) / sum(len(g) for g in groups)
