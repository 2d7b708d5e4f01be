"""experiments/report.py: builds the table, CSVs and PNGs from fake metrics.json files alone."""

import csv
import json
import sys
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
sys.path.insert(0, str(EXPERIMENTS))

from report import build_report  # noqa: E402
from reportlib.collect import collect  # noqa: E402


def metrics(
    method,
    budget,
    ppl,
    seed=0,
    ratio=None,
    heads=None,
    alpha=1.0,
    router="learned",
    rouge=None,
    decode=None,
    share=None,
):
    mix = method == "mixsga"
    native = 1024
    layers = 4
    return {
        "model": "fake-llama",
        "task": "wikitext2",
        "experiment": "t",
        "seed": seed,
        "method": method,
        "expert_kv_heads": heads if mix else ([int(budget * 4)] if method == "gqa" else None),
        "ratio": ratio,
        "router_grad": "straight_through" if mix else None,
        "router": router if mix else None,
        "alpha": alpha if mix else None,
        "kv_budget": budget,
        "kv_bytes_per_token": budget * native + (layers if mix else 0),
        "kv_bytes_per_token_native": native,
        "params": 1000,
        "attention": {
            "method": method,
            "native_kv_heads": 4,
            "num_layers": layers,
            "kv_budget": budget,
            "cla_groups": [[0, 1], [2, 3]] if method == "cla" else None,
        },
        "train": {"steps": 10, "tokens": 2560, "seconds": 2.0, "tokens_per_s": 1280.0, "final_loss": 3.0},
        "eval_before": {"ppl": ppl * 10, "ppl_causal_routing": ppl * 11},
        "eval": {
            "ppl": ppl,
            "ppl_causal_routing": ppl * 1.1,
            "word_ppl": ppl * 3,
            "word_ppl_causal_routing": ppl * 3.3,
            "kv_bytes_per_token": budget * native + (layers if mix else 0),
            "expert_fractions": {"prefill": ratio if mix else None, "decode": decode if mix else None},
            "routing_agreement": 0.9 if mix else None,
            "rouge_l": rouge or {},
            "kv_share_decode": share,
            "kv_share_causal": (share - 0.08 if share is not None else None) if mix else budget,
            "kv_bytes_per_token_decode": None if share is None else share * native,
        },
    }


@pytest.fixture
def sweep(tmp_path):
    runs = {
        "mha/0": metrics("mha", 1.0, 20.0),
        "gqa/0": metrics("gqa", 0.5, 30.0),
        "cla/0": metrics("cla", 0.5, 40.0),
        "mix/0": metrics(
            "mixsga",
            0.5,
            24.0,
            seed=0,
            ratio=[0.3, 0.1, 0.6],
            heads=[4, 2, 1],
            decode=[0.2, 0.2, 0.6],
            rouge={"dolly": 20.0, "sinst": 10.0},
            share=0.55,
        ),
        "mix/1": metrics(
            "mixsga",
            0.5,
            26.0,
            seed=1,
            ratio=[0.3, 0.1, 0.6],
            heads=[4, 2, 1],
            decode=[0.4, 0.0, 0.6],
            rouge={"dolly": 22.0, "sinst": 12.0},
            share=0.57,
        ),
        "mix/2": metrics("mixsga", 0.25, 50.0, ratio=[0.0, 0.0, 1.0], heads=[4, 2, 1], decode=[0.0, 0.0, 1.0]),
        "noaux/0": metrics(
            "mixsga", 0.5, 35.0, ratio=[0.3, 0.1, 0.6], heads=[4, 2, 1], alpha=0.0, decode=[0.34, 0.33, 0.33]
        ),
        "deep/nested/run/x": metrics(
            "mixsga", 0.5, 33.0, ratio=[0.05, 0.85, 0.1], heads=[4, 2, 1], decode=[0.1, 0.8, 0.1]
        ),
    }
    for name, m in runs.items():
        (tmp_path / "sweep" / name).mkdir(parents=True)
        (tmp_path / "sweep" / name / "metrics.json").write_text(json.dumps(m))
    (tmp_path / "sweep" / "not_a_run").mkdir()
    return tmp_path / "sweep"


