"""Does token routing pay? Exact-delta oracle routing against position and random baselines.

For a mixSGA model over experts [full, cheap] (SmolLM2: [3, 1] KV heads) and Wikitext-2 blocks,
every token t of a block gets two exactly measured loss changes (summed NLL of the block):

* promote_t: all tokens in the cheap expert except t in the full one, minus all cheap. The
  oracle routing at a budget gives the full expert to the k tokens with the most negative
  promote_t (k = the full expert's share of the block, the same k every other routing gets);
* demote_t: all tokens full (the original model) except t cheap, minus all full: the paper's
  Figure 1 (there: one token's K/V mean-pooled over all KV heads), as a % change of the block's
  perplexity, with a position control (how much of it position alone explains).

The same expert is used in every layer for a token (a token-level oracle; layer-level allocation is
``layer_allocation.py``'s). The first-order estimate of promote_t is what the counterfactual router
gradient sees (``<KV_full - KV_cheap, dL/dKV>`` summed over layers), compared with the exact one.
Routings compared at each budget, all with exactly k full tokens per block: the exact oracle, the
first-order oracle, the first k positions, the sink (token 0) + random others, uniform random
(3 draws), and the model's own learned top-k; plus GQA at the same budget where it exists.

    OMP_NUM_THREADS=1 .venv/bin/python experiments/oracle_routing.py [--checkpoint outputs/.../model] \
        [--blocks 4 --seq-len 128] [--out experiments/results/oracle_routing/smollm2_conversion]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from mixsga_train.attention import AttentionConfig, convert_model, converted, routing_context
from mixsga_train.attention.persistence import load_converted, load_tokenizer
from mixsga_train.data.files import read_utf8
from mixsga_train.data.text import lm_blocks
from mixsga_train.models.gguf import load_smollm2_135m

ROOT = Path(__file__).resolve().parents[1]
FULL, CHEAP = 0, 1


def block_nll(model, ids: torch.Tensor, assignment: torch.Tensor | None, mode: str = "fixed") -> torch.Tensor:
    """[B] summed next-token NLL of ``ids`` [B, L] with every layer routing token t to ``assignment``
    [B, L] (``fixed``), or under the model's own routing ``mode`` (assignment None)."""
    ctx = routing_context(model)
    ctx.mode = mode
    if assignment is not None:
        ctx.fixed_ids = {layer: assignment for layer in range(model.config.num_hidden_layers)}
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
    nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    return nll.sum(1)


@torch.no_grad()
def exact_deltas(model, block: torch.Tensor, base: int, batch: int) -> torch.Tensor:
    """[L] NLL change of moving each token alone from expert ``base`` (all tokens) to the other one."""
    length = block.shape[0]
    flipped = 1 - base
    reference = block_nll(model, block[None], torch.full((1, length), base))[0]
    deltas = torch.zeros(length)
    for start in range(0, length - 1, batch):  # the last token's K/V is seen by no prediction
        ts = torch.arange(start, min(start + batch, length - 1))
        assignment = torch.full((len(ts), length), base)
        assignment[torch.arange(len(ts)), ts] = flipped
        deltas[ts] = block_nll(model, block.expand(len(ts), -1), assignment) - reference
    return deltas


def first_order_promote(model, block: torch.Tensor) -> torch.Tensor:
    """[L] first-order NLL change of promoting each token from the cheap to the full expert, summed
    over layers: the counterfactual router gradient dL/ds_full at the all-cheap routing."""
    logits = []

    def keep(_module, _inputs, out):
        out.retain_grad()
        logits.append(out)

    hooks = [r.proj.register_forward_hook(keep) for r in converted(model).routers]
    try:
        for r in converted(model).routers:
            r.router_grad = "counterfactual"
        model.zero_grad(set_to_none=True)
        block_nll(model, block[None], torch.full((1, block.shape[0]), CHEAP)).sum().backward()
    finally:
        for h in hooks:
            h.remove()
    total = torch.zeros(block.shape[0])
    for z in logits:
        s = torch.sigmoid(z.detach().float())[0, :, FULL]
        total += (z.grad[0, :, FULL].float() / (s * (1 - s)).clamp_min(1e-12)).cpu()  # dL/ds from dL/dz
    return total


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def routings(promote, first_order, length: int, k: int, generator) -> dict[str, torch.Tensor]:
    """name -> [L] assignment with exactly k full tokens."""

    def with_full(idx):
        a = torch.full((length,), CHEAP)
        a[idx] = FULL
        return a

    out = {
        "oracle_exact": with_full(promote.argsort()[:k]),
        "oracle_first_order": with_full(first_order.argsort()[:k]),
        "first_positions": with_full(torch.arange(k)),
        "sink_plus_random": with_full(
            torch.cat([torch.tensor([0]), 1 + torch.randperm(length - 1, generator=generator)[: k - 1]])
        ),
    }
    for draw in range(3):
        out[f"random_{draw}"] = with_full(torch.randperm(length, generator=generator)[:k])
    return out


