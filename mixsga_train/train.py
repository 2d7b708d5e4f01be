"""``mixsga-train`` / ``python -m mixsga_train.train``: compose the Hydra config, validate it,
then convert, train, evaluate and write ``metrics.json`` in the run directory.

Single process needs no launcher. Multi-process: ``torchrun --nproc_per_node=N -m
mixsga_train.train hydra.run.dir=DIR ...`` or ``deepspeed --no_local_rank --num_gpus=N
$(which mixsga-train) hydra.run.dir=DIR ...`` (pin hydra.run.dir so all ranks agree).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from pathlib import Path
from typing import NoReturn

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from . import cli_checks
from .cli_checks import check_group_choices
from .errors import EXIT_CONFIG, EXIT_INTERRUPTED, ConfigError, DataError, StorageError
from .run_dir import check_run_dir, hold_run_dir, refuse_finished
from .sweep import JobFailed, in_multirun, run_job

log = logging.getLogger(__name__)

VERBOSE_FLAG = "--verbose"
INTERRUPTED = ("interrupted outside a checkpointed training step; {run_dir} keeps its last complete checkpoint, "
               "if any; rerun the same command with trainer.resume=auto")


def fail(message: str, code: int, detail: str | None = None) -> NoReturn:
    """The one place a run ends with an error: one ``error:`` line (plus ``detail``, e.g. Hydra's
    full message under ``--verbose``), then ``JobFailed`` (a SystemExit with ``code``; a multirun
    records it and goes on with the next job). Outside a multirun, further SIGINT/SIGTERM are
    ignored from here on, so a second Ctrl-C cannot turn the exit into a traceback."""
    if not in_multirun():
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_IGN)
    print(f"error: {message}", file=sys.stderr, flush=True)
    if detail:
        print(detail, file=sys.stderr, flush=True)
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
        with job_lock(run_dir):
            metrics = run(run_cfg, resolved, run_dir, OmegaConf.to_container(cfg, resolve=True))
    except (ConfigError, DataError, StorageError, TrainingDiverged, TrainingInterrupted) as err:
        fail(str(err), err.exit_code)
    except KeyboardInterrupt:
        fail(INTERRUPTED.format(run_dir=run_dir), EXIT_INTERRUPTED)
    if launcher_rank() == 0:
        print(summary(metrics, run_dir), flush=True)
    return metrics


def job_lock(run_dir: Path):
    """A multirun job's lock on its own directory (a single run's is taken in ``main``, before Hydra)."""
    from .training.distributed import launcher_rank

    if HydraConfig.get().mode == RunMode.MULTIRUN and launcher_rank() == 0:
        return hold_run_dir(run_dir)
    return contextlib.nullcontext()


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
    """Check the command line, claim the run directory, then hand over to Hydra."""
    from .training.distributed import launcher_rank, worker_overrides

    verbose = VERBOSE_FLAG in sys.argv or os.environ.get("HYDRA_FULL_ERROR") == "1"
    sys.argv = [arg for arg in sys.argv if arg != VERBOSE_FLAG]
    with signals_interrupt():
        try:
            check_group_choices(sys.argv[1:])
            run_dir = prepare_single_run(sys.argv[1:])
        except ConfigError as err:
            fail(str(err), EXIT_CONFIG, getattr(err, "detail", None) if verbose else None)
        sys.argv += worker_overrides()
        owned = hold_run_dir(run_dir) if run_dir is not None and launcher_rank() == 0 else contextlib.nullcontext()
        try:
            with owned:
                if run_dir is not None:
                    refuse_finished(run_dir)  # again, now that no other run can finish it meanwhile
                _main()
        except (ConfigError, StorageError) as err:
            fail(str(err), err.exit_code)
        except KeyboardInterrupt:
            fail(INTERRUPTED.format(run_dir=run_dir or "the run directory"), EXIT_INTERRUPTED)


def prepare_single_run(argv: list[str]) -> Path | None:
    """For a single run: compose and validate the config as Hydra will, resolve the run directory
    (``${now:...}``, ``${run_id:}`` and other interpolations included), pin it on ``sys.argv`` so
    Hydra uses that very directory, and refuse a finished one or a resume it cannot honour
    (``check_run_dir``); all before anything is written. Returns the run directory.

    A multirun: its first job's config is composed, so a mistyped key or group stops the sweep
    before it starts; each job validates its own values and locks its own directory. Returns
    None then, and with Hydra flags such as ``--cfg`` (Hydra alone)."""
    if not cli_checks.composable(argv):
        return None
    if cli_checks.is_multirun(argv):
        cli_checks.compose(cli_checks.first_of_sweeps(argv))
        return None
    cfg = cli_checks.compose(argv)
    if cfg.hydra.mode == RunMode.MULTIRUN:
        return None
    from .config import to_run_config  # after the cheap checks: it imports torch and transformers

    job = cli_checks.job_config(cfg)
    run_cfg = to_run_config(job)
    run_cfg.validate()
    if not str(cfg.hydra.run.dir).strip():
        raise ConfigError("hydra.run.dir", "is empty; give a directory for the run, e.g. hydra.run.dir=outputs/my_run")
    run_dir = Path(str(cfg.hydra.run.dir))
    if "'" in str(run_dir) or "\\" in str(run_dir):
        raise ConfigError("hydra.run.dir", f"{run_dir} contains a quote or backslash; choose a plain path")
    check_run_dir(run_dir, run_cfg.trainer.resume, OmegaConf.to_container(job, resolve=True), warn=False)
    sys.argv = [arg for arg in sys.argv if not arg.lstrip("+").startswith("hydra.run.dir=")]
    sys.argv.append(f"hydra.run.dir='{run_dir}'")
    return run_dir


@contextlib.contextmanager
def signals_interrupt():
    """SIGTERM behaves as SIGINT (KeyboardInterrupt) in every phase. The previous handlers come
    back when the block ends normally; after ``fail`` they stay ignored while the process exits."""
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    exiting = False
    try:
        yield
    except SystemExit:
        exiting = True
        raise
    finally:
        if not exiting:
            for signum, handler in previous.items():
                signal.signal(signum, handler)


if __name__ == "__main__":
    main()
