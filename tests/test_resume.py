"""Checkpoints and resume: a run killed with SIGKILL or stopped with SIGINT, then resumed with the
same command plus ``trainer.resume=auto``, ends with exactly the metrics of an uninterrupted run
(bitwise on CPU fp32: weights, optimizer, scheduler and RNG are restored exactly, the data
position is the step number, and the pre-training evaluation is read back from the run dir).
"""

import hashlib
import json
import signal

import pytest

from in_process import run_train
from mixsga_train.errors import ConfigError
from mixsga_train.run_dir import check_run_dir
from mixsga_train.training import checkpoints
from training_runs import SAVE_EVERY, STEPS, command, comparable, metrics, reference_run, run, start, wait_for_checkpoint

RESUMED = {"train.resumed_from"}


def fake_half_written(root, step: int, like: int) -> None:
    """What a crash during the save of ``step`` leaves: the shard files, half written, and no marker."""
    target = root / checkpoints.tag(step)
    target.mkdir(exist_ok=True)
    for shard in (root / checkpoints.tag(like)).glob("*.pt"):
        data = shard.read_bytes()
        (target / shard.name).write_bytes(data[: len(data) // 2])
    (target / checkpoints.MARKER).unlink(missing_ok=True)


def test_sigkill_then_resume_gives_the_uninterrupted_metrics(tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "log"
    proc = start(command(run_dir), log)
    step = wait_for_checkpoint(proc, run_dir, log)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.kill()  # SIGKILL: no handler runs
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (run_dir / "metrics.json").exists()
    root = checkpoints.checkpoint_root(run_dir)
    last = checkpoints.latest_complete(root)
    assert step <= last < STEPS
    fake_half_written(root, last + SAVE_EVERY, like=last)
    assert checkpoints.latest_complete(root) == last  # the torn checkpoint is invisible

    resumed = run(command(run_dir, "trainer.resume=auto"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got = metrics(run_dir)
    assert got["train"]["resumed_from"] == last
    assert comparable(got, RESUMED) == comparable(metrics(reference_run()), RESUMED)  # bitwise
    assert checkpoints.complete_steps(root) == [STEPS - SAVE_EVERY, STEPS]  # pruned to keep_checkpoints=2


def test_sigint_saves_a_checkpoint_exits_130_and_resume_finishes(tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "log"
    proc = start(command(run_dir), log)
    wait_for_checkpoint(proc, run_dir, log)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=240)
    output = log.read_text()
    assert proc.returncode == 130, output[-3000:]
    error = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and "interrupted at step" in error[0] and "trainer.resume=auto" in error[0], output[-2000:]
    step = int(error[0].split("interrupted at step ")[1].split(";")[0])
    assert checkpoints.latest_complete(checkpoints.checkpoint_root(run_dir)) == step
    assert not (run_dir / "metrics.json").exists()

    resumed = run(command(run_dir, "trainer.resume=auto"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got = metrics(run_dir)
    assert got["train"]["resumed_from"] == step
    assert comparable(got, RESUMED) == comparable(metrics(reference_run()), RESUMED)


def snapshot(run_dir) -> dict:
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def test_a_finished_run_dir_is_refused_before_anything_is_written(monkeypatch, capsys):
    run_dir = reference_run()
    before = snapshot(run_dir)
    code, stderr = run_train([*command(run_dir)[3:], "trainer.resume=auto"], monkeypatch, capsys)
    assert code == 2
    assert stderr.strip().splitlines() == [
        f"error: hydra.run.dir: {run_dir} already holds a finished run (metrics.json); choose another directory or delete it"
    ]
    assert snapshot(run_dir) == before  # not even Hydra's .hydra/ or the log changed


def test_a_checkpointed_run_dir_needs_resume_auto_and_the_same_process_count(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    root = checkpoints.checkpoint_root(tmp_path)
    (root / checkpoints.tag(8)).mkdir(parents=True)
    checkpoints.mark_complete(root, 8)
    with pytest.raises(ConfigError, match=r"trainer.resume: .* has a checkpoint at step 8; pass trainer.resume=auto"):
        check_run_dir(tmp_path, "never")
    assert check_run_dir(tmp_path, "auto") == 8
    checkpoints.mark_complete(root, 8, world_size=2)
    with pytest.raises(ConfigError, match=r"step00000008 was written by 2 processes, not 1; resume with 2 processes"):
        check_run_dir(tmp_path, "auto")


def test_only_checkpoints_with_a_marker_count(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (4, 8, 12):
        (root / checkpoints.tag(step)).mkdir(parents=True)
        (root / checkpoints.tag(step) / "mp_rank_00_model_states.pt").write_bytes(b"x")
    checkpoints.mark_complete(root, 4)
    checkpoints.mark_complete(root, 8)
    (root / checkpoints.tag(12) / "complete.tmp").write_text(json.dumps({"step": 12}))  # killed before the rename
    assert checkpoints.complete_steps(root) == [4, 8] and checkpoints.latest_complete(root) == 8
    checkpoints.discard_incomplete(root, 12)
    checkpoints.discard_incomplete(root, 8)  # complete: kept
    assert sorted(p.name for p in root.iterdir()) == [checkpoints.tag(4), checkpoints.tag(8)]
    checkpoints.prune(root, keep=1)
    assert checkpoints.complete_steps(root) == [8]
