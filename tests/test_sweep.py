"""Multiruns that survive: failed jobs recorded, finished jobs skipped, objectives returned to Optuna,
and the submitit launcher running real jobs in their own processes."""

import json

import pytest
import yaml
from omegaconf import OmegaConf

from cli import WIKITEXT, metrics, run_cli
from mixsga_train.errors import ConfigError
from mixsga_train.sweep import finished_run, objective, ratio_at_budget

TINY = ["experiment=smoke_lm", f"task.local_dir={WIKITEXT}", "trainer.max_steps=2", "trainer.eval_before=false",
        "attention=gqa"]


def test_a_failed_job_is_recorded_the_others_run_and_a_relaunch_skips_finished_jobs(tmp_path):
    # kv_heads=9 is more than the tiny model's 4 KV heads: job 1 fails validation, jobs 0 and 2 train.
    proc = run_cli(["-m", *TINY, "attention.kv_heads=1,9,2", f"hydra.sweep.dir={tmp_path}"])
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert sorted(p.parent.name for p in tmp_path.glob("*/metrics.json")) == ["0", "2"]
    error = json.loads((tmp_path / "1" / "error.json").read_text())
    assert error["exit_code"] == 2 and error["error"].startswith("attention.kv_heads: 9 is not in [1, 4]")
    summary = [line for line in proc.stderr.splitlines() if line.startswith(("sweep ", "failed job"))]
    assert summary == [
        f"sweep {tmp_path}: 3 jobs, 2 finished (0 already before this launch, skipped), 1 failed",
        f"failed job 1 (attention.kv_heads=9): {error['error']}",
    ]
    first = {d: (tmp_path / d / "metrics.json").stat().st_mtime_ns for d in ("0", "2")}

    # The same sweep fixed and relaunched into the same directory: 0 and 2 are skipped, 1 runs now.
    again = run_cli(["-m", *TINY, "attention.kv_heads=1,3,2", f"hydra.sweep.dir={tmp_path}"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert {d: (tmp_path / d / "metrics.json").stat().st_mtime_ns for d in ("0", "2")} == first
    assert metrics(tmp_path / "1")["expert_kv_heads"] == [3] and not (tmp_path / "1" / "error.json").exists()
    assert f"sweep {tmp_path}: 3 jobs, 3 finished (2 already before this launch, skipped), 0 failed" in again.stderr


def test_optuna_minimises_the_returned_objective(tmp_path):
    proc = run_cli(["-m", *TINY, "hydra/sweeper=optuna", "hydra/sweeper/sampler=grid", "hydra.sweeper.n_trials=2",
                    "attention.kv_heads=choice(1,4)", f"hydra.sweep.dir={tmp_path}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    jobs = {metrics(p.parent)["expert_kv_heads"][0]: metrics(p.parent) for p in tmp_path.glob("*/metrics.json")}
    assert len(list(tmp_path.glob("*/metrics.json"))) == 2
    best = min(jobs.values(), key=lambda m: m["eval"]["ppl_causal_routing"])
    assert results["best_value"] == pytest.approx(best["eval"]["ppl_causal_routing"])
    assert results["best_params"] == {"attention.kv_heads": best["expert_kv_heads"][0]}


def test_submitit_local_launcher_runs_two_real_jobs(tmp_path):
    proc = run_cli(["-m", *TINY, "hydra/launcher=local", "attention.kv_heads=1,2", f"hydra.sweep.dir={tmp_path}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(metrics(p.parent)["expert_kv_heads"][0] for p in tmp_path.glob("*/metrics.json")) == [1, 2]
    assert list((tmp_path / ".submitit").glob("*/*_result.pkl")), "the jobs ran through submitit"
    assert f"sweep {tmp_path}: 2 jobs, 2 finished (0 already before this launch, skipped), 0 failed" in proc.stderr


def test_a_job_dir_that_finished_another_config_is_refused(tmp_path):
    cfg = OmegaConf.create({"attention": {"kv_heads": 1}, "seed": 0})
    assert finished_run(cfg, tmp_path) is None
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    (tmp_path / "metrics.json").write_text('{"eval": {"ppl_causal_routing": 3.5}}')
    assert finished_run(cfg, tmp_path) == {"eval": {"ppl_causal_routing": 3.5}}
    with pytest.raises(ConfigError, match="holds a finished run of another config"):
        finished_run(OmegaConf.merge(cfg, {"attention": {"kv_heads": 2}}), tmp_path)


def test_objective_reads_a_dotted_metrics_key():
    m = {"eval": {"ppl_causal_routing": 12.5, "rouge_l": {"dolly_test": 20}}, "method": "gqa"}
    assert objective(m, "eval.ppl_causal_routing") == 12.5 and objective(m, "eval.rouge_l.dolly_test") == 20.0
    with pytest.raises(ConfigError, match="sweep.objective: 'eval.bleu' is not a key"):
        objective(m, "eval.bleu")
    with pytest.raises(ConfigError, match="not a number"):
        objective(m, "method")


@pytest.mark.parametrize("budget", [0.35, 0.5, 0.75])
def test_ratio_at_budget_solves_eq_11(budget):
    for full_share in (0.0, 0.05, 0.1):
        shares = ratio_at_budget(budget, full_share)
        assert sum(shares) == pytest.approx(1.0) and shares[0] == full_share
        assert shares[0] + shares[1] / 2 + shares[2] / 4 == pytest.approx(budget)
    assert ratio_at_budget(0.5, 0.1) == pytest.approx([0.1, 0.7, 0.2])  # the family x : 1-3x : 2x
