"""Tests that need ``TRITON_INTERPRET=1`` run in a worker subprocess: the variable must be set
before triton is imported, and cannot be undone in a process. The worker prints one
``RESULTS_JSON {...}`` line that the parent test module parses."""

import json
import os
import subprocess
import sys

MARKER = "RESULTS_JSON "


def report(results: dict) -> None:
    """In the worker: hand the results to the parent."""
    print(MARKER + json.dumps(results))


def run_worker(test_file: str) -> dict:
    """In the parent: run ``python TEST_FILE --worker`` under the Triton interpreter on CPU."""
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, os.path.abspath(test_file), "--worker"], env=env, capture_output=True, text=True, timeout=300
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARKER)]
    assert proc.returncode == 0 and lines, (
        f"worker failed (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    return json.loads(lines[-1][len(MARKER) :])
