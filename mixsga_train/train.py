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

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from . import cli_checks
from .cli_checks import CONF_DIR, check_group_choices
from .config import to_run_config
from .errors import EXIT_CONFIG, EXIT_INTERRUPTED, ConfigError, DataError, StorageError
from .run_dir import check_run_dir, hold_run_dir, refuse_finished
from .training.distributed import launcher_rank, worker_overrides
from .training.loop import TrainingDiverged, TrainingInterrupted

log = logging.getLogger(__name__)

VERBOSE_FLAG = "--verbose"
INTERRUPTED = ("interrupted outside a checkpointed training step; {run_dir} keeps its last complete checkpoint, "
               "if any; rerun the same command with trainer.resume=auto")


def fail(message: str, code: int, detail: str | None = None) -> None:
    """The one place the command line ends with an error: one ``error:`` line (plus ``detail``,
    e.g. Hydra's full message under ``--verbose``), then exit ``code``. Further SIGINT/SIGTERM are
    ignored from here on, so a second Ctrl-C cannot turn the exit into a traceback."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    print(f"error: {message}", file=sys.stderr, flush=True)
    if detail:
        print(detail, file=sys.stderr, flush=True)
    sys.exit(code)


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def _main(cfg: DictConfig) -> None:
    try:
        run_cfg = to_run_config(cfg)
        resolved = run_cfg.validate()
    except ConfigError as err:
        fail(str(err), EXIT_CONFIG)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    print(f"attention: {resolved.describe()}", flush=True)
    from .pipeline import run  # heavy imports only after validation

    try:
        with job_lock(run_dir):
            metrics = run(run_cfg, resolved, run_dir, OmegaConf.to_container(cfg, resolve=True))
    except (ConfigError, DataError, StorageError, TrainingDiverged, TrainingInterrupted) as err:
        fail(str(err), err.exit_code)
    except KeyboardInterrupt:
        fail(INTERRUPTED.format(run_dir=run_dir), EXIT_INTERRUPTED)
    if launcher_rank() == 0:
        print(summary(metrics, run_dir), flush=True)


def job_lock(run_dir: Path):
    """A multirun job's lock on its own directory (a single run's is taken in ``main``, before Hydra)."""
    if HydraConfig.get().mode == RunMode.MULTIRUN and launcher_rank() == 0:
        return hold_run_dir(run_dir)
    return contextlib.nullcontext()


def summary(metrics: dict, run_dir: Path) -> str:
    """The few numbers a person wants after a run."""
    lines = [f"run: {metrics['model']} {metrics['method']} ({100 * metrics['kv_budget']:.1f}% KV) on {metrics['task']}"]
    before, after = metrics.get("eval_before"), metrics["eval"]
    if before is not None:
        lines.append(f"perplexity before training: {before['ppl']:.2f} (causal routing {before['ppl_causal_routing']:.2f})")
    lines.append(f"perplexity after training:  {after['ppl']:.2f} (causal routing {after['ppl_causal_routing']:.2f})")
    for name, value in after["rouge_l"].items():
        lines.append(f"ROUGE-L {name}: {value:.2f}")
    native = metrics["kv_bytes_per_token_native"]
    lines.append(f"KV bytes per token: {after['kv_bytes_per_token']:.1f} measured vs {native} native "
                 f"({100 * after['kv_bytes_per_token'] / native:.1f}%)")
    train = metrics["train"]
    if train:
        lines.append(f"trained {train['steps']} steps, {train['tokens']} tokens in {train['seconds']:.0f} s "
                     f"({train['tokens_per_s']:.0f} tok/s), final loss {train['final_loss']:.4f}")
    lines.append(f"run directory: {run_dir}")
    return "\n".join(lines)


def main() -> None:
    """Check the command line, claim the run directory, then hand over to Hydra."""
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
