"""`make bench-h2o`: H2O token eviction stacked on GQA and on mixSGA (the paper's Table 3).

Takes the SFT checkpoints of ``experiments/bench_sft.py`` (SmolLM2-135M, Dolly) and, for every keep
ratio, compresses each prompt by H2O after prefill (``mixsga_train/evaluation/eviction.py``: kvpress's
observed-attention scores, heavy hitters + a recent window, per layer, on the method's own cache),
then scores the response tokens of the held-out Dolly test split (perplexity) and generates greedy
responses for ROUGE-L. It reports the prompt KV the kept tokens really hold, as a share of the
native cache. The unconverted model is evaluated as GQA at its full 3 KV heads (exactly the
original, tested) because eviction needs the budget cache. One JSON per (run, keep ratio) under
``--results``; an existing one is skipped, so the script resumes.

    OMP_NUM_THREADS=1 .venv/bin/python experiments/bench_h2o.py [--runs gqa_2kv_67 mixsga_67_1-1] \
        [--seeds 0 1] [--keep 1.0 0.8 0.6 0.4 0.2] [--rouge-examples 50]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from mixsga_train.attention import AttentionConfig, convert_model, converted
from mixsga_train.attention.persistence import load_converted, load_tokenizer
from mixsga_train.config import to_run_config
from mixsga_train.evaluate import read_config
from mixsga_train.evaluation.eviction import evicted_response_nll, generate_with_eviction
from mixsga_train.pipeline import load_task_data

ROOT = Path(__file__).resolve().parents[1]


def load_run(run_dir: Path):
    """(model, tokenizer, task data, run config) of a finished bench-sft run; the unconverted model
    converted to GQA at its full KV heads (the same function, with the budget cache)."""
    run_cfg = to_run_config(read_config(run_dir / "config.yaml", []))
    model = load_converted(run_dir / "model").eval()
    tokenizer = load_tokenizer(run_dir / "model")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if converted(model) is None:
        convert_model(model, AttentionConfig(method="gqa", kv_heads=model.config.num_key_value_heads))
    return model, tokenizer, load_task_data(run_cfg, tokenizer), run_cfg


def evaluate_keep(model, tokenizer, data, run_cfg, keep: float, rouge_examples: int) -> dict:
    started = time.time()
    nll, tokens, kept_ppl = 0.0, 0, []
    for batch in data.test_batches:
        batch_nll, batch_tokens, evicted = evicted_response_nll(model, batch, keep)
        nll, tokens = nll + batch_nll, tokens + batch_tokens
        kept_ppl.append(evicted)
    task = run_cfg.task
    examples = data.eval_sets["dolly_test"][:rouge_examples]
    _, rouge, evicted = generate_with_eviction(
        model, tokenizer, examples, keep, task.max_new_tokens, run_cfg.trainer.eval_batch_size, task.max_prompt_len
    )
    kept = sum(float(e.kept_bytes.sum()) for e in kept_ppl)
    native = sum(float(e.native_bytes.sum()) for e in kept_ppl)
    return {
        "keep_ratio": keep,
        "response_ppl": math.exp(nll / tokens),
        "response_tokens": tokens,
        "prompt_kv_share_ppl": kept / native,
        "rouge_l_dolly_test": rouge,
        "rouge_examples": len(examples),
        "prompt_kv_share_rouge": evicted.kept_share,
        "seconds": time.time() - started,
    }


def table(results: Path) -> str:
    """Markdown: mean over seeds per (run, keep ratio), with each seed's numbers."""
    rows: dict[tuple[str, float], list[dict]] = {}
    for path in sorted(results.glob("*.json")):
        r = json.loads(path.read_text())
        rows.setdefault((r["method"], r["keep_ratio"]), []).append(r)
    lines = [
        "| method | keep ratio | prompt KV kept, % of native | response ppl (seeds) | mean | "
        "ROUGE-L Dolly test (seeds) | mean |",
        "|---|---:|---:|---|---:|---|---:|",
    ]
    for (method, keep), rs in sorted(rows.items(), key=lambda kv: (kv[0][0], -kv[0][1])):
        rs.sort(key=lambda r: r["seed"])
        ppl = [r["response_ppl"] for r in rs]
        rouge = [r["rouge_l_dolly_test"] for r in rs]
        share = sum(r["prompt_kv_share_ppl"] for r in rs) / len(rs)
        lines.append(
            f"| {method} | {keep:.0%} | {100 * share:.1f}% | {' / '.join(f'{p:.2f}' for p in ppl)} | "
            f"{sum(ppl) / len(ppl):.2f} | {' / '.join(f'{x:.2f}' for x in rouge)} | {sum(rouge) / len(rouge):.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sft-out", default="outputs/bench_sft", help="bench_sft.py's run directories")
    p.add_argument("--results", default="experiments/results/bench_h2o")
    p.add_argument("--runs", nargs="+", default=["gqa_2kv_67", "mixsga_67_1-1"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--keep", type=float, nargs="+", default=[1.0, 0.8, 0.6, 0.4, 0.2])
    p.add_argument("--rouge-examples", type=int, default=50)
    args = p.parse_args()
    torch.manual_seed(0)
    results = ROOT / args.results
    results.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        for name in args.runs:
            run_dir = ROOT / args.sft_out / f"{name}_s{seed}"
            todo = [k for k in args.keep if not (results / f"{name}_s{seed}_keep{k:g}.json").is_file()]
            if not todo:
                continue
            if not (run_dir / "model").is_dir():
                print(f"[missing] {run_dir.relative_to(ROOT)}: run experiments/bench_sft.py first", flush=True)
                continue
            model, tokenizer, data, run_cfg = load_run(run_dir)
            for keep in todo:
                out = evaluate_keep(model, tokenizer, data, run_cfg, keep, args.rouge_examples)
                out.update(method=name, seed=seed, run=str(run_dir.relative_to(ROOT)))
                (results / f"{name}_s{seed}_keep{keep:g}.json").write_text(json.dumps(out, indent=2) + "\n")
                print(f"[done] {name}_s{seed} keep {keep:g}: {out}", flush=True)
    (results / "table.md").write_text(table(results))
    print(table(results))


if __name__ == "__main__":
    main()
