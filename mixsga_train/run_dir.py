"""What a run directory holds, and the rules that protect it.

``config.yaml`` (the resolved config), ``provenance.json`` (seed, library versions, git commit),
``checkpoints/`` (complete-or-invisible DeepSpeed checkpoints), ``model/`` (the final
``save_pretrained`` weights) and ``metrics.json`` (the contract of design.md section 6, written
atomically, last: its presence means the run finished).
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

from .errors import ConfigError
from .training import checkpoints

METRICS = "metrics.json"
PACKAGES = ("torch", "transformers", "deepspeed", "datasets", "hydra-core", "wandb", "triton", "mixsga-train")


def check_run_dir(run_dir: Path, resume: str) -> int | None:
    """Refuse to overwrite a finished run; return the checkpoint step to resume from (or None)."""
    if (run_dir / METRICS).exists():
        raise ConfigError(
            "hydra.run.dir", f"{run_dir} already holds a finished run ({METRICS}); choose another directory or delete it"
        )
    latest = checkpoints.latest_complete(checkpoints.checkpoint_root(run_dir))
    if latest is not None and resume != "auto":
        raise ConfigError(
            "trainer.resume", f"{run_dir} has a checkpoint at step {latest}; pass trainer.resume=auto to continue it, or use another run dir"
        )
    return latest


def write_json_atomic(path: Path, payload: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_finite(payload), indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def provenance(seed: int) -> dict:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {"seed": seed, "python": platform.python_version(), "versions": versions, "git_commit": _git_commit()}


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, cwd=Path(__file__).parent, timeout=5)
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _finite(value):
    """JSON has no inf/nan: write them as strings so the file stays valid."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
