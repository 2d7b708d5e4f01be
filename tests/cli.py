"""Run the real command line in a subprocess (the way users and CI do)."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"  # small excerpts of the real datasets, see fixtures/README.md
WIKITEXT = FIXTURES / "wikitext-2"
DOLLY = FIXTURES / "dolly" / "dolly_sample.jsonl"


def run_cli(args: list[str], module: str = "mixsga_train.train", timeout: int = 600, env_extra: dict | None = None,
            **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false",
           **(env_extra or {})}
    env.pop("RANK", None)
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout, **kwargs)


def metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())
