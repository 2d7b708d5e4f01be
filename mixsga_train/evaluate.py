"""``mixsga-evaluate`` / ``python -m mixsga_train.evaluate RUN_DIR [key=value ...]``: evaluate a
finished (or checkpointed) run again, e.g. on other eval sets, without training.

Reads the run's ``config.yaml``, applies the ``key=value`` overrides (OmegaConf dot-list, e.g.
``task.eval_sets=[dolly_test,/data/extra.jsonl]``), loads ``RUN_DIR/model`` (or ``--checkpoint
DIR``) with ``load_converted`` and writes ``RUN_DIR/eval_<name>.json``. A checkpoint converted
with another method or budget than the config says is refused.

``--harness TASKS`` evaluates the checkpoint with lm-evaluation-harness instead (comma-separated
lm-eval task names; ``--harness-include DIR`` adds task YAMLs of your own) and writes lm-eval's
results to ``RUN_DIR/harness.json`` (see ``harness.py``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from omegaconf import OmegaConf

from .config import to_run_config
from .errors import ConfigError, DataError

EXIT_CONFIG = 2


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mixsga-evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a run directory written by mixsga-train")
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    parser.add_argument("--checkpoint", type=Path, default=None, help="model directory (default: RUN_DIR/model)")
    parser.add_argument("--name", default=None, help="output file name: RUN_DIR/<name>.json (default eval, harness)")
    harness = parser.add_argument_group("lm-evaluation-harness")
    harness.add_argument("--harness", default=None, metavar="TASKS",
                         help="comma-separated lm-eval tasks, e.g. arc_easy,piqa")
    harness.add_argument("--harness-include", type=Path, default=None, metavar="DIR", help="folder of extra task YAMLs")
    harness.add_argument("--limit", type=int, default=None, help="at most this many documents per task")
    harness.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: the task's)")
    harness.add_argument("--routing", default="auto", choices=["auto", "argmax"], help="mixSGA routing (harness.py)")
    harness.add_argument("--batch-size", type=int, default=1, help="lm-eval batch size (> 1 needs --routing argmax)")
    return parser.parse_args(argv)


def check_checkpoint_matches(checkpoint: Path, resolved) -> None:
    """Refuse a checkpoint whose saved attention differs from the run config's."""
    from .attention.persistence import saved_attention

    if not (checkpoint / "config.json").is_file():
        raise ConfigError("--checkpoint", f"{checkpoint} has no config.json; give a model directory saved by mixsga-train")
    saved = saved_attention(checkpoint)
    def key(r):
        return (r.method, round(r.kv_budget, 6), r.expert_kv_heads, [round(x, 6) for x in r.ratio or []], r.cla_groups)

    saved_key = key(saved) if saved else ("mha", 1.0, None, [], None)
    wanted = key(resolved) if resolved.method != "mha" else ("mha", 1.0, None, [], None)
    if saved_key != wanted:
        got = saved.describe() if saved else "an unconverted model"
        raise ConfigError(
            "--checkpoint", f"{checkpoint} holds {got}, but the config asks for {resolved.describe()}; pass the matching run directory"
        )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        config_file = args.run_dir / "config.yaml"
        if not config_file.is_file():
            raise ConfigError("run_dir", f"{config_file} not found; give a run directory written by mixsga-train")
        cfg = OmegaConf.merge(OmegaConf.load(config_file), OmegaConf.from_dotlist(args.overrides))
        run_cfg = to_run_config(cfg)
        resolved = run_cfg.validate()
        checkpoint = args.checkpoint or args.run_dir / "model"
        check_checkpoint_matches(checkpoint, resolved)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    if args.harness is not None:
        evaluate_harness(args, checkpoint, resolved)
        return
    from .attention.persistence import load_converted, load_tokenizer
    from .pipeline import evaluate, load_task_data
    from .run_dir import write_json_atomic

    try:
        model = load_converted(checkpoint)
        tokenizer = load_tokenizer(checkpoint)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        results = evaluate(model, tokenizer, load_task_data(run_cfg, tokenizer), run_cfg)
    except (ConfigError, DataError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    out = args.run_dir / f"{args.name or 'eval'}.json"
    write_json_atomic(out, {"checkpoint": str(checkpoint), "attention": resolved.describe(), "eval": results})
    print(f"perplexity {results['ppl']:.3f} (causal routing {results['ppl_causal_routing']:.3f}); "
          f"KV bytes/token {results['kv_bytes_per_token']:.1f}; written to {out}")


def evaluate_harness(args: argparse.Namespace, checkpoint: Path, resolved) -> None:
    """``--harness``: lm-eval on the checkpoint; lm-eval's per-task results go to RUN_DIR/<name>.json."""
    from .harness import run_harness
    from .run_dir import write_json_atomic

    tasks = [t for t in args.harness.split(",") if t]
    try:
        if not tasks:
            raise ConfigError("--harness", "no task given; pass lm-eval task names, e.g. --harness arc_easy,piqa")
        if args.harness_include is not None and not args.harness_include.is_dir():
            raise ConfigError("--harness-include", f"{args.harness_include} is not a directory of task YAMLs")
        results = run_harness(checkpoint, tasks, args.harness_include, args.limit, args.num_fewshot, args.routing,
                              args.batch_size)
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    out = args.run_dir / f"{args.name or 'harness'}.json"
    payload = {"checkpoint": str(checkpoint), "attention": resolved.describe(), "routing": args.routing,
               "results": results["results"], "n-shot": results.get("n-shot"), "versions": results.get("versions")}
    plain = json.loads(json.dumps(payload, default=lambda v: v.item() if hasattr(v, "item") else str(v)))  # numpy -> JSON
    write_json_atomic(out, plain)
    for task, values in results["results"].items():
        shown = ", ".join(f"{k} {v:.4f}" for k, v in values.items() if isinstance(v, float) and "stderr" not in k)
        print(f"{task}: {shown}")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
