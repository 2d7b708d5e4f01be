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


def parse_layer_ratios(layer_ratios: list | tuple, num_experts: int, num_layers: int) -> list[list[float]]:
    """Per-layer capacity ratios (``attention.layer_ratios``): one ratio per layer, each a list or a
    ``"3:1:6"`` string with one share per expert; returns them normalised (each sums to 1)."""
    key = "attention.layer_ratios"
    if isinstance(layer_ratios, str) or not isinstance(layer_ratios, (list, tuple)):
        raise ConfigError(key, f"{layer_ratios!r} is not a list; give one ratio per layer, e.g. [[1,0,0],[0,0,1]]")
    if len(layer_ratios) != num_layers:
        raise ConfigError(
            key, f"has {len(layer_ratios)} entries but the model has {num_layers} layers; give one per layer"
        )
    out = []
    for i, ratio in enumerate(layer_ratios):
        shares = parse_ratio(ratio, key=f"{key}[{i}]")
        if len(shares) != num_experts:
            raise ConfigError(
                f"{key}[{i}]", f"has {len(shares)} shares for {num_experts} experts; give one share per expert"
            )
        out.append(normalise_ratio(shares))
    return out


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


def allocate_layer_ratios(sensitivity: list[list[float]], costs: list[float], budget: float) -> list[list[float]]:
    """Per-layer ratios with mean budget ``budget`` that minimise the summed loss increase, under
    the model that a layer's loss increase is linear in its expert shares.

    sensitivity: [L][E], the loss increase when every token of layer l uses expert e (the other
    layers unchanged); costs: [E] KV per token as a fraction of native (``k_e / H_kv``). This is
    the linear program min sum_l,e x_le s_le s.t. sum_e x_le = 1, mean_l sum_e x_le c_e = budget,
    x >= 0, solved exactly by the greedy on each layer's lower convex hull of (cost, loss): every
    layer starts at its cheapest expert, then hull steps are bought in order of loss saved per unit
    of KV until the budget is spent; at most one layer ends mixing two experts. Where no hull step
    is left (more KV would not lower the modelled loss) the allocation stays below the budget.
    Returns [L][E] shares (each row sums to 1). ConfigError if the budget is below the cheapest expert's cost or
    above the most expensive one's.
    """
    num_layers = len(sensitivity)
    lo, hi = min(costs), max(costs)
    if not lo - 1e-12 <= budget <= hi + 1e-12:
        raise ConfigError("budget", f"{budget} is outside the experts' cost range [{lo:g}, {hi:g}]")
    steps = []  # (loss saved per unit cost, layer, from expert, to expert, cost of the step)
    for layer, losses in enumerate(sensitivity):
        by_cost = sorted(range(len(costs)), key=lambda e: (costs[e], losses[e]))
        hull = [by_cost[0]]
        for e in by_cost[1:]:
            if costs[e] == costs[hull[-1]] or losses[e] >= losses[hull[-1]]:
                continue  # no cheaper-for-the-loss than a cheaper expert already on the hull
            while len(hull) >= 2:
                a, b = hull[-2], hull[-1]
                slope_ab = (losses[b] - losses[a]) / (costs[b] - costs[a])
                slope_ae = (losses[e] - losses[a]) / (costs[e] - costs[a])
                if slope_ae <= slope_ab:
                    hull.pop()  # b lies on or above the segment a-e
                else:
                    break
            hull.append(e)
        for a, b in zip(hull, hull[1:]):
            steps.append(((losses[b] - losses[a]) / (costs[b] - costs[a]), layer, a, b, costs[b] - costs[a]))
    shares = [[0.0] * len(costs) for _ in range(num_layers)]
    for layer, losses in enumerate(sensitivity):
        shares[layer][min(range(len(costs)), key=lambda e: (costs[e], losses[e]))] = 1.0
    left = budget * num_layers - lo * num_layers
    for _, layer, a, b, step_cost in sorted(steps):  # convex hulls: a layer's steps come in its own order
        if left <= 1e-12:
            break
        take = min(1.0, left / step_cost)
        shares[layer][a] -= take
        shares[layer][b] += take
        left -= take * step_cost
    return [[max(s, 0.0) for s in row] for row in shares]