def test_collect_reads_every_metrics_file_recursively(sweep):
    rows = collect(sweep)
    assert len(rows) == 8
    assert {r["config"] for r in rows} >= {
        "mha",
        "gqa 2kv",
        "cla 2/4 layers",
        "mixsga [4,2,1] 3:1:6",
        "mixsga [4,2,1] 3:1:6 alpha=0",
        "mixsga [4,2,1] 1:17:2",
        "mixsga [4,2,1] 0:0:1",
    }


def test_report_table_csv_and_plots(sweep, tmp_path):
    out = tmp_path / "report"
    result = build_report(sweep, out, title="fake sweep")
    md = (out / "report.md").read_text()
    assert md.startswith("# fake sweep")
    table = [line for line in md.splitlines() if line.startswith("| fake-llama")]
    assert len(table) == 7  # 8 runs, the two mixSGA 3:1:6 seeds aggregated
    mix = next(line for line in table if "| mixsga [4,2,1] 3:1:6 |" in line)
    # causal ppl (1.1 x 25), the KV its routing spent (mean of 0.47 and 0.49), the realised decode KV
    # (mean of 0.55 and 0.57), then top-k
    assert "| 27.50 ± 1.56 | 48.0% | 56.0% (50.0%) | 25.00 ± 1.41 |" in mix
    assert "| 0,1 |" in mix and "0.30/0.10/0.60 \\| 0.30/0.10/0.60" in mix
    assert "+1.00" in mix  # one id byte per layer over budget x native
    noaux = next(line for line in table if "alpha=0" in line)
    # no measured decode share: the realised budget comes from a near-uniform decode split, (.34*4+.33*2+.33)/4
    assert "0.34/0.33/0.33" in noaux and "| 58.8% (from fractions) (50.0%) |" in noaux
    assert "\\| 573.4 (56.0%)" in mix  # decode bytes per real token (0.56 x 1024), mean of 2 seeds
    gqa = next(line for line in table if "| gqa 2kv |" in line)
    assert "| 33.00 | 50.0% | 50.0% (50.0%) | 30.00 |" in gqa  # uniform methods decode at their nominal budget
    # budget order: mha (100%) first
    assert table[0].split("|")[2].strip() == "mha"
    with open(out / "summary.csv") as f:
        summary = {r["config"]: r for r in csv.DictReader(f)}
    assert float(summary["mixsga [4,2,1] 3:1:6"]["ppl"]) == pytest.approx(25.0)
    assert float(summary["mixsga [4,2,1] 3:1:6"]["rouge_l/dolly"]) == pytest.approx(21.0)
    assert summary["mixsga [4,2,1] 3:1:6"]["n"] == "2"
    assert float(summary["gqa 2kv"]["kv_budget"]) == pytest.approx(0.5)
    assert float(summary["mixsga [4,2,1] 3:1:6"]["realised_kv_budget"]) == pytest.approx(0.56)
    assert summary["mixsga [4,2,1] 3:1:6"]["realised_kv_source"] == "measured"
    assert float(summary["mixsga [4,2,1] 3:1:6"]["kv_share_causal"]) == pytest.approx(0.48)
    with open(out / "runs.csv") as f:
        runs = list(csv.DictReader(f))
    assert len(runs) == 8 and {r["seed"] for r in runs} == {"0", "1"}
    assert float(next(r for r in runs if r["run"] == "cla/0")["ppl_causal"]) == pytest.approx(44.0)
    for name in ("ppl_vs_budget.png", "rouge_l.png", "ratio_grid.png", "expert_fractions.png"):
        png = out / name
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"]({name})" in md
    assert set(result["files"]) >= {"report.md", "summary.csv", "runs.csv"}


def test_report_without_mixsga_or_rouge_skips_those_plots(tmp_path):
    for name, m in {"a": metrics("gqa", 0.25, 30.0), "b": metrics("cla", 0.5, 40.0)}.items():
        (tmp_path / "s" / name).mkdir(parents=True)
        (tmp_path / "s" / name / "metrics.json").write_text(json.dumps(m))
    build_report(tmp_path / "s", tmp_path / "r")
    assert (tmp_path / "r" / "ppl_vs_budget.png").is_file()
    assert not (tmp_path / "r" / "rouge_l.png").exists() and not (tmp_path / "r" / "expert_fractions.png").exists()


def test_empty_sweep_is_an_error(tmp_path):
    with pytest.raises(SystemExit, match="no metrics.json"):
        build_report(tmp_path, tmp_path / "r")
