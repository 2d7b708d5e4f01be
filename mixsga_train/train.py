"""``mixsga-train`` / ``python -m mixsga_train.train``: compose the Hydra config, validate it,
then convert, train, evaluate and write ``metrics.json`` in the run directory.

Single process needs no launcher. Multi-process: ``torchrun --nproc_per_node=N -m
mixsga_train.train hydra.run.dir=DIR ...`` or ``deepspeed --no_local_rank --num_gpus=N
$(which mixsga-train) hydra.run.dir=DIR ...`` (pin hydra.run.dir so all ranks agree).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import NoReturn

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from .cli_checks import check_group_choices
from .errors import ConfigError, DataError
from .run_dir import refuse_finished
from .sweep import JobFailed, in_multirun, run_job

log = logging.getLogger(__name__)

EXIT_CONFIG, EXIT_DIVERGED, EXIT_INTERRUPTED = 2, 3, 130


def fail(message: str, code: int) -> NoReturn:
    """Print the one error line and end the run with ``code`` (a multirun records it and goes on)."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise JobFailed(message, code)


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def _main(cfg: DictConfig) -> float | None:
    """The Hydra task. In a multirun it returns the job's objective (sweep.objective) for the sweeper."""
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    if in_multirun():
        return run_job(cfg, run_dir, lambda: _run(cfg, run_dir), fail, EXIT_CONFIG, EXIT_INTERRUPTED)
    _run(cfg, run_dir)
    return None


def _run(cfg: DictConfig, run_dir: Path) -> dict:
    """Validate, run the pipeline in ``run_dir``, print the summary; returns the metrics."""
    # torch, transformers and DeepSpeed take seconds to import: only here, after Hydra has
    # answered --help / --cfg, and the pipeline itself only after the config validated.
    from .config import to_run_config
    from .training.distributed import launcher_rank
    from .training.loop import TrainingDiverged, TrainingInterrupted

    try:
        run_cfg = to_run_config(cfg)
        resolved = run_cfg.validate()
    except ConfigError as err:
        fail(str(err), EXIT_CONFIG)
    print(f"attention: {resolved.describe()}", flush=True)
    from .pipeline import run

    try:
        metrics = run(run_cfg, resolved, run_dir, OmegaConf.to_container(cfg, resolve=True))
    except (ConfigError, DataError) as err:
        fail(str(err), EXIT_CONFIG)
    except TrainingDiverged as err:
        fail(str(err), EXIT_DIVERGED)
    except TrainingInterrupted as err:
        fail(str(err), EXIT_INTERRUPTED)
    except KeyboardInterrupt:
        fail(f"interrupted outside a checkpointed training step; {run_dir} keeps its last complete checkpoint, if any; "
             "rerun the same command with trainer.resume=auto", EXIT_INTERRUPTED)
    if launcher_rank() == 0:
        print(summary(metrics, run_dir), flush=True)
    return metrics


def summary(metrics: dict, run_dir: Path) -> str:
    """The few numbers a person wants after a run; causal-routing perplexity first (the headline)."""
    budget = metrics["kv_budget"]
    lines = [f"run: {metrics['model']} {metrics['method']} ({100 * budget:.1f}% KV nominal) on {metrics['task']}"]
    before, after = metrics.get("eval_before"), metrics["eval"]
    for label, block in (("before training:", before), ("after training: ", after)):
        if block is not None:
            lines.append(f"perplexity {label} {block['ppl_causal_routing']:.2f} causal routing; "
                         f"top-k {block['ppl']:.2f} (paper protocol, non-causal: sees the whole block)")
    for name, value in after["rouge_l"].items():
        lines.append(f"ROUGE-L {name}: {value:.2f}")
    native = metrics["kv_bytes_per_token_native"]
    for label, key in (("prefill", "kv_bytes_per_token"), ("decode", "kv_bytes_per_token_decode")):
        value = after.get(key)
        if value is not None:
            lines.append(f"KV bytes per real token, {label}: {value:.1f} measured vs {native} native "
                         f"({100 * value / native:.1f}%, nominal {100 * budget:.1f}%)")
    decode = (after.get("expert_fractions") or {}).get("decode")
    if decode:
        lines.append("realised decode expert fractions: " + "/".join(f"{f:.2f}" for f in decode))
    train = metrics["train"]
    if train:
        lines.append(f"trained {train['steps']} steps, {train['tokens']} tokens in {train['seconds']:.0f} s "
                     f"({train['tokens_per_s']:.0f} tok/s), final loss {train['final_loss']:.4f}")
    lines.append(f"run directory: {run_dir}")
    return "\n".join(lines)


def main() -> None:
    try:
        check_group_choices(sys.argv[1:])
        refuse_finished(sys.argv[1:])
    except ConfigError as err:
        fail(str(err), EXIT_CONFIG)
    from .training.distributed import worker_overrides

    sys.argv += worker_overrides()
    _main()


if __name__ == "__main__":
    main()
