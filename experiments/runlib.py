"""Running one training command of a benchmark: skip it if it already finished, log to
``<name>.log`` beside its run directory, drop the DeepSpeed checkpoints afterwards."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_training(name: str, cmd: list[str], run_dir: Path, env: dict) -> int:
    """Run ``cmd`` (a ``mixsga_train.train`` command writing ``run_dir``); returns its exit code
    (0 without running when ``run_dir`` already holds a metrics.json)."""
    if (run_dir / "metrics.json").is_file():
        print(f"[skip] {name}: metrics.json exists", flush=True)
        return 0
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    started = time.time()
    print(f"[run] {name} ...", flush=True)
    with open(run_dir.parent / f"{name}.log", "w") as log:
        rc = subprocess.call(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    print(f"[done] {name} rc={rc} in {time.time() - started:.0f} s", flush=True)
    return rc
