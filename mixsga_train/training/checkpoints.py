"""Checkpoint directories that are complete or invisible.

DeepSpeed writes each checkpoint (model, optimizer, scheduler, client state) under
``<run>/checkpoints/step<N>``; only after every rank has finished does rank 0 write a
``complete.json`` marker by atomic rename. Resume uses the newest directory with a marker, so a
crash mid-write never leaves a checkpoint that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

MARKER = "complete.json"


def checkpoint_root(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def tag(step: int) -> str:
    return f"step{step:08d}"


def mark_complete(root: Path, step: int, world_size: int = 1) -> None:
    """Atomically mark ``step``'s checkpoint, written by ``world_size`` ranks, as complete (rank 0,
    after a barrier)."""
    target = root / tag(step) / MARKER
    tmp = target.with_suffix(".tmp")
    tmp.write_text(json.dumps({"step": step, "world_size": world_size}))
    os.replace(tmp, target)


def written_by(root: Path, step: int) -> int:
    """How many ranks wrote complete checkpoint ``step`` (their ZeRO shards must be loaded by as many)."""
    return json.loads((root / tag(step) / MARKER).read_text()).get("world_size", 1)


def discard_incomplete(root: Path, step: int) -> None:
    """Remove what a crashed earlier write of ``step`` left behind, so a new save starts clean."""
    path = root / tag(step)
    if path.is_dir() and not (path / MARKER).is_file():
        shutil.rmtree(path)


def complete_steps(root: Path) -> list[int]:
    """Steps of the complete checkpoints, oldest first."""
    if not root.is_dir():
        return []
    steps = []
    for path in root.iterdir():
        marker = path / MARKER
        if path.name.startswith("step") and marker.is_file():
            steps.append(json.loads(marker.read_text())["step"])
    return sorted(steps)


def latest_complete(root: Path) -> int | None:
    steps = complete_steps(root)
    return steps[-1] if steps else None


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
