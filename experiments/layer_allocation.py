"""Per-layer mixSGA ratios from a measured per-layer sensitivity (the ``attention.layer_ratios`` ablation).

For every layer l and expert e, convert *only* layer l with every token in expert e (the other
layers keep expert 0, the native heads when expert 0 is native) and measure the mean next-token
loss on calibration blocks from the task's *training* split (never the evaluation split). The loss
increase over the all-expert-0 model is the sensitivity s[l][e]; ``allocate_layer_ratios`` then
solves the linear program "minimise the summed increase at mean budget B" (budget.py), which puts
the budget where the loss says it matters. Writes ``<out>/layer_allocation.json`` (sensitivities,
the ratios for each ``--budget``, the command) and prints the override for ``mixsga_train.train``:

    .venv/bin/python experiments/layer_allocation.py --budget 0.5 --out outputs/layer_alloc \\
        model=tiny_llama_mha8 model.source=local model.path=outputs/bench_replica_600/pretrain_mha/model \\
        task=shakespeare task.seq_len=160 attention.expert_kv_heads=[8,4,2]

Anything after the flags is a Hydra override of the training config (model, task, experts).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from mixsga_train import cli_checks  # noqa: E402
from mixsga_train.attention import AttentionConfig, convert_model  # noqa: E402
from mixsga_train.attention.budget import allocate_layer_ratios, format_ratio  # noqa: E402
from mixsga_train.config import to_run_config  # noqa: E402
from mixsga_train.data.text import lm_blocks  # noqa: E402
from mixsga_train.models.loading import load_model  # noqa: E402
from mixsga_train.pipeline import read_task  # noqa: E402


@torch.no_grad()
def mean_loss(model, blocks: torch.Tensor, batch: int) -> float:
    """Mean next-token loss over [N, L] blocks (every block the same length, so a mean of means)."""
    losses = [model(input_ids=b, labels=b).loss.item() for b in blocks.split(batch)]
    return sum(losses) / len(losses)


def layer_ratios_override(layer_ratios: list[list[float]]) -> str:
    """The Hydra override of per-layer ratios, e.g. ``attention.layer_ratios=[[1,0,0],[0,0,1]]``."""
    return "attention.layer_ratios=[" + ",".join("[" + ",".join(f"{x:g}" for x in r) + "]" for r in layer_ratios) + "]"


def one_hot_layers(
    num_layers: int, num_experts: int, layer: int | None, expert: int, others: int = 0
) -> list[list[int]]:
    """Every layer in expert ``others`` except ``layer`` (None: none) in ``expert``."""
    rows = [[int(e == others) for e in range(num_experts)] for _ in range(num_layers)]
    if layer is not None:
        rows[layer] = [int(e == expert) for e in range(num_experts)]
    return rows


def enumerate_allocations(loss_with, costs: list[float], num_layers: int, budget: float) -> list[dict]:
    """Every allocation giving each layer one expert with mean cost exactly ``budget``, measured
    jointly (all layers converted at once), best first: what the additive model approximates."""
    rows = []
    for choice in itertools.product(range(len(costs)), repeat=num_layers):
        if abs(sum(costs[e] for e in choice) / num_layers - budget) > 1e-9:
            continue
        layers = [[int(e == c) for e in range(len(costs))] for c in choice]
        rows.append({"layers": list(choice), "loss": loss_with(layers)})
    return sorted(rows, key=lambda r: r["loss"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=float, nargs="+", required=True, help="mean KV budget(s) to allocate, e.g. 0.5")
    p.add_argument("--tokens", type=int, default=16384, help="calibration tokens from the training split")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--out", required=True, help="folder for layer_allocation.json")
    p.add_argument(
        "--enumerate",
        action="store_true",
        help="also measure every one-expert-per-layer allocation at exactly each budget (small models only: E^L)",
    )
    p.add_argument("overrides", nargs="*", help="Hydra overrides: model=..., task=..., attention.expert_kv_heads=...")
    args = p.parse_args()
    cfg = to_run_config(cli_checks.job_config(cli_checks.compose(["attention=mixsga", *args.overrides])))
    cfg.validate()
    base, tokenizer = load_model(cfg.model)
    base.eval()
    text = read_task(cfg.task).text["train"]
    blocks = lm_blocks(text.text, tokenizer, cfg.task.seq_len, args.tokens, text.origin)
    num_layers = base.config.num_hidden_layers
    att = cfg.attention

    def loss_with(layer_ratios) -> float:
        model = copy.deepcopy(base)
        convert_model(model, AttentionConfig(**{**vars(att), "layer_ratios": layer_ratios}))
        return mean_loss(model, blocks, args.batch)

    resolved = AttentionConfig(**{**vars(att), "layer_ratios": None}).resolve(
        base.config.num_key_value_heads, num_layers
    )
    heads, native = resolved.expert_kv_heads, resolved.native_kv_heads
    costs = [k / native for k in heads]
    reference = loss_with(one_hot_layers(num_layers, len(heads), None, 0))
    sensitivity = []
    for layer in range(num_layers):
        row = [0.0]
        for expert in range(1, len(heads)):
            row.append(loss_with(one_hot_layers(num_layers, len(heads), layer, expert)) - reference)
        sensitivity.append(row)
        print(f"layer {layer:2d}: loss increase per expert {[round(s, 4) for s in row]}", flush=True)
    allocations = []
    for budget in args.budget:
        rounded = [[round(x, 4) for x in row] for row in allocate_layer_ratios(sensitivity, costs, budget)]
        allocated = sum(c * x for row in rounded for c, x in zip(costs, row)) / num_layers
        predicted = reference + sum(x * s for row, sens in zip(rounded, sensitivity) for x, s in zip(row, sens))
        uniform = [e for e, c in enumerate(costs) if abs(c - budget) < 1e-9]  # a single expert at this budget
        allocations.append(
            {
                "budget": budget,
                "allocated_budget": allocated,
                "layer_ratios": rounded,
                "override": layer_ratios_override(rounded),
                "predicted_loss": predicted,  # additive model: reference + sum of the chosen sensitivities
                "measured_loss": loss_with(rounded),  # the whole allocation converted at once
                "uniform_loss": loss_with(one_hot_layers(num_layers, len(heads), None, 0, uniform[0]))
                if uniform
                else None,
            }
        )
        print(f"{budget:g}: {' / '.join(format_ratio(r) for r in rounded)} (budget {allocated:.4f})")
        print(allocations[-1]["override"])
    if args.enumerate:
        for allocation in allocations:
            allocation["enumerated"] = enumerate_allocations(loss_with, costs, num_layers, allocation["budget"])
            best = allocation["enumerated"][0]
            print(f"{allocation['budget']:g}: best measured {best['layers']} loss {best['loss']:.4f}")
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "command": " ".join(["experiments/layer_allocation.py", *sys.argv[1:]]),
        "expert_kv_heads": heads,
        "calibration_tokens": int(blocks.numel()),
        "reference_loss": reference,
        "sensitivity": sensitivity,
        "allocations": allocations,
    }
    (out / "layer_allocation.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
