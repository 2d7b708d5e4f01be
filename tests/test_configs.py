"""Every shipped YAML composes with Hydra's compose API and validates against the typed schema."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from mixsga_train.config import to_run_config
from mixsga_train.errors import ConfigError

CONF = Path(__file__).resolve().parents[1] / "mixsga_train" / "conf"
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name != "hydra" and any(p.glob("*.yaml")))


def options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def composed(overrides, return_hydra_config=False):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=return_hydra_config)


def test_every_group_has_options():
    assert set(GROUPS) >= {"model", "attention", "task", "trainer", "logger", "experiment"}
    assert not {"zero", "precision"} & set(GROUPS)  # trainer.zero_stage, trainer.precision: one way to set each
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
    assert (r.expert_kv_heads, r.kv_budget, sft.trainer.lr, sft.task.split_sizes) == (
        [8, 4, 2],
        0.5,
        5e-5,
        [14000, 500, 500],
    )
    assert sft.trainer.micro_batch_size * sft.trainer.grad_accum == 32


@pytest.mark.parametrize("ratio", ["[3,1,6]", '"3:1:6"'])
def test_ratio_accepts_list_and_quoted_string(ratio):
    run = to_run_config(composed([f"attention.ratio={ratio}", "model=tiny_llama"]))
    assert run.validate().kv_budget == pytest.approx(0.5)


def test_layer_ratios_from_the_command_line():
    """Hydra's nested-list grammar reaches the per-layer ratios; tiny_llama has 2 layers, 4 KV heads."""
    run = to_run_config(composed(["attention.layer_ratios=[[1,0,0],'0:0:1']", "model=tiny_llama"]))
    resolved = run.validate()
    assert resolved.layer_ratios == [[1, 0, 0], [0, 0, 1]]
    assert resolved.kv_budget == pytest.approx((1 + 0.25) / 2)


def test_type_errors_name_the_key():
    with pytest.raises(ConfigError, match="trainer.max_steps"):
        to_run_config(composed(["trainer.max_steps=lots"]))


@pytest.mark.parametrize(
    "overrides, kv_heads, budget",
    [
        ([], 2, 0.5),  # neither key: the paper's baseline, group size 2
        (["attention.kv_heads=1"], 1, 0.25),
        (["model=tiny_llama_mha8", "attention.kv_heads=2"], 2, 0.25),  # the case: 8 native KV heads
        (["attention.budget=0.75"], 3, 0.75),
    ],
)
def test_gqa_user_key_wins_over_the_group_default(overrides, kv_heads, budget):
    resolved = to_run_config(composed(["attention=gqa", *overrides])).validate()  # tiny_llama: 4 KV heads
    assert (resolved.kv_heads, resolved.kv_budget) == (kv_heads, pytest.approx(budget))


def test_gqa_refuses_kv_heads_and_budget_that_disagree():
    with pytest.raises(ConfigError, match="attention.budget: 0.5 disagrees with kv_heads=1"):
        to_run_config(composed(["attention=gqa", "attention.kv_heads=1", "attention.budget=0.5"])).validate()


@pytest.mark.parametrize("launcher, target", [("slurm", "SlurmLauncher"), ("local", "LocalLauncher")])
def test_submitit_launcher_configs_compose(launcher, target):
    cfg = composed([f"hydra/launcher={launcher}"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_ == f"hydra_plugins.hydra_submitit_launcher.submitit_launcher.{target}"
    assert cfg.hydra.launcher.tasks_per_node == 1 and cfg.hydra.launcher.timeout_min > 0


@pytest.mark.parametrize("full_share, ratio", [(0.0, [0, 1, 0]), (0.1, [0.1, 0.7, 0.2]), (1 / 3, [1 / 3, 0, 2 / 3])])
def test_optuna_ratio_search_stays_on_the_budget(full_share, ratio):
    overrides = ["experiment=sweep_optuna_ratio", f"sweep.params.full_share={full_share}"]
    sweeper = composed(overrides, return_hydra_config=True).hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper")
    assert sweeper.params["sweep.params.full_share"] == "interval(0.0, 0.3333)"
    run = to_run_config(composed(overrides))
    resolved = run.validate()
    assert resolved.ratio == pytest.approx(ratio) and resolved.kv_budget == pytest.approx(0.5)
    assert resolved.expert_kv_heads == [8, 4, 2]


def test_optuna_ratio_outside_the_feasible_range_is_refused():
    with pytest.raises(ConfigError, match="attention.ratio"):
        to_run_config(composed(["experiment=sweep_optuna_ratio", "sweep.params.full_share=0.4"])).validate()


def test_a_local_checkpoint_declares_its_kv_heads_and_layers_through_config_json(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=3).save_pretrained(
        tmp_path
    )
    local = [
        "model.source=local",
        f"model.path={tmp_path}",
        "model.name=mine",
        "attention=mixsga",
        "attention.ratio=[1,1]",
        "attention.expert_kv_heads=[2,1]",
    ]
    resolved = to_run_config(composed(local)).validate()
    assert (resolved.native_kv_heads, resolved.num_layers, resolved.expert_kv_heads) == (2, 3, [2, 1])
    declared = to_run_config(composed([*local, "+model.native_kv_heads=2", "+model.num_layers=3"])).validate()
    assert declared == resolved


@pytest.mark.parametrize("how", ["--config-dir", "hydra.searchpath"])
def test_user_config_dirs_are_accepted_by_the_group_check(how, tmp_path, monkeypatch, capsys):
    import sys

    from mixsga_train import train

    (tmp_path / "model").mkdir()
    shipped = (CONF / "model" / "tiny_llama.yaml").read_text()
    (tmp_path / "model" / "my_llama.yaml").write_text(shipped.replace("tiny-llama", "mine"))
    where = ["--config-dir", str(tmp_path)] if how == "--config-dir" else [f"hydra.searchpath=[file://{tmp_path}]"]
    monkeypatch.setattr(sys, "argv", ["mixsga-train", *where, "model=my_llama", "--cfg", "job"])
    train.main()
    assert "name: mine" in capsys.readouterr().out
    monkeypatch.setattr(sys, "argv", ["mixsga-train", *where, "model=my_lama", "--cfg", "job"])
    with pytest.raises(SystemExit) as exit_info:
        train.main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "model: unknown option 'my_lama'; available: " in err and "my_llama" in err and "tiny_llama" in err


def test_evaluate_overrides_take_group_choices_then_keys():
    from mixsga_train.evaluate import apply_overrides

    saved = composed(["experiment=smoke_lm"])
    cfg = apply_overrides(saved, ["task=dolly", "task.max_new_tokens=8", "seed=3"])
    assert (cfg.task.name, cfg.task.kind, cfg.task.max_new_tokens, cfg.seed) == ("dolly", "sft", 8, 3)
    assert cfg.task.split_sizes == composed(["task=dolly"]).task.split_sizes  # the shipped option, whole
    assert cfg.model == saved.model
    with pytest.raises(ConfigError, match="task: unknown option 'doly'"):
        apply_overrides(saved, ["task=doly"])
