"""Experiment tracking: W&B (offline by default) or nothing. A tracker that fails to start
warns once and the run goes on without it; only rank 0 tracks."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


class Tracker:
    """``log(metrics, step)``, ``summary(metrics)``, ``finish()``; all no-ops when disabled."""

    def __init__(self, run=None):
        self._run = run

    @property
    def active(self) -> bool:
        return self._run is not None

    def log(self, metrics: dict, step: int) -> None:
        if self._run is not None:
            self._run.log(metrics, step=step)

    def summary(self, metrics: dict) -> None:
        if self._run is not None:
            for key, value in _flatten(metrics).items():
                self._run.summary[key] = value

    def finish(self) -> None:
        if self._run is not None:
            self._run.finish()
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
            reinit="finish_previous",
        )
        return Tracker(run)
    except Exception as err:  # W&B must never stop training
        log.warning("W&B failed to start (%s: %s); training continues without tracking", type(err).__name__, str(err).splitlines()[0] if str(err) else "")
        return Tracker()


def _flatten(metrics: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, f"{name}/"))
        else:
            out[name] = value
    return out
