"""What a run directory holds, and the rules that protect it.

``config.yaml`` (the resolved config), ``provenance.json`` (seed, library versions, git commit;
plus one entry per resume), ``eval_before.json`` (the evaluation before training, kept so a
resumed run reports it too), ``checkpoints/`` (complete-or-invisible DeepSpeed checkpoints),
``model/`` (the final ``save_pretrained`` weights) and ``metrics.json`` (the contract of
docs/metrics.md, written atomically, last: its presence means the run finished). Only
rank 0 writes them, except the checkpoints' per-rank shards.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import math
import os
import platform
import shutil
import subprocess
from importlib import metadata
from pathlib import Path

from omegaconf import OmegaConf

from .errors import ConfigError, StorageError
from .training import checkpoints

log = logging.getLogger(__name__)

METRICS = "metrics.json"
PROVENANCE = "provenance.json"
EVAL_BEFORE = "eval_before.json"
CONFIG = "config.yaml"
# Names a run directory uses for itself; ``mixsga-evaluate --name`` may not take them.
RUN_FILES = (METRICS, PROVENANCE, EVAL_BEFORE, CONFIG, "model", "checkpoints", ".hydra", "train.log", "wandb")
PACKAGES = ("torch", "transformers", "deepspeed", "datasets", "hydra-core", "wandb", "triton", "mixsga-train")
# Keys a resumed run may change: they affect logging, checkpoint cadence or evaluation only, never
# the model, the data order or the optimisation (a key and everything under it).
RESUMABLE_CHANGES = (
    "logger", "experiment_name", "trainer.resume", "trainer.eval_batch_size", "trainer.eval_before",
    "trainer.log_every", "trainer.save_every", "trainer.keep_checkpoints", "task.eval_sets", "task.eval_max_examples",
    "task.max_new_tokens", "task.max_eval_tokens", "task.stride", "attention.decode_kernel",
)


def refuse_finished(run_dir: Path) -> None:
    """Refuse a run directory that holds a finished run (before anything is written into it)."""
    if (run_dir / METRICS).exists():
        raise ConfigError(
            "hydra.run.dir", f"{run_dir} already holds a finished run ({METRICS}); choose another directory or delete it"
        )


@contextlib.contextmanager
def hold_run_dir(run_dir: Path):
    """Own ``run_dir`` while the block runs: an exclusive ``flock`` on the directory itself (no
    file is added), released when the block ends or the process dies. A directory another live
    run holds is refused in one line. Multi-process runs: only rank 0 holds it."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError("hydra.run.dir", f"{run_dir} is a file, not a directory; choose a directory path")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        handle = os.open(run_dir, os.O_RDONLY)
    except OSError as err:
        raise StorageError(f"{run_dir}: cannot create or open the run directory ({err.strerror})") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(handle)
        raise ConfigError(
            "hydra.run.dir",
            f"{run_dir} is in use by another running mixsga-train; wait for it or choose another directory",
        ) from None
    except OSError as err:  # a file system without flock (some network mounts): run, unprotected
        log.warning("%s: cannot be locked (%s); nothing stops a second run from using it", run_dir, err.strerror)
    try:
        yield run_dir
    finally:
        os.close(handle)  # closing the last descriptor releases the lock


def check_run_dir(run_dir: Path, resume: str, requested: dict | None = None, warn: bool = True) -> int | None:
    """Refuse to overwrite a finished run; return the checkpoint step to resume from (or None).

    Resuming: the newest intact checkpoint is used (a damaged newer one is skipped with one
    warning, unless ``warn`` is off), and ``requested`` (the resolved config of this command)
    must equal the run's ``config.yaml`` but for ``RESUMABLE_CHANGES``. Nothing is written here.
    """
    refuse_finished(run_dir)
    root = checkpoints.checkpoint_root(run_dir)
    newest = checkpoints.latest_complete(root)
    if newest is None:
        return None
    if resume != "auto":
        raise ConfigError(
            "trainer.resume",
            f"{run_dir} has a checkpoint at step {newest}; pass trainer.resume=auto to continue it, "
            "or use another run dir",
        )
    latest, damaged = checkpoints.latest_intact(root)
    if latest is None:
        raise ConfigError(
            "trainer.resume", f"no intact checkpoint to resume from: {'; '.join(damaged)}; start a new run directory"
        )
    if requested is not None:
        check_same_config(run_dir, requested)
    writers, world_size = checkpoints.written_by(root, latest), int(os.environ.get("WORLD_SIZE", "1"))
    if writers != world_size:
        raise ConfigError(
            "trainer.resume",
            f"{root / checkpoints.tag(latest)} was written by {writers} processes, not {world_size}; resume with {writers} processes",
        )
    if damaged and warn:
        log.warning("%s; resuming from the previous complete checkpoint, step %d", "; ".join(damaged), latest)
    return latest


