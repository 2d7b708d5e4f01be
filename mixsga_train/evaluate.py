"""``mixsga-evaluate`` / ``python -m mixsga_train.evaluate RUN_DIR [key=value ...]``: evaluate a
finished (or checkpointed) run again, e.g. on other eval sets, without training.

Reads the run's ``config.yaml``, applies the ``key=value`` overrides (OmegaConf dot-list, e.g.
``task.eval_sets=[dolly_test,/data/extra.jsonl]``), loads ``RUN_DIR/model`` (or ``--checkpoint
DIR``) with ``load_converted`` and writes ``RUN_DIR/<name>.json`` (``--name``, default ``eval``). A
checkpoint converted with another method or budget than the config says is refused, and so is a
name the run already uses (``metrics``, ``eval_before``, ..., or an earlier evaluation's): finished
results are never overwritten.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .config import to_run_config
from .errors import EXIT_CONFIG, ConfigError, DataError, StorageError
from .run_dir import check_output_name, write_json_atomic


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mixsga-evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a run directory written by mixsga-train")
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    parser.add_argument("--checkpoint", type=Path, default=None, help="model directory (default: RUN_DIR/model)")
    parser.add_argument("--name", default="eval", help="output file name: RUN_DIR/<name>.json (a new name)")
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


def read_config(config_file: Path, overrides: list[str]):
    """The run's saved config with ``key=value`` overrides; unreadable YAML or a bad override is a ConfigError."""
    try:
        return OmegaConf.merge(OmegaConf.load(config_file), OmegaConf.from_dotlist(overrides))
    except (OmegaConfBaseException, yaml.YAMLError, ValueError) as err:
        reason = str(err).strip().splitlines()[0]
        raise ConfigError(str(config_file), f"cannot read it with the overrides {overrides} ({reason}); "
                                            "fix the file or the override") from None


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
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
    from .attention.persistence import load_converted
    from .pipeline import evaluate, load_task_data
    from transformers import AutoTokenizer

    try:
        model = load_converted(checkpoint)
        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        results = evaluate(model, tokenizer, load_task_data(run_cfg, tokenizer), run_cfg)
    except (ConfigError, DataError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    try:
        check_output_name(args.run_dir, args.name)  # again: another evaluation may have written it meanwhile
        write_json_atomic(out, {"checkpoint": str(checkpoint), "attention": resolved.describe(), "eval": results})
    except (ConfigError, StorageError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    print(f"perplexity {results['ppl']:.3f} (causal routing {results['ppl_causal_routing']:.3f}); "
          f"KV bytes/token {results['kv_bytes_per_token']:.1f}; written to {out}")


if __name__ == "__main__":
    main()
