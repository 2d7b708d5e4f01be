"""Checkpoint directories that are complete or invisible.

DeepSpeed writes each checkpoint (model, optimizer, scheduler, client state) under
``<run>/checkpoints/step<N>``; only after every rank has finished does rank 0 write a
``complete.json`` marker by atomic rename. Resume uses the newest directory with a marker, so a
crash mid-write never leaves a checkpoint that looks complete.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

from ..errors import StorageError

MARKER = "complete.json"


def checkpoint_root(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def tag(step: int) -> str:
    return f"step{step:08d}"


def mark_complete(root: Path, step: int, world_size: int = 1) -> None:
    """Atomically mark ``step``'s checkpoint, written by ``world_size`` ranks, as complete (rank 0,
    after a barrier). The marker lists every file with its size, so a file truncated or lost
    later is noticed before resuming (``damage``)."""
    folder = root / tag(step)
    target = folder / MARKER
    tmp = target.with_suffix(".tmp")
    files = {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))
             if p.is_file() and p not in (target, tmp)}
    tmp.write_text(json.dumps({"step": step, "world_size": world_size, "files": files}))
    os.replace(tmp, target)


def read_marker(root: Path, step: int) -> dict | None:
    """The marker of checkpoint ``step``, or None when it is missing or unreadable."""
    try:
        marker = json.loads((root / tag(step) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and marker.get("step") == step else None


def written_by(root: Path, step: int) -> int:
    """How many ranks wrote complete checkpoint ``step`` (their ZeRO shards must be loaded by as many)."""
    return read_marker(root, step).get("world_size", 1)


def damage(root: Path, step: int) -> str | None:
    """What is wrong with complete checkpoint ``step`` (unreadable marker, a listed file missing or
    of another size than when it was written), or None when it is intact."""
    marker = read_marker(root, step)
    if marker is None:
        return f"its {MARKER} is unreadable"
    folder = root / tag(step)
    for name, size in marker.get("files", {}).items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, not the {size} written"
    return None


def discard_incomplete(root: Path, step: int) -> None:
    """Remove what a crashed earlier write of ``step`` (or a damaged copy of it) left behind, so a
    new save starts clean."""
    path = root / tag(step)
    if path.is_dir() and (not (path / MARKER).is_file() or damage(root, step) is not None):
        shutil.rmtree(path)


def complete_steps(root: Path) -> list[int]:
    """Steps of the complete checkpoints, oldest first."""
    if not root.is_dir():
        return []
    steps = []
    for path in root.iterdir():
        if path.name.startswith("step") and path.name[4:].isdigit() and (path / MARKER).is_file():
            steps.append(int(path.name[4:]))
    return sorted(steps)


def latest_complete(root: Path) -> int | None:
    steps = complete_steps(root)
    return steps[-1] if steps else None


def latest_intact(root: Path) -> tuple[int | None, list[str]]:
    """The newest complete checkpoint that is intact, and one note per newer one that is damaged."""
    damaged = []
    for step in reversed(complete_steps(root)):
        problem = damage(root, step)
        if problem is None:
            return step, damaged
        damaged.append(f"{root / tag(step)} is damaged ({problem})")
    return None, damaged


def prune(root: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints, and any incomplete ones older than them."""
    steps = complete_steps(root)
    keep_tags = {tag(s) for s in steps[-keep:]}
    newest = steps[-1] if steps else -1
    for path in root.iterdir() if root.is_dir() else []:
        if not path.name.startswith("step") or path.name in keep_tags:
            continue
        step = int(path.name[4:]) if path.name[4:].isdigit() else -1
        if step < newest:
            shutil.rmtree(path, ignore_errors=True)


def size_bytes(root: Path, step: int) -> int:
    """Bytes of complete checkpoint ``step`` as its marker lists them (0 when unknown)."""
    marker = read_marker(root, step) or {}
    return sum(marker.get("files", {}).values())


def write_failure(root: Path, step: int, err: Exception) -> StorageError:
    """One line for a checkpoint that could not be written (disk full, or torch's ``enforce fail at
    inline_container.cc``): the path, the free and the needed space, the checkpoint that is kept."""
    target = root / tag(step)
    usage = shutil.disk_usage(root if root.exists() else root.parent)
    last = latest_complete(root)
    needed = size_bytes(root, last) if last is not None else 0
    need = f", the last checkpoint took {needed / 2**20:.0f} MiB" if needed else ""
    kept = f"the last complete checkpoint {root / tag(last)} is kept" if last is not None else "none is complete yet"
    full = getattr(err, "errno", None) == errno.ENOSPC or usage.free < needed
    reason = "no space left on device" if full else "the write failed"
    return StorageError(f"{target}: {reason} ({usage.free / 2**20:.0f} MiB free{need}); {kept}; free some space and "
                        "rerun with trainer.resume=auto")