def ppl(nll: float, tokens: int) -> float:
    return math.exp(nll / tokens)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="a converted mixSGA [full, cheap] model (default: SmolLM2 at conversion)",
    )
    p.add_argument("--data", default="../shared/data/wikitext-2/test.txt")
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument(
        "--budgets", nargs="+", default=["1:1", "1:3"], help="ratios over [full, cheap]: 67%% and 50%% for [3, 1]"
    )
    p.add_argument("--out", type=Path, default=Path("experiments/results/oracle_routing/smollm2_conversion"))
    args = p.parse_args()
    torch.manual_seed(0)
    if args.checkpoint is None:
        base, tokenizer = load_smollm2_135m()
        model = copy.deepcopy(base)
        convert_model(model, AttentionConfig(method="mixsga", expert_kv_heads=[3, 1], ratio=args.budgets[0]))
    else:
        base, model, tokenizer = None, load_converted(args.checkpoint), load_tokenizer(args.checkpoint)
    model.eval()
    text = read_utf8(ROOT / args.data).lstrip("\ufeff")
    blocks = lm_blocks(text, tokenizer, args.seq_len, args.blocks * args.seq_len, args.data)
    tokens = blocks.shape[0] * (args.seq_len - 1)
    generator = torch.Generator().manual_seed(0)
    per_block = []
    for i, block in enumerate(blocks):
        promote = exact_deltas(model, block, CHEAP, args.batch)
        demote = exact_deltas(model, block, FULL, args.batch)
        first = first_order_promote(model, block)
        with torch.no_grad():
            full = float(block_nll(model, block[None], torch.full((1, args.seq_len), FULL))[0])
            cheap = float(block_nll(model, block[None], torch.full((1, args.seq_len), CHEAP))[0])
        per_block.append(dict(promote=promote, demote=demote, first=first, full=full, cheap=cheap))
        print(f"block {i}: deltas measured", flush=True)
    summary = {
        "checkpoint": str(args.checkpoint) if args.checkpoint else "SmolLM2-135M at conversion",
        "blocks": blocks.shape[0],
        "seq_len": args.seq_len,
        "scored_tokens": tokens,
        "ppl_all_full": ppl(sum(b["full"] for b in per_block), tokens),
        "ppl_all_cheap": ppl(sum(b["cheap"] for b in per_block), tokens),
    }
    promote_all = torch.cat([b["promote"][:-1] for b in per_block])
    first_all = torch.cat([b["first"][:-1] for b in per_block])
    demote_all = torch.cat([b["demote"][:-1] for b in per_block])
    positions = torch.cat([torch.arange(args.seq_len - 1) for _ in per_block]).double()
    summary["first_order_vs_exact"] = {
        "spearman": spearman(first_all, promote_all),
        "sign_agreement": float(((first_all < 0) == (promote_all < 0)).double().mean()),
    }
    demote_pct = torch.cat(
        [100 * (torch.exp(b["demote"][:-1] / (args.seq_len - 1)) - 1) for b in per_block]
    )  # % change of the block's perplexity (paper Fig. 1)
    quantiles = torch.quantile(demote_pct.double(), torch.tensor([0.5, 0.9, 0.99, 1.0], dtype=torch.float64))
    summary["figure1_demote_one_token"] = {
        "ppl_change_pct_quantiles_50_90_99_max": quantiles.tolist(),
        "token0_ppl_change_pct_mean": float(
            torch.stack([100 * (torch.exp(b["demote"][0] / (args.seq_len - 1)) - 1) for b in per_block]).mean()
        ),
        "spearman_with_position": spearman(demote_all, -positions),
        "spearman_with_position_without_token0": spearman(demote_all[positions > 0], -positions[positions > 0]),
        "promote_spearman_with_position": spearman(promote_all, positions),
    }
    results = {}
    budgets = args.budgets if base is not None else [":".join(f"{r:g}" for r in converted(model).attention.ratio)]
    for ratio in budgets:
        full_share = [float(x) for x in ratio.split(":")]
        full_share = full_share[0] / sum(full_share)
        k = round(full_share * args.seq_len)
        if base is not None:  # the routers a conversion at this ratio starts from (untrained)
            learned = copy.deepcopy(base)
            convert_model(learned, AttentionConfig(method="mixsga", expert_kv_heads=[3, 1], ratio=ratio))
            learned.eval()
        else:
            learned = model
        nll: dict[str, float] = {}
        for b, block in zip(per_block, blocks):
            for name, a in routings(b["promote"], b["first"], args.seq_len, k, generator).items():
                with torch.no_grad():
                    nll[name] = nll.get(name, 0.0) + float(block_nll(model, block[None], a[None])[0])
            for mode in ("topk", "causal"):  # the router's own per-layer routing (its decode policy under causal)
                with torch.no_grad():
                    nll[f"learned_{mode}"] = nll.get(f"learned_{mode}", 0.0) + float(
                        block_nll(learned, block[None], None, mode=mode)[0]
                    )
        row = {name: ppl(v, tokens) for name, v in nll.items()}
        row["random_mean"] = sum(row.pop(f"random_{d}") for d in range(3)) / 3
        if base is not None and ratio == "1:1":  # 67% for [3, 1]: GQA with 2 of 3 KV heads
            gqa = copy.deepcopy(base)
            convert_model(gqa, AttentionConfig(method="gqa", kv_heads=2))
            with torch.no_grad():
                gqa_nll = sum(
                    float(F.cross_entropy(gqa(input_ids=blk[None]).logits[0, :-1].float(), blk[1:], reduction="sum"))
                    for blk in blocks
                )
            row["gqa_2kv"] = ppl(gqa_nll, tokens)
        results[ratio] = {"full_tokens_per_block": k, "ppl": row}
    summary["routings"] = results
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    torch.save(
        {"promote": promote_all, "first_order": first_all, "demote": demote_all, "positions": positions},
        out / "deltas.pt",
    )
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
