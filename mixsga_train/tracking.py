"""Experiment tracking: W&B (offline by default) or nothing. A tracker that fails to start
warns once and the run goes on without it; only rank 0 tracks. The W&B run id is kept in the
run directory, so a resumed run continues the same W&B run."""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

log = logging.getLogger(__name__)

RUN_ID_FILE = "wandb_run_id.txt"


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

    def summary(self, metrics: dict) -> None:
        self._call(lambda run: run.summary.update(_flatten(metrics)))

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


def start_tracker(logger_cfg, run_dir: Path, name: str, group: str, tags: list[str], config: dict, is_main: bool) -> Tracker:
    """A W&B run (group = experiment, tags = method and budget, the resolved config attached),
    or a disabled tracker when ``backend=none``, on ranks other than 0, or when W&B fails."""
    if not is_main or logger_cfg.backend == "none" or logger_cfg.mode == "disabled":
        return Tracker()
    try:
        import wandb

        run = wandb.init(
            project=logger_cfg.project,
            entity=logger_cfg.entity,
            group=logger_cfg.group or group,
            tags=sorted(set(logger_cfg.tags) | set(tags)),
            name=name,
            dir=str(run_dir),
            config=config,
            mode=logger_cfg.mode,
            id=_run_id(run_dir),
            resume="allow",
            reinit="finish_previous",
        )
        return Tracker(run)
    except Exception as err:  # W&B must never stop training
        log.warning("W&B failed to start (%s); training continues without tracking (logger=none turns it off)", _one_line(err))
        return Tracker()


def _one_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def _run_id(run_dir: Path) -> str:
    """This run directory's W&B run id, created on first use."""
    path = run_dir / RUN_ID_FILE
    if not path.is_file():
        path.write_text(uuid.uuid4().hex[:12])
    return path.read_text().strip()


def _flatten(metrics: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, f"{name}/"))
        else:
            out[name] = value
    return out
