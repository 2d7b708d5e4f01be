"""Hydra multiruns that survive their jobs.

Inside a multirun, a job that fails is recorded in its own run directory (``error.json``) and the
sweep goes on; a job whose directory already holds the same finished run is skipped; every job
returns its objective (``sweep.objective``, a dotted key of metrics.json) so that a sweeper such
as Optuna can optimise it. When the multirun ends, ``SweepSummary`` (a Hydra callback) prints one
line per failed job and exits with code 1 if any failed. A single run (no ``-m``) is unchanged:
the task runs, and an error stops the process with its exit code.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from .errors import ConfigError

log = logging.getLogger(__name__)

ERROR_FILE = "error.json"
METRICS_FILE = "metrics.json"
CONFIG_FILE = "config.yaml"
EXIT_SWEEP_FAILED = 1


@dataclass
class SweepConfig:
    """objective: the metrics.json key (dotted) a job returns to the sweeper, e.g.
    ``eval.ppl_causal_routing`` (the default) or ``eval.rouge_l.dolly_test``. params: free numbers
    for a sweeper to search over, read by interpolations elsewhere in the config (see
    ``mixsga_ratio_at_budget`` and experiment=sweep_optuna_ratio)."""

    objective: str = "eval.ppl_causal_routing"
    params: dict[str, float] = field(default_factory=dict)


class JobFailed(SystemExit):
    """``train.fail``'s exit: a SystemExit (the process ends with ``code`` in a single run) that a
    multirun catches to record ``message`` and go on with the next job."""

    def __init__(self, message: str, code: int):
        super().__init__(code)
        self.message = message


def in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def run_job(cfg: DictConfig, run_dir: Path, task: Callable[[], dict], fail: Callable[[str, int], None],
            config_exit_code: int, interrupted_exit_code: int) -> float | None:
    """Run one job of a multirun: skip it if ``run_dir`` already holds this finished run, else run
    ``task`` (which returns the metrics). A failure (``fail`` raises JobFailed after printing the
    error line; anything else is a crash) is written to ``run_dir/error.json`` and the job returns
    None, which Optuna records as a failed trial; an interrupt (``interrupted_exit_code``) is
    recorded too, then stops the whole sweep. Returns the objective otherwise."""
    key = OmegaConf.select(cfg, "sweep.objective", default=SweepConfig.objective)
    try:
        try:
            (run_dir / ERROR_FILE).unlink(missing_ok=True)
            finished = finished_run(cfg, run_dir)
            if finished is not None:
                log.info("%s already holds this finished run: skipped", run_dir)
                return objective(finished, key)
            return objective(task(), key)
        except ConfigError as err:
            fail(str(err), config_exit_code)
    except JobFailed as err:
        record_failure(run_dir, err.message, err.code)
        if err.code == interrupted_exit_code:
            raise
    except Exception as err:  # a bug or a crash in one job must not end the sweep
        log.exception("job in %s failed", run_dir)
        record_failure(run_dir, _one_line(err), EXIT_SWEEP_FAILED, traceback.format_exc())
    return None


def finished_run(cfg: DictConfig, run_dir: Path) -> dict | None:
    """The metrics of the finished run in ``run_dir`` if it was run with this very config; a
    directory that finished another config is a ConfigError (a relaunch with other values)."""
    metrics_path = run_dir / METRICS_FILE
    if not metrics_path.is_file():
        return None
    saved = run_dir / CONFIG_FILE
    current = OmegaConf.to_container(cfg, resolve=True)
    if saved.is_file() and OmegaConf.to_container(OmegaConf.load(saved)) != current:
        raise ConfigError(
            "hydra.sweep.dir", f"{run_dir} holds a finished run of another config; relaunch into a new hydra.sweep.dir"
        )
    return json.loads(metrics_path.read_text())


def objective(metrics: dict, key: str) -> float:
    """``metrics[key]`` for a dotted ``key`` (``eval.ppl_causal_routing``), as a float."""
    value = metrics
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            raise ConfigError("sweep.objective", f"{key!r} is not a key of metrics.json (see docs/metrics.md)")
        value = value[part]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError("sweep.objective", f"{key!r} is {value!r} in metrics.json, not a number")
    return float(value)


def record_failure(run_dir: Path, message: str, exit_code: int, trace: str | None = None) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {"error": message, "exit_code": exit_code}
    if trace is not None:
        record["traceback"] = trace
    (run_dir / ERROR_FILE).write_text(json.dumps(record, indent=2) + "\n")


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def ratio_at_budget(budget: float, full_share: float) -> list[float]:
    """Shares of the paper's three experts (group sizes 1, 2, 4: KV fractions 1, 1/2, 1/4) that
    spend exactly ``budget`` of the native KV with ``full_share`` of the tokens on the full expert
    (eq. 11 solved for the other two: a + b/2 + c/4 = budget, a + b + c = 1). At budget 0.5 this is
    the family x : 1-3x : 2x, feasible for x in [0, 1/3]; outside its range a share is negative and
    the attention config refuses it."""
    a = float(full_share)
    c = 2 + 2 * a - 4 * float(budget)
    return [a, 1 - a - c, c]


OmegaConf.register_new_resolver("mixsga_ratio_at_budget", ratio_at_budget, replace=True)


class SweepSummary(Callback):
    """At the end of a multirun: count the jobs of the sweep directory (finished now, finished
    before this launch and skipped, failed), print one line per failed job, exit 1 if any failed.
    Reads only the job directories, so it works with any launcher (local, submitit, Slurm)."""

    def __init__(self):
        self._started = time.time()

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self._started = time.time()

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        lines, failed = summarise(sweep_dir, self._started)
        print("\n".join(lines), file=sys.stderr, flush=True)
        key = OmegaConf.select(config, "sweep.objective", default=SweepConfig.objective)
        try:
            rows = curve_rows(sweep_dir, key)
        except ConfigError:  # an objective key that is not in metrics.json: every job failed on it already
            rows = []
        if rows and "logger" in config:
            from .tracking import start_tracker

            experiment = config.experiment_name
            tracker = start_tracker(config.logger, sweep_dir, f"{experiment}-summary", experiment, ["sweep-summary"],
                                    {"sweep_dir": str(sweep_dir), "objective": key}, is_main=True,
                                    job_type="sweep-summary", id_label="sweep_summary")
            tracker.curve("budget_curve", rows, x="kv_budget", y=key, stroke="method")
            tracker.finish()
        if failed:
            sys.exit(EXIT_SWEEP_FAILED)


def curve_rows(sweep_dir: Path, key: str) -> list[dict]:
    """One row per finished job of ``sweep_dir`` (sorted by method, then KV budget): what a
    budget-curve table shows, with the sweep objective ``key`` as its own column."""
    rows = []
    for path in sweep_dir.glob(f"*/{METRICS_FILE}"):
        m = json.loads(path.read_text())
        rows.append({
            "job": path.parent.name, "method": m["method"], "kv_budget": m["kv_budget"],
            "ratio": ":".join(f"{r:.3g}" for r in m["ratio"] or []), "seed": m["seed"],
            "ppl": m["eval"]["ppl"], "ppl_causal_routing": m["eval"]["ppl_causal_routing"],
            "kv_bytes_per_token": m["kv_bytes_per_token"], key: objective(m, key),
        })
    return sorted(rows, key=lambda r: (r["method"], r["kv_budget"], r["job"]))


def summarise(sweep_dir: Path, started: float) -> tuple[list[str], int]:
    """Summary lines for the jobs under ``sweep_dir`` and the number that failed; a failed job is
    named by the overrides that set it apart from the sweep's other jobs."""
    folders = sweep_dir.iterdir() if sweep_dir.is_dir() else []
    jobs = sorted((d for d in folders if (d / ".hydra").is_dir()), key=_job_order)
    failed = [d for d in jobs if (d / ERROR_FILE).is_file()]  # a job that starts again removes its error.json
    done = [d for d in jobs if (d / METRICS_FILE).is_file() and d not in failed]
    before = [d for d in done if (d / METRICS_FILE).stat().st_mtime < started]
    lines = [f"sweep {sweep_dir}: {len(jobs)} jobs, {len(done)} finished ({len(before)} already before this launch, "
             f"skipped), {len(failed)} failed"]
    overrides = {d: _overrides(d) for d in jobs}
    shared = set.intersection(*(set(o) for o in overrides.values())) if len(jobs) > 1 else set()
    for d in failed:
        record = json.loads((d / ERROR_FILE).read_text())
        own = " ".join(o for o in overrides[d] if o not in shared) or "no overrides"
        lines.append(f"failed job {d.name} ({own}): {record['error']}")
    return lines, len(failed)


def _job_order(path: Path) -> tuple:
    return (0, int(path.name), "") if path.name.isdigit() else (1, 0, path.name)


def _overrides(job_dir: Path) -> list[str]:
    """The job's command-line overrides, as Hydra saved them."""
    path = job_dir / ".hydra" / "overrides.yaml"
    return [str(o) for o in OmegaConf.load(path)] if path.is_file() else []
