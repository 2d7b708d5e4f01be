"""Every config error is one line naming the key and the fix, exit code 2, before anything loads."""

import time

import pytest

from cli import run_cli
from in_process import run_train

CASES = [
    (["attention.ratio=[3,1]"], "attention.ratio: has 2 entries but attention.expert_kv_heads has 3"),
    (["attention.ratio=[3,-1,6]"], "attention.ratio: [3, -1, 6] has a negative entry"),
    (["attention.ratio=[0,0,0]"], "attention.ratio: [0, 0, 0] is all zero"),
    (["attention.expert_kv_heads=[4,3,1]", "attention.ratio=[1,1,1]"], None),  # uneven partitions are allowed
    (["attention.expert_kv_heads=[8,4,2]"], "attention.expert_kv_heads: [8, 4, 2] must be integers in [1, 4]"),
    (["model=smollm2_135m"], "attention.expert_kv_heads: the paper's group sizes 1,2,4 need H_kv divisible by 4"),
    (["attention=gqa", "attention.budget=1.5"], "attention.budget: 1.5 is outside (0, 1]"),
    (["attention=cla", "attention.budget=0"], "attention.budget: 0.0 is outside (0, 1]"),
    (["model=llama3_2_2b"], "model: unknown option 'llama3_2_2b'; available: gemma2_2b"),
    (["attention=gqa,mixsg"], "attention: unknown option 'mixsg'"),
    (["task=wikitext2", "task.local_dir=/nonexistent/wikitext"], "task.local_dir"),
    (["task=dolly", "task.jsonl=/nonexistent/dolly.jsonl", "model.max_seq_len=512"], "task.jsonl"),
    (["task=wikitext2", "task.seq_len=4096"], "task.seq_len: 4096 exceeds model.max_seq_len=256 for tiny-llama"),
    (["trainer.max_steps=lots"], "trainer.max_steps"),
]


@pytest.mark.parametrize("overrides, message", [c for c in CASES if c[1] is not None])
def test_config_error_is_one_line_with_exit_code_2(overrides, message, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    code, stderr = run_train([*overrides, f"hydra.run.dir={run_dir}", "logger=none"], monkeypatch, capsys)
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(errors) == 1 and message in errors[0], stderr[-2000:]
    assert "Traceback" not in stderr
    assert not (run_dir / "model").exists() and not (run_dir / "metrics.json").exists()


def test_the_real_command_exits_2_quickly(tmp_path):
    start = time.perf_counter()
    proc = run_cli(["attention.ratio=[3,-1,6]", f"hydra.run.dir={tmp_path}"], timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: attention.ratio:")
    assert time.perf_counter() - start < 60  # nothing expensive ran


def test_uneven_expert_partitions_are_accepted():
    from hydra import compose, initialize_config_dir

    from mixsga_train.config import to_run_config
    from test_configs import CONF

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["attention.expert_kv_heads=[4,3,1]", "attention.ratio=[1,1,1]"])
    assert to_run_config(cfg).validate().kv_budget == pytest.approx((4 + 3 + 1) / 12)
