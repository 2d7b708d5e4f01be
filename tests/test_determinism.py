"""The same config and seed give the same metrics.json on this machine: every number except the
wall-clock ones (train.seconds, train.tokens_per_s) is bitwise equal.

The repeat also has W&B configured to fail at start (an invalid project name, offline mode): the
run must finish with one warning and the same numbers, since tracking is not part of training.
"""

import json

import pytest
from cli import REPO
from training_runs import command, comparable, metrics, reference_run, run

pytestmark = pytest.mark.slow  # whole training runs in subprocesses; `make test` runs them, `make test-fast` not

WANDB_FAILS = ["logger=wandb", "logger.mode=offline", "logger.project=bad/name"]


def test_same_config_and_seed_give_the_same_metrics_even_when_wandb_fails(tmp_path):
    run_dir = tmp_path / "run"
    proc = run(command(run_dir, *WANDB_FAILS), WANDB_MODE="offline")
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [line for line in (proc.stdout + proc.stderr).splitlines() if "W&B failed" in line]
    assert len(warnings) == 1 and "training continues without tracking" in warnings[0], warnings
    reference = metrics(reference_run())
    assert comparable(metrics(run_dir)) == comparable(reference)
    assert len(reference["train"]["losses"]) == reference["train"]["steps"]


def test_provenance_records_seed_versions_and_commit():
    record = json.loads((reference_run() / "provenance.json").read_text())
    assert record["seed"] == metrics(reference_run())["seed"] == 1
    assert all(record["versions"][name] for name in ("torch", "transformers", "deepspeed", "hydra-core"))
    if (REPO / ".git").exists():
        assert len(record["git_commit"].split("-")[0]) == 40  # "-dirty" marks uncommitted changes
