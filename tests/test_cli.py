"""End-to-end command-line runs on tiny models: real training through DeepSpeed, real metrics."""

import math

import pytest

from cli import DOLLY, WIKITEXT, metrics, run_cli


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("lm") / "run"
    proc = run_cli(["experiment=smoke_lm", f"task.local_dir={WIKITEXT}", "zero=stage2", f"hydra.run.dir={run_dir}"])
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
    # measured from the cache: 50% of native K/V + one uint8 expert id per layer (2 layers)
    assert after["kv_bytes_per_token"] == 0.5 * m["kv_bytes_per_token_native"] + 2
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


def test_standalone_evaluate_reproduces_the_run_metrics(lm_run):
    run_dir, _ = lm_run
    proc = run_cli([str(run_dir)], module="mixsga_train.evaluate")
    assert proc.returncode == 0, proc.stderr[-2000:]
    import json

    again = json.loads((run_dir / "eval.json").read_text())["eval"]
    assert again["ppl"] == pytest.approx(metrics(run_dir)["eval"]["ppl"], rel=1e-5)
    wrong = run_cli([str(run_dir), "attention.ratio=[1,1,2]"], module="mixsga_train.evaluate")
    assert wrong.returncode == 2 and "holds mixsga" in wrong.stderr and "pass the matching run directory" in wrong.stderr


def test_sft_run_writes_rouge_for_the_dolly_test_split(tmp_path):
    run_dir = tmp_path / "sft"
    proc = run_cli(["experiment=smoke_sft", f"task.jsonl={DOLLY}", "trainer.eval_before=false", f"hydra.run.dir={run_dir}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = metrics(run_dir)
    rouge = m["eval"]["rouge_l"]["dolly_test"]
    assert 0 <= rouge <= 100 and math.isfinite(m["eval"]["ppl"])
    assert sum(m["eval"]["expert_fractions"]["decode"]) == pytest.approx(1.0)
    assert m["eval"]["kv_bytes_per_token"] > 0 and m["train"]["steps"] == 4


def test_multirun_over_two_methods_writes_two_run_dirs(tmp_path):
    proc = run_cli(["-m", "experiment=smoke_lm", f"task.local_dir={WIKITEXT}", "attention=gqa,mixsga",
                    "trainer.max_steps=2", "trainer.eval_before=false", f"hydra.sweep.dir={tmp_path}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted(p.parent for p in tmp_path.glob("*/metrics.json"))
    assert [metrics(r)["method"] for r in runs] == ["gqa", "mixsga"]
