"""Experiment tracking: W&B (offline by default) or nothing. A tracker that fails to start
warns once and the run goes on without it; only rank 0 tracks. The W&B run id is kept in the
run directory, so a resumed run continues the same W&B run. Project, entity and mode come from
the config when it sets them, else from W&B's environment variables, else from the defaults."""

from __future__ import annotations

import logging
import os
import uuid
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path

from .errors import ConfigError

log = logging.getLogger(__name__)

RUN_ID_FILE = "wandb_run_id.txt"
DEFAULT_PROJECT, DEFAULT_MODE = "mixsga-train", "offline"
LOGGERS = ("wandb", "none")
WANDB_MODES = ("offline", "online", "disabled")


@dataclass
class LoggerConfig:
    """Experiment tracking. backend: ``wandb`` or ``none``. project, entity, mode: W&B's; null
    leaves them to the environment (WANDB_PROJECT, WANDB_ENTITY, WANDB_MODE), then to the defaults
    ``mixsga-train`` and ``offline`` (files under the run directory, ``wandb sync`` later); mode may
    be ``offline``, ``online`` or ``disabled``. group defaults to the experiment name; tags get the
    method and budget added. samples: generations logged as a table after training (0: none)."""

    backend: str = "wandb"
    project: str | None = None
    entity: str | None = None
    mode: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    samples: int = 4

    def validate(self) -> None:
        if self.backend not in LOGGERS:
            raise ConfigError("logger.backend", f"unknown {self.backend!r}; choose one of {', '.join(LOGGERS)}")
        if self.samples < 0:
            raise ConfigError("logger.samples", f"{self.samples} must be >= 0 (0: no sample table)")
        if self.mode is not None and self.mode not in WANDB_MODES:
            raise ConfigError("logger.mode", f"unknown {self.mode!r}; choose one of {', '.join(WANDB_MODES)}")


class Tracker:
    """``log(metrics, step)``, ``summary(metrics)``, ``finish()``; all no-ops when disabled. A W&B
    call that fails warns once and disables the tracker: tracking never stops a run."""

    def __init__(self, run=None):
        self._run = run

    @property
    def active(self) -> bool:
        return self._run is not None

    def log(self, metrics: dict, step: int) -> None:
        self._call(lambda run: run.log(metrics, step=step))

    def summary(self, metrics) -> None:
        """Set the run's summary to ``metrics`` (a ``RunMetrics`` or a dict, possibly of ``EvalMetrics``),
        flattened to ``block/key`` names."""
        self._call(lambda run: run.summary.update(_flatten(metrics)))

    def table(self, key: str, columns: list[str], rows: list[list]) -> None:
        """Log ``rows`` as a ``wandb.Table`` under ``key`` (e.g. sample generations)."""

        def log_table(run):
            import wandb

            run.log({key: wandb.Table(columns=columns, data=rows)})

        self._call(log_table)

    def curve(self, key: str, rows: list[dict], x: str, y: str, stroke: str) -> None:
        """Log ``rows`` (dicts with the same keys) as a table under ``key`` and a line chart of
        ``y`` against ``x``, one line per value of ``stroke`` (e.g. perplexity vs KV budget per method)."""

        def log_curve(run):
            import wandb

            columns = list(rows[0])
            table = wandb.Table(columns=columns, data=[[row[c] for c in columns] for row in rows])
            chart = wandb.plot.line(table, x, y, stroke=stroke, title=f"{y} vs {x}")
            run.log({key: table, f"{key}_chart": chart})

        self._call(log_curve)

    def finish(self) -> None:
        self._call(lambda run: run.finish())
        self._run = None

    def _call(self, action) -> None:
        if self._run is None:
            return
        try:
            action(self._run)
        except Exception as err:  # W&B must never stop training
            log.warning("W&B failed (%s); the run continues without tracking", _one_line(err))
            self._run = None


def wandb_mode(logger_cfg) -> str:
    """The config's mode if set, else WANDB_MODE, else offline."""
    return logger_cfg.mode or os.environ.get("WANDB_MODE") or DEFAULT_MODE


def tracking_enabled(logger_cfg) -> bool:
    return logger_cfg.backend != "none" and wandb_mode(logger_cfg) != "disabled"


def run_name(method: str, kv_budget: float, ratio: list[float] | None, seed: int, per_layer: bool = False) -> str:
    """A W&B run name that says what the run is: ``mixsga-50%-0.3:0.1:0.6-s0``, ``gqa-25%-s1``;
    per-layer ratios: ``mixsga-50%-layers-0.25:0.25:0.5-s0`` (their mean)."""
    parts = [method, f"{100 * kv_budget:.4g}%"]
    if method == "mixsga" and ratio:
        parts += ["layers"] if per_layer else []
        parts.append(":".join(f"{r:.3g}" for r in ratio))
    return "-".join([*parts, f"s{seed}"])


def start_tracker(
    logger_cfg,
    run_dir: Path,
    name: str,
    group: str,
    tags: list[str],
    config: dict,
    is_main: bool,
    job_type: str = "train",
    id_label: str | None = None,
) -> Tracker:
    """A W&B run (group = experiment, tags = method and budget, the resolved config attached),
    or a disabled tracker when ``backend=none``, the mode is ``disabled``, on ranks other than 0,
    or when W&B fails. ``job_type``: ``train``, ``evaluate`` or ``sweep-summary``; the run id is
    kept in ``run_dir`` per ``id_label`` (default: the training run's), so reruns continue it."""
    if not is_main or not tracking_enabled(logger_cfg):
        return Tracker()
    try:
        import wandb

        run = wandb.init(
            project=logger_cfg.project or os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT,
            entity=logger_cfg.entity,  # None: W&B reads WANDB_ENTITY or the account's default
            group=logger_cfg.group or group,
            job_type=job_type,
            tags=sorted(set(logger_cfg.tags) | set(tags)),
            name=name,
            dir=str(run_dir),
            config=config,
            mode=wandb_mode(logger_cfg),
            id=_run_id(run_dir, id_label),
            resume="allow",
            reinit="finish_previous",  # several jobs of a multirun in one process
        )
        return Tracker(run)
    except Exception as err:  # W&B must never stop training
        log.warning(
            "W&B failed to start (%s); training continues without tracking (logger=none turns it off)", _one_line(err)
        )
        return Tracker()


def _one_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def _run_id(run_dir: Path, label: str | None) -> str:
    """This run directory's W&B run id (of the training run, or of ``label``), created on first use."""
    path = run_dir / (RUN_ID_FILE if label is None else f"wandb_{label}_run_id.txt")
    if not path.is_file():
        path.write_text(uuid.uuid4().hex[:12])
    return path.read_text().strip()


def _flatten(metrics, prefix: str = "") -> dict:
    """``{"eval": {"ppl": 3}}`` -> ``{"eval/ppl": 3}``; dataclasses (the metrics contract) count as dicts."""
    out = {}
    for key, value in _plain(metrics).items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) or (is_dataclass(value) and not isinstance(value, type)):
            out.update(_flatten(value, f"{name}/"))
        else:
            out[name] = value
    return out


def _plain(value):
    return asdict(value) if is_dataclass(value) and not isinstance(value, type) else value