def check_same_config(run_dir: Path, requested: dict) -> None:
    """ConfigError with a one-line diff when ``requested`` differs from the run's saved config in
    anything outside ``RESUMABLE_CHANGES``."""
    saved_file = run_dir / CONFIG
    if not saved_file.is_file():
        raise ConfigError("trainer.resume", f"{saved_file} is missing, so the checkpoint's config cannot be checked; "
                                            "start a new run directory")
    saved, wanted = _flatten(OmegaConf.to_container(OmegaConf.load(saved_file))), _flatten(requested)
    changed = [key for key in sorted(saved.keys() | wanted.keys(), key=lambda k: (k not in saved or k not in wanted, k))
               if saved.get(key, "(absent)") != wanted.get(key, "(absent)") and not _resumable(key)]
    if changed:
        shown = ", ".join(f"{k}={saved.get(k, '(absent)')} -> {wanted.get(k, '(absent)')}" for k in changed[:3])
        more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
        raise ConfigError(
            "trainer.resume", f"{run_dir} was checkpointed with another config: {shown}{more}; resume with the "
                              "original values, or start a new run directory"
        )


def _resumable(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") or key.startswith(k + "[") for k in RESUMABLE_CHANGES)


def _flatten(tree, prefix: str = "") -> dict:
    """Dotted key -> value of a nested config (lists stay values, so ``ratio`` compares whole)."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out = {}
    for key, value in tree.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def check_output_name(run_dir: Path, name: str) -> Path:
    """``RUN_DIR/<name>.json`` for ``mixsga-evaluate --name``: a plain name that no file of the
    run uses and no earlier evaluation wrote; ConfigError otherwise."""
    if not name or "/" in name or name.startswith(".") or name != name.strip():
        raise ConfigError("--name", f"{name!r} must be a plain file name (no '/', no leading dot), e.g. eval_vicuna")
    out = run_dir / f"{name}.json"
    if out.name in RUN_FILES or name in RUN_FILES:
        raise ConfigError("--name", f"{name!r} is a name the run itself uses ({out}); choose another, e.g. eval_{name}")
    if out.exists():
        raise ConfigError("--name", f"{out} already exists; choose another --name (results are never overwritten)")
    return out


def write_config(run_dir: Path, config: dict) -> None:
    """``config.yaml``: the resolved config of the run (what a resume is compared with)."""
    path = run_dir / CONFIG
    try:
        path.write_text(OmegaConf.to_yaml(config))
    except OSError as err:
        raise storage_error(path, err) from None


def write_json_atomic(path: Path, payload: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(_finite(payload), indent=2, sort_keys=False) + "\n")
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise storage_error(path, err) from None


def storage_error(path: Path, err: OSError) -> StorageError:
    """One line for a write that failed: the path, the reason and, for a full disk, the free space."""
    if err.errno == errno.ENOSPC:
        free = free_bytes(path)
        return StorageError(f"{path}: no space left on device ({free / 2**20:.0f} MiB free); free some space"
                            " and rerun (add trainer.resume=auto to continue from the last complete checkpoint)")
    return StorageError(f"{path}: cannot write it ({err.strerror or err}); check the directory's permissions and space")


def free_bytes(path: Path) -> int:
    """Free bytes on the file system holding ``path`` (its nearest existing parent)."""
    for parent in [path, *path.parents]:
        if parent.exists():
            return shutil.disk_usage(parent).free
    return 0


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
