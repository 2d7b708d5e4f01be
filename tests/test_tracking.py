"""W&B: what a sweep, its runs and a re-evaluation write into W&B's offline run files, read back
with W&B's own reader (`wandb leet inspect --json`)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cli import WIKITEXT, metrics, run_cli
from mixsga_train.config import LoggerConfig
from mixsga_train.tracking import run_name, wandb_mode

WANDB = str(Path(sys.executable).parent / "wandb")


def records(wandb_run_dir: Path) -> list[dict]:
    """Every record of one offline run, as W&B's inspector prints them."""
    out = subprocess.run([WANDB, "leet", "inspect", "--json", str(wandb_run_dir)], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    return [json.loads(line) for line in out.splitlines()]


def offline_runs(folder: Path) -> dict[str, list[dict]]:
    """The offline runs under ``folder/wandb`` by display name."""
    runs = {}
    for run_dir in sorted((folder / "wandb").glob("offline-run-*")):
        recs = records(run_dir)
        runs[next(r["run"]["display_name"] for r in recs if r["type"] == "run")] = recs
    return runs


def history(recs: list[dict]) -> list[dict]:
    return [r["history"]["item"] for r in recs if r["type"] == "history"]


def run_record(recs: list[dict]) -> dict:
    return next(r["run"] for r in recs if r["type"] == "run")


def test_a_sweep_logs_named_runs_eval_curves_samples_a_summary_chart_and_reevaluations(tmp_path):
    env = {"WANDB_MODE": "offline", "WANDB_PROJECT": "from-env"}
    proc = run_cli(["-m", "experiment=smoke_lm", f"task.local_dir={WIKITEXT}", "logger=wandb", "attention=gqa",
                    "attention.kv_heads=1,2", "trainer.max_steps=4", "trainer.eval_every=2",
                    "trainer.eval_before=false", "logger.samples=2", f"hydra.sweep.dir={tmp_path}"], env_extra=env)
    assert proc.returncode == 0, proc.stderr[-3000:]

    for job, kv_heads, name in (("0", 1, "gqa-25%-s0"), ("1", 2, "gqa-50%-s0")):
        m = metrics(tmp_path / job)
        assert m["expert_kv_heads"] == [kv_heads]
        (recs,) = offline_runs(tmp_path / job).values()
        run = run_record(recs)
        identity = (run["display_name"], run["project"], run["run_group"], run["job_type"])
        assert identity == (name, "from-env", "smoke_lm", "train")
        assert sorted(run["tags"]) == ["budget:0.250" if kv_heads == 1 else "budget:0.500", "method:gqa"]
        curve = {row["_step"]: row["eval/ppl"] for row in history(recs) if "eval/ppl" in row}
        assert sorted(curve) == [2, 4] and curve[4] == pytest.approx(m["eval"]["ppl"])  # during and after training
        assert curve[2] != curve[4]
        samples = next(row for row in history(recs) if "samples.path" in row)
        assert (samples["samples._type"], samples["samples.nrows"], samples["samples.ncols"]) == ("table-file", 2, 3)
        table_file = next((tmp_path / job / "wandb").glob(f"offline-run-*/files/{samples['samples.path']}"))
        table = json.loads(table_file.read_text())
        assert table["columns"] == ["prompt", "reference", "generation"] and len(table["data"]) == 2

    (summary,) = offline_runs(tmp_path).values()  # the sweep's summary run, in the sweep directory
    assert (run_record(summary)["display_name"], run_record(summary)["job_type"]) == ("smoke_lm-summary",
                                                                                      "sweep-summary")
    logged = next(row for row in history(summary) if "budget_curve.path" in row)
    assert logged["budget_curve.nrows"] == 2 and "budget_curve_chart_table.path" in logged
    table_file = next((tmp_path / "wandb").glob(f"offline-run-*/files/{logged['budget_curve.path']}"))
    table = json.loads(table_file.read_text())
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]
    jobs = [metrics(tmp_path / j) for j in "01"]
    assert [(r["kv_budget"], r["eval.ppl_causal_routing"]) for r in rows] == [
        (m["kv_budget"], pytest.approx(m["eval"]["ppl_causal_routing"])) for m in jobs
    ]

    again = run_cli([str(tmp_path / "0"), "task=shakespeare", "task.seq_len=80", "task.max_eval_tokens=800", "--name",
                     "shakespeare"], module="mixsga_train.evaluate", env_extra=env)
    assert again.returncode == 0, again.stderr[-3000:]
    evaluated = json.loads((tmp_path / "0" / "shakespeare.json").read_text())["eval"]
    runs = offline_runs(tmp_path / "0")
    recs = runs["gqa-25%-s0-shakespeare"]
    assert run_record(recs)["job_type"] == "evaluate"
    assert history(recs)[-1]["shakespeare/ppl"] == pytest.approx(evaluated["ppl"])


def test_wandb_settings_come_from_the_environment_unless_the_config_sets_them(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert wandb_mode(LoggerConfig()) == "offline"
    monkeypatch.setenv("WANDB_MODE", "online")
    assert wandb_mode(LoggerConfig()) == "online" and wandb_mode(LoggerConfig(mode="disabled")) == "disabled"


def test_run_names_say_method_budget_ratio_and_seed():
    assert run_name("mixsga", 0.5, [0.3, 0.1, 0.6], 2) == "mixsga-50%-0.3:0.1:0.6-s2"
    assert run_name("gqa", 1 / 3, [1.0], 0) == "gqa-33.33%-s0"
    assert run_name("mha", 1.0, None, 1) == "mha-100%-s1"
