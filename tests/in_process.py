"""Run ``mixsga-train`` in the test process (fast, no interpreter start): the exit code and stderr."""

import signal
import sys

import pytest


def run_train(argv: list[str], monkeypatch, capsys) -> tuple[int, str]:
    """``mixsga-train ARGV`` here; returns (exit code, stderr)."""
    code, _, stderr = run_train_output(argv, monkeypatch, capsys)
    return code, stderr


def run_train_output(argv: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    """``mixsga-train ARGV`` here; returns (exit code, stdout, stderr). A failing run leaves
    SIGINT/SIGTERM ignored (the process is meant to be exiting): the test process gets its
    handlers back."""
    from mixsga_train import train

    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    monkeypatch.setattr(sys, "argv", ["mixsga-train", *argv])
    try:
        with pytest.raises(SystemExit) as exit_info:
            train.main()
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]
