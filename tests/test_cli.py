"""End-to-end command-line runs on tiny models: real training through DeepSpeed, real metrics."""

import math

import pytest
from cli import DOLLY, WIKITEXT, metrics, run_cli

from mixsga_train.metrics import EvalMetrics, RunMetrics


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("lm") / "run"
    proc = run_cli(
        ["experiment=smoke_lm", f"task.local_dir={WIKITEXT}", "trainer.zero_stage=2", f"hydra.run.dir={run_dir}"]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, proc


def test_lm_run_trains_through_deepspeed_and_writes_real_metrics(lm_run):
    run_dir, proc = lm_run
    m = metrics(run_dir)
    assert m["method"] == "mixsga" and m["ratio"] == pytest.approx([0.3, 0.1, 0.6]) and m["kv_budget"] == 0.5
    before, after = m["eval_before"], m["eval"]
    for block in (before, after):
        assert all(math.isfinite(block[k]) for k in ("ppl", "ppl_causal_routing", "word_ppl"))
    assert after["ppl"] < before["ppl"]  # training helped
    assert m["train"]["steps"] == 8 and m["train"]["tokens"] == 8 * 4 * 80 and m["train"]["final_loss"] < math.log(320)
    # measured from the cache: 50% of native K/V + a uint8 expert id and an int32 slot position per layer (2 layers)
    assert after["kv_bytes_per_token"] == 0.5 * m["kv_bytes_per_token_native"] + 2 * (1 + 4)
    assert m["kv_bytes_per_token_native"] == 2 * 2 * 4 * 16 * 4
    fractions = after["expert_fractions"]["prefill"]
    assert fractions == pytest.approx([0.3, 0.1, 0.6])
    assert sum(after["expert_fractions"]["decode"]) == pytest.approx(1.0) and after["decode_tokens"] > 0
    native = m["kv_bytes_per_token_native"]
    assert after["kv_share_decode"] == pytest.approx(after["kv_bytes_per_token_decode"] / native)
    assert 0 <= after["routing_agreement"] <= 1
    assert (run_dir / "config.yaml").is_file() and (run_dir / "provenance.json").is_file()
    assert (run_dir / "model" / "config.json").is_file()
    assert "perplexity after training:  " in proc.stdout and "causal routing; top-k" in proc.stdout
    assert "KV bytes per real token, decode" in proc.stdout
    assert RunMetrics.from_json(m).to_json() == m  # the typed contract reads and writes exactly these keys


def test_standalone_evaluate_reproduces_the_run_metrics(lm_run):
    run_dir, _ = lm_run
    proc = run_cli([str(run_dir)], module="mixsga_train.evaluate")
    assert proc.returncode == 0, proc.stderr[-2000:]
    import json

    again = json.loads((run_dir / "eval.json").read_text())["eval"]
    assert again["ppl"] == pytest.approx(metrics(run_dir)["eval"]["ppl"], rel=1e-5)
    wrong = run_cli([str(run_dir), "attention.ratio=[1,1,2]"], module="mixsga_train.evaluate")
    assert (
        wrong.returncode == 2 and "holds mixsga" in wrong.stderr and "pass the matching run directory" in wrong.stderr
    )


def test_standalone_evaluate_applies_a_decode_policy_override(lm_run):
    """``attention.decode_policy=...`` re-evaluates the checkpoint under that policy (it does not
    change the weights); ``calibrated`` fits its thresholds on the run's training data first."""
    import json

    run_dir, _ = lm_run
    evals = {}
    for policy in ("argmax", "calibrated"):
        proc = run_cli(
            [str(run_dir), f"attention.decode_policy={policy}", "--name", f"eval_{policy}"],
            module="mixsga_train.evaluate",
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        evals[policy] = json.loads((run_dir / f"eval_{policy}.json").read_text())["eval"]
    evals["budget"] = metrics(run_dir)["eval"]  # the default
    causal = {p: tuple(e["expert_fractions"]["causal"]) for p, e in evals.items()}
    assert len(set(causal.values())) == 3  # three policies, three routings of the same tokens
    assert evals["calibrated"]["ppl"] == pytest.approx(evals["budget"]["ppl"], rel=1e-5)  # top-k is unchanged
    for policy in ("budget", "calibrated"):  # 50% of native K/V plus the id and slot bytes, at most
        assert evals[policy]["kv_share_decode"] <= 0.5 + 2 * (1 + 4) / metrics(run_dir)["kv_bytes_per_token_native"]


def test_sft_run_writes_rouge_for_the_dolly_test_split(tmp_path):
    run_dir = tmp_path / "sft"
    proc = run_cli(
        ["experiment=smoke_sft", f"task.jsonl={DOLLY}", "trainer.eval_before=false", f"hydra.run.dir={run_dir}"]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = metrics(run_dir)
    rouge = m["eval"]["rouge_l"]["dolly_test"]
    assert 0 <= rouge <= 100 and math.isfinite(m["eval"]["ppl"])
    assert sum(m["eval"]["expert_fractions"]["decode"]) == pytest.approx(1.0)
    assert m["eval"]["kv_bytes_per_token"] > 0 and m["train"]["steps"] == 4


def test_quickstart_sft_runs_offline_with_the_makefiles_fixture_paths(tmp_path):
    """``make train-sft``'s config and file arguments, on the tiny model instead of SmolLM2: ROUGE-L
    on the held-out Dolly split and on the Self-Instruct seed excerpt, before and after training."""
    import re

    from cli import REPO

    recipe = (REPO / "Makefile").read_text().split("train-sft: setup")[1].split("\n\n")[0]
    args = [a.strip("'") for a in re.findall(r"(experiment=\S+|task\.jsonl=\S+|'task\.eval_sets=[^']+')", recipe)]
    assert [a.split("=")[0] for a in args] == ["experiment", "task.jsonl", "task.eval_sets"]
    run_dir = tmp_path / "quickstart_sft"
    overrides = ["model=tiny_llama", "logger=none", "trainer.max_steps=2", f"hydra.run.dir={run_dir}"]
    proc = run_cli(args + overrides)  # from the repository root, as make runs it
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = metrics(run_dir)
    assert m["experiment"] == "quickstart_sft" and m["ratio"] == pytest.approx([0.25, 0.75])
    for block in (m["eval_before"], m["eval"]):
        assert set(block["rouge_l"]) == {"dolly_test", "seed_tasks"}
        assert all(0 <= v <= 100 for v in block["rouge_l"].values())


def test_sft_run_without_eval_sets_reports_no_kv_bytes_instead_of_crashing(tmp_path):
    """``task.eval_sets=[]`` validates: nothing is generated, so the KV keys are null; the run's summary and
    ``mixsga-evaluate`` leave them out instead of failing on None."""
    run_dir = tmp_path / "sft"
    proc = run_cli(
        [
            "experiment=smoke_sft",
            f"task.jsonl={DOLLY}",
            "task.eval_sets=[]",
            "trainer.max_steps=0",
            f"hydra.run.dir={run_dir}",
        ]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = RunMetrics.from_json(metrics(run_dir))
    assert m.kv_bytes_per_token is None and m.eval.kv_bytes_per_token_decode is None and m.eval.rouge_l == {}
    assert math.isfinite(m.eval.ppl) and "perplexity after training:" in proc.stdout
    assert "KV bytes per real token" not in proc.stdout
    again = run_cli([str(run_dir)], module="mixsga_train.evaluate")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "KV bytes/real token" not in again.stdout and "perplexity" in again.stdout
    import json

    evaluated = EvalMetrics.from_json(json.loads((run_dir / "eval.json").read_text())["eval"])
    assert evaluated.ppl == pytest.approx(m.eval.ppl, rel=1e-5) and evaluated.kv_bytes_per_token is None


def test_run_metrics_read_older_files_with_missing_keys_as_null():
    old = {
        "model": "m",
        "task": "t",
        "method": "gqa",
        "kv_budget": 0.5,
        "eval": {"ppl": 3.0, "ppl_causal_routing": 3.0},
    }
    read = RunMetrics.from_json(old)
    assert read.eval.ppl == 3.0 and read.eval.kv_share_decode is None and read.train is None
    assert read.eval.expert_fractions.decode is None and read.attention == {} and read.eval_before is None


def test_multirun_over_two_methods_writes_two_run_dirs(tmp_path):
    proc = run_cli(
        [
            "-m",
            "experiment=smoke_lm",
            f"task.local_dir={WIKITEXT}",
            "attention=gqa,mixsga",
            "trainer.max_steps=2",
            "trainer.eval_before=false",
            f"hydra.sweep.dir={tmp_path}",
        ]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted(p.parent for p in tmp_path.glob("*/metrics.json"))
    assert [metrics(r)["method"] for r in runs] == ["gqa", "mixsga"]
