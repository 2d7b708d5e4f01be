"""``mixsga-evaluate`` / ``python -m mixsga_train.evaluate RUN_DIR [key=value ...]``: evaluate a
finished (or checkpointed) run again, e.g. on other eval sets, without training.

Reads the run's ``config.yaml``, applies the overrides: group choices (``task=dolly``) replace the
whole group with the shipped option, then ``key=value`` (OmegaConf dot-list, e.g.
``task.eval_sets=[dolly_test,/data/extra.jsonl]``) set single keys. Loads ``RUN_DIR/model`` (or
``--checkpoint DIR``) with ``load_converted`` and writes ``RUN_DIR/<name>.json`` (``--name``, default
``eval``). A checkpoint converted with another method or budget than the config says is refused, and
so is a name the run already uses (``metrics``, ``eval_before``, ..., or an earlier evaluation's):
finished results are never overwritten.

``--harness TASKS`` evaluates the checkpoint with lm-evaluation-harness instead (comma-separated
lm-eval task names; ``--harness-include DIR`` adds task YAMLs of your own) and writes lm-eval's
results to ``RUN_DIR/harness.json`` (see ``harness.py``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .cli_checks import CONF_DIR, check_group_choices
from .config import to_run_config
from .errors import EXIT_CONFIG, ConfigError, DataError, StorageError
from .metrics import EvalMetrics
from .run_dir import check_output_name, write_json_atomic


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mixsga-evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a run directory written by mixsga-train")
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    parser.add_argument("--checkpoint", type=Path, default=None, help="model directory (default: RUN_DIR/model)")
    parser.add_argument("--name", default=None, help="output file name: RUN_DIR/<name>.json (default eval, harness)")
    harness = parser.add_argument_group("lm-evaluation-harness")
    harness.add_argument(
        "--harness", default=None, metavar="TASKS", help="comma-separated lm-eval tasks, e.g. arc_easy,piqa"
    )
    harness.add_argument("--harness-include", type=Path, default=None, metavar="DIR", help="folder of extra task YAMLs")
    harness.add_argument("--limit", type=int, default=None, help="at most this many documents per task")
    harness.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: the task's)")
    harness.add_argument(
        "--routing", default="auto", choices=["auto", "causal", "argmax"], help="mixSGA routing (harness.py)"
    )
    harness.add_argument("--batch-size", type=int, default=1, help="lm-eval batch size (> 1 needs --routing argmax)")
    return parser.parse_args(argv)


def apply_overrides(cfg, overrides: list[str]):
    """``cfg`` with the group choices among ``overrides`` (``task=dolly``: the shipped
    ``conf/task/dolly.yaml`` replaces ``cfg.task``) and then the ``key=value`` ones applied."""
    groups = [o for o in overrides if "=" in o and (CONF_DIR / o.split("=", 1)[0]).is_dir()]
    keys = [o for o in overrides if o not in groups]
    if groups:
        from hydra import compose, initialize_config_dir

        check_group_choices(groups)
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            chosen = compose(config_name="config", overrides=groups)
        for group in (g.split("=", 1)[0] for g in groups):
            cfg[group] = chosen[group]
    return OmegaConf.merge(cfg, OmegaConf.from_dotlist(keys))


def check_checkpoint_matches(checkpoint: Path, resolved) -> None:
    """Refuse a checkpoint whose saved attention differs from the run config's."""
    from .attention.persistence import saved_attention

    if not (checkpoint / "config.json").is_file():
        raise ConfigError(
            "--checkpoint", f"{checkpoint} has no config.json; give a model directory saved by mixsga-train"
        )
    saved = saved_attention(checkpoint)
    unconverted = ("mha", 1.0)  # what an unconverted model and method mha both hold
    if (saved.weights_key() if saved else unconverted) != resolved.weights_key():
        got = saved.describe() if saved else "an unconverted model"
        raise ConfigError(
            "--checkpoint",
            f"{checkpoint} holds {got}, but the config asks for {resolved.describe()}; pass the matching run directory",
        )


def apply_inference_settings(model, resolved) -> None:
    """The run config's routing settings that do not change the weights (``decode_policy``,
    ``sink_tokens``, ``decode_slack``), so ``attention.decode_policy=...`` re-evaluates a checkpoint
    under another policy."""
    from .attention import converted

    handle = converted(model)
    if handle is not None:
        settings = resolved.routing_context()
        handle.context.decode_policy = settings.decode_policy
        handle.context.sink_tokens = settings.sink_tokens
        handle.context.decode_slack = settings.decode_slack


