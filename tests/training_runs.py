"""Real training commands for the resume, determinism and multi-process tests.

``reference_run()`` trains the shared configuration once per test session (one process,
grad_accum=2, checkpoints every 4 of 24 steps) and is compared against killed-and-resumed,
repeated and two-process runs of the same configuration. Every subprocess uses one thread
(OMP_NUM_THREADS=1): the same kernels in every run, and no spin-waiting threads when the
2-core machine is busy.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cli import REPO, WIKITEXT

STEPS, SAVE_EVERY = 24, 4
TRAIN_ARGS = [
    "experiment=smoke_lm",
    f"task.local_dir={WIKITEXT}",
    f"trainer.max_steps={STEPS}",
    f"trainer.save_every={SAVE_EVERY}",
    "trainer.grad_accum=2",
    "seed=1",
]
WALL_CLOCK = {"train.seconds", "train.tokens_per_s"}
LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def env(**extra: str) -> dict:
    """The test environment for a subprocess: offline, W&B off, one thread, no inherited launcher variables."""
    out = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV}
    out.update(HF_HUB_OFFLINE="1", WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    out.update(extra)
    return out


def command(run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "mixsga_train.train", *TRAIN_ARGS, *extra, f"hydra.run.dir={run_dir}"]


def run(cmd: list[str], timeout: int = 300, **env_extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=env(**env_extra), capture_output=True, text=True, timeout=timeout)


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    """Launch in the background, stdout and stderr into ``log`` (a pipe nobody reads could block it)."""
    with log.open("w") as handle:
        return subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=handle, stderr=subprocess.STDOUT, text=True)


def wait_for_checkpoint(proc: subprocess.Popen, run_dir: Path, log: Path, timeout: float = 240) -> int:
    """Poll until ``run_dir`` has a complete checkpoint while ``proc`` still runs; its step."""
    from mixsga_train.training import checkpoints

    root = checkpoints.checkpoint_root(run_dir)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        step = checkpoints.latest_complete(root)
        if step is not None:
            return step
        if proc.poll() is not None:
            raise AssertionError(
                f"the run ended (exit {proc.returncode}) before its first checkpoint: {log.read_text()[-3000:]}"
            )
        time.sleep(0.01)
    raise AssertionError(f"no complete checkpoint in {root} after {timeout} s")


@functools.cache
def reference_run() -> Path:
    """The uninterrupted run of TRAIN_ARGS (trained once per session)."""
    run_dir = Path(tempfile.mkdtemp(prefix="mixsga-reference-")) / "run"
    atexit.register(shutil.rmtree, run_dir.parent, True)
    proc = run(command(run_dir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def numbers(value, prefix: str = "") -> dict[str, float]:
    """Every number in a metrics tree, by dotted path (list items as ``key[i]``)."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return {}
    if isinstance(value, (int, float)):
        return {prefix: value}
    items = value.items() if isinstance(value, dict) else ((f"[{i}]", v) for i, v in enumerate(value))
    out = {}
    for key, item in items:
        name = f"{prefix}{key}" if key.startswith("[") or not prefix else f"{prefix}.{key}"
        out.update(numbers(item, name))
    return out


def comparable(run_metrics: dict, ignore: set[str] = frozenset()) -> dict:
    """``run_metrics`` without wall-clock fields (and ``ignore``): what must repeat exactly."""
    flat = numbers(run_metrics)
    return {k: v for k, v in flat.items() if k not in WALL_CLOCK | set(ignore)}
