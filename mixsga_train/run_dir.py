"""What a run directory holds, and the rules that protect it.

``config.yaml`` (the resolved config), ``provenance.json`` (seed, library versions, git commit;
plus one entry per resume), ``eval_before.json`` (the evaluation before training, kept so a
resumed run reports it too), ``checkpoints/`` (complete-or-invisible DeepSpeed checkpoints),
``model/`` (the final ``save_pretrained`` weights) and ``metrics.json`` (the contract of
docs/metrics.md, written atomically, last: its presence means the run finished). Only
rank 0 writes them, except the checkpoints' per-rank shards.
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
PROVENANCE = "provenance.json"
EVAL_BEFORE = "eval_before.json"
PACKAGES = ("torch", "transformers", "deepspeed", "datasets", "hydra-core", "wandb", "triton", "mixsga-train")


def refuse_finished(argv: list[str]) -> None:
    """Before Hydra writes anything into it: refuse a run directory pinned on the command line
    (``hydra.run.dir=DIR``) that holds a finished run."""
    for arg in argv:
        key, _, value = arg.partition("=")
        if key.lstrip("+") == "hydra.run.dir" and value and "${" not in value:
            _refuse_finished(Path(value))


def _refuse_finished(run_dir: Path) -> None:
    if (run_dir / METRICS).exists():
        raise ConfigError(
            "hydra.run.dir", f"{run_dir} already holds a finished run ({METRICS}); choose another directory or delete it"
        )


def check_run_dir(run_dir: Path, resume: str) -> int | None:
    """Refuse to overwrite a finished run; return the checkpoint step to resume from (or None)."""
    _refuse_finished(run_dir)
    root = checkpoints.checkpoint_root(run_dir)
    latest = checkpoints.latest_complete(root)
    if latest is None:
        return None
    if resume != "auto":
        raise ConfigError(
            "trainer.resume", f"{run_dir} has a checkpoint at step {latest}; pass trainer.resume=auto to continue it, or use another run dir"
        )
    writers, world_size = checkpoints.written_by(root, latest), int(os.environ.get("WORLD_SIZE", "1"))
    if writers != world_size:
        raise ConfigError(
            "trainer.resume",
            f"{root / checkpoints.tag(latest)} was written by {writers} processes, not {world_size}; resume with {writers} processes",
        )
    return latest


def write_json_atomic(path: Path, payload: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_finite(payload), indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> dict | None:
    """A JSON file written by ``write_json_atomic``, or None when it does not exist."""
    return json.loads(path.read_text()) if path.is_file() else None


def record_provenance(run_dir: Path, seed: int, resume_step: int | None) -> None:
    """Write ``provenance.json``; a resumed run keeps the original record and appends the step it
    resumed from with the code and library versions that continued it."""
    current = provenance(seed)
    record = read_json(run_dir / PROVENANCE) if resume_step is not None else None
    if record is None:
        record = current
    else:
        record.setdefault("resumes", []).append({"step": resume_step, "git_commit": current["git_commit"], "versions": current["versions"]})
    write_json_atomic(run_dir / PROVENANCE, record)


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