def read_config(config_file: Path, overrides: list[str]):
    """The run's saved config with the overrides (``apply_overrides``); unreadable YAML or a bad
    override is a ConfigError."""
    try:
        return apply_overrides(OmegaConf.load(config_file), overrides)
    except (OmegaConfBaseException, yaml.YAMLError, ValueError) as err:
        reason = str(err).strip().splitlines()[0]
        raise ConfigError(
            str(config_file), f"cannot read it with the overrides {overrides} ({reason}); fix the file or the override"
        ) from None


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    args.name = args.name or ("harness" if args.harness is not None else "eval")
    try:
        config_file = args.run_dir / "config.yaml"
        if not config_file.is_file():
            raise ConfigError("run_dir", f"{config_file} not found; give a run directory written by mixsga-train")
        cfg = read_config(config_file, args.overrides)
        run_cfg = to_run_config(cfg)
        resolved = run_cfg.validate()
        checkpoint = args.checkpoint or args.run_dir / "model"
        check_checkpoint_matches(checkpoint, resolved)
        out = check_output_name(args.run_dir, args.name)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    if args.harness is not None:
        evaluate_harness(args, checkpoint, resolved)
        return
    from .attention.persistence import load_converted, load_tokenizer
    from .pipeline import evaluate, load_task_data

    try:
        model = load_converted(checkpoint)
        apply_inference_settings(model, resolved)
        tokenizer = load_tokenizer(checkpoint)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        results = evaluate(model, tokenizer, load_task_data(run_cfg, tokenizer), run_cfg)
    except (ConfigError, DataError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    try:
        check_output_name(args.run_dir, args.name)  # again: another evaluation may have written it meanwhile
        write_json_atomic(
            out, {"checkpoint": str(checkpoint), "attention": resolved.describe(), "eval": results.to_json()}
        )
    except (ConfigError, StorageError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    track_reevaluation(run_cfg, resolved, args, checkpoint, results)
    print(f"{evaluation_line(results)}; written to {out}")


def evaluation_line(results: EvalMetrics) -> str:
    """One line of what an evaluation measured (no KV bytes when nothing was generated)."""
    line = f"perplexity {results.ppl_causal_routing:.3f} causal routing (top-k {results.ppl:.3f}, non-causal)"
    if results.kv_bytes_per_token is not None:
        line += f"; KV bytes/real token {results.kv_bytes_per_token:.1f}"
    return line


def track_reevaluation(run_cfg, resolved, args: argparse.Namespace, checkpoint: Path, results: EvalMetrics) -> None:
    """Log the re-evaluation as its own W&B run (job type ``evaluate``) in the run's group, when
    the run's logger (or a ``logger=...`` override) tracks."""
    from .pipeline import run_tags, track_eval
    from .tracking import run_name, start_tracker

    ratio = resolved.summary_fields()["ratio"]
    name = f"{run_name(resolved.method, resolved.kv_budget, ratio, run_cfg.seed)}-{args.name}"
    config = {"run_dir": str(args.run_dir), "checkpoint": str(checkpoint), "overrides": args.overrides}
    tracker = start_tracker(
        run_cfg.logger,
        args.run_dir,
        name,
        run_cfg.experiment_name,
        run_tags(resolved),
        config,
        is_main=True,
        job_type="evaluate",
        id_label=args.name,
    )
    track_eval(tracker, args.name, results, 0)
    tracker.summary({args.name: results})
    tracker.finish()


def evaluate_harness(args: argparse.Namespace, checkpoint: Path, resolved) -> None:
    """``--harness``: lm-eval on the checkpoint; lm-eval's per-task results go to RUN_DIR/<name>.json."""
    from .harness import run_harness

    tasks = [t for t in args.harness.split(",") if t]
    try:
        if not tasks:
            raise ConfigError("--harness", "no task given; pass lm-eval task names, e.g. --harness arc_easy,piqa")
        if args.harness_include is not None and not args.harness_include.is_dir():
            raise ConfigError("--harness-include", f"{args.harness_include} is not a directory of task YAMLs")
        results = run_harness(
            checkpoint, tasks, args.harness_include, args.limit, args.num_fewshot, args.routing, args.batch_size
        )
        out = check_output_name(args.run_dir, args.name)  # again: another evaluation may have written it meanwhile
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    payload = {
        "checkpoint": str(checkpoint),
        "attention": resolved.describe(),
        "routing": args.routing,
        "results": results["results"],
        "n-shot": results.get("n-shot"),
        "versions": results.get("versions"),
    }
    plain = json.loads(
        json.dumps(payload, default=lambda v: v.item() if hasattr(v, "item") else str(v))
    )  # numpy -> JSON
    write_json_atomic(out, plain)
    for task, values in results["results"].items():
        shown = ", ".join(f"{k} {v:.4f}" for k, v in values.items() if isinstance(v, float) and "stderr" not in k)
        print(f"{task}: {shown}")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
