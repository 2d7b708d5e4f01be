"""Every shipped YAML composes with Hydra's compose API and validates against the typed schema."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from mixsga_train.config import to_run_config
from mixsga_train.errors import ConfigError

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir())


def options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def composed(overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def test_every_group_has_options():
    assert set(GROUPS) >= {"model", "attention", "task", "trainer", "logger", "experiment", "zero", "precision"}
    assert all(options(g) for g in GROUPS)


@pytest.mark.parametrize("group, option", [(g, o) for g in GROUPS if g != "experiment" for o in options(g)])
def test_each_option_composes_and_validates(group, option):
    overrides = [f"{group}={option}"]
    if group == "model":
        overrides.append("attention=mha")  # the default mixSGA experts need H_kv divisible by 4
    if group == "task":
        overrides.append("model.max_seq_len=1024")
    run = to_run_config(composed(overrides))
    resolved = run.validate()
    assert 0 < resolved.kv_budget <= 1


@pytest.mark.parametrize("experiment", options("experiment"))
def test_each_experiment_resolves(experiment):
    cfg = composed([f"experiment={experiment}"])
    run = to_run_config(cfg)
    resolved = run.validate()
    assert run.experiment_name != "default" and 0 < resolved.kv_budget <= 1


def test_quickstart_is_smollm2_mixsga_at_half_the_kv():
    run = to_run_config(composed(["experiment=quickstart"]))
    resolved = run.validate()
    assert run.model.source == "gguf_smollm2" and resolved.method == "mixsga"
    assert resolved.kv_budget == pytest.approx(0.5) and resolved.expert_kv_heads == [3, 1]


def test_paper_experiments_reproduce_the_papers_settings():
    cpt = to_run_config(composed(["experiment=paper_cpt_tinyllama"]))
    r = cpt.validate()
    assert (r.expert_kv_heads, r.kv_budget, cpt.trainer.lr, cpt.trainer.betas) == ([4, 2, 1], 0.5, 2e-4, [0.9, 0.95])
    assert (cpt.task.train_hub_path, cpt.task.hub_path, cpt.trainer.epochs) == ("JeanKaddour/minipile", "wikitext", 1)
    assert cpt.task.seq_len * cpt.trainer.micro_batch_size * cpt.trainer.grad_accum * 8 == 256 * 1024  # on 8 GPUs
    sft = to_run_config(composed(["experiment=paper_sft_llama3_2_1b"]))
    r = sft.validate()
    assert (r.expert_kv_heads, r.kv_budget, sft.trainer.lr, sft.task.split_sizes) == ([8, 4, 2], 0.5, 5e-5, [14000, 500, 500])
    assert sft.trainer.micro_batch_size * sft.trainer.grad_accum == 32


@pytest.mark.parametrize("ratio", ["[3,1,6]", '"3:1:6"'])
def test_ratio_accepts_list_and_quoted_string(ratio):
    run = to_run_config(composed([f"attention.ratio={ratio}", "model=tiny_llama"]))
    assert run.validate().kv_budget == pytest.approx(0.5)


def test_type_errors_name_the_key():
    with pytest.raises(ConfigError, match="trainer.max_steps"):
        to_run_config(composed(["trainer.max_steps=lots"]))
