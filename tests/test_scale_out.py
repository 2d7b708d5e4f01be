"""Scale-out pieces that need no cluster: gradient checkpointing, the user DeepSpeed JSON merge, Slurm ranks."""

import copy
import json

import pytest
import torch

from mixsga_train.attention import AttentionConfig, RoutingStats, convert_model, routing_context
from mixsga_train.config import TrainerConfig
from mixsga_train.errors import ConfigError
from mixsga_train.training.distributed import first_host, slurm_environment
from mixsga_train.training.engine_config import built_config, deepspeed_config
from mixsga_train.training.loop import enable_gradient_checkpointing
from tiny import tiny_model


def _train_step(model, checkpointing: bool):
    model = copy.deepcopy(model).train()
    if checkpointing:
        enable_gradient_checkpointing(model)
    stats = None
    if getattr(model, "_mixsga_resolved", None) is not None and model._mixsga_resolved.method == "mixsga":
        stats = routing_context(model).stats = RoutingStats(len(model._mixsga_resolved.expert_kv_heads))
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(1))
    out = model(input_ids=ids, labels=ids, use_cache=False)
    out.loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    return out.loss.item(), grads, stats


@pytest.mark.parametrize("family, attention", [("llama", dict(method="mixsga", ratio="1:1:2")),
                                               ("qwen2", dict(method="cla", budget=0.5)),
                                               ("gemma2", dict(method="gqa", kv_heads=2))])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(family, attention):
    model = tiny_model(family, layers=4)
    convert_model(model, AttentionConfig(**attention))
    loss, grads, stats = _train_step(model, checkpointing=False)
    loss_ckpt, grads_ckpt, stats_ckpt = _train_step(model, checkpointing=True)
    assert loss_ckpt == loss
    assert grads.keys() == grads_ckpt.keys() and all(g is not None for g in grads.values())
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=0, atol=1e-6, msg=name)
    if stats is not None:  # the recomputation routes again but is not counted again
        assert stats_ckpt.prefill.tolist() == stats.prefill.tolist() and stats.prefill.sum() == 4 * 2 * 16
        assert stats_ckpt.compared == stats.compared


def _user_json(tmp_path, payload) -> str:
    path = tmp_path / "ds.json"
    path.write_text(payload if isinstance(payload, str) else json.dumps(payload))
    return str(path)


def test_user_deepspeed_json_is_merged_over_the_built_config(tmp_path):
    user = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_clipping": 0.5,
        "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"},
                              "stage3_gather_16bit_weights_on_model_save": True},
        "optimizer": {"params": {"lr": "auto", "weight_decay": 0.0}},
    }
    cfg = TrainerConfig(micro_batch_size=3, grad_accum=2, zero_stage=2, deepspeed_config=_user_json(tmp_path, user))
    cfg.validate()
    built, merged = built_config(cfg, world_size=4), deepspeed_config(cfg, world_size=4)
    assert merged["train_micro_batch_size_per_gpu"] == 3 and merged["train_batch_size"] == 3 * 2 * 4
    assert merged["gradient_clipping"] == 0.5
    assert merged["zero_optimization"] == {"stage": 3, "offload_optimizer": {"device": "cpu"},
                                           "stage3_gather_16bit_weights_on_model_save": True}
    assert merged["optimizer"]["type"] == "AdamW" and merged["optimizer"]["params"]["lr"] == cfg.lr
    assert merged["optimizer"]["params"]["weight_decay"] == 0.0
    assert merged["optimizer"]["params"]["betas"] == built["optimizer"]["params"]["betas"]
    assert deepspeed_config(TrainerConfig(micro_batch_size=3, grad_accum=2), 4) == built_config(
        TrainerConfig(micro_batch_size=3, grad_accum=2), 4)


@pytest.mark.parametrize("payload, message", [
    ("{not json", "line 1: invalid JSON"),
    ("[1, 2]", "holds a list"),
    ({"scheduler": {"type": "WarmupLR"}}, "'scheduler' is set by the trainer"),
])
def test_bad_user_deepspeed_json_is_named_before_training(tmp_path, payload, message):
    cfg = TrainerConfig(deepspeed_config=_user_json(tmp_path, payload))
    with pytest.raises(ConfigError, match=message) as err:
        cfg.validate()
    assert "trainer.deepspeed_config" in str(err.value) and "\n" not in str(err.value)


def test_auto_without_a_built_value_is_refused(tmp_path):
    cfg = TrainerConfig(deepspeed_config=_user_json(tmp_path, {"zero_optimization": {"reduce_bucket_size": "auto"}}))
    with pytest.raises(ConfigError, match="zero_optimization.reduce_bucket_size is 'auto'"):
        deepspeed_config(cfg, 1)
    with pytest.raises(ConfigError, match="is not a file"):
        TrainerConfig(deepspeed_config=str(tmp_path / "missing.json")).validate()


SLURM = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NODELIST": "gpu[07-08,11]"}


def test_slurm_variables_give_rank_world_size_and_master(monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: None)  # no scontrol on this machine: parse the list
    assert slurm_environment(SLURM) == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
                                        "MASTER_ADDR": "gpu07", "MASTER_PORT": "29500"}
    assert slurm_environment({**SLURM, "MASTER_ADDR": "head", "MASTER_PORT": "1234"})["MASTER_ADDR"] == "head"
    assert slurm_environment({**SLURM, "RANK": "0"}) == {}  # a launcher (torchrun) already set the ranks
    assert slurm_environment({**SLURM, "SLURM_NTASKS": "1"}) == {}  # one task: the single-process defaults
    assert slurm_environment({}) == {}
    assert [first_host(x) for x in ("node1", "a[3-4]", "a[9],b2", "x-1[001-004]")] == ["node1", "a3", "a9", "x-1001"]


def test_slurm_master_comes_from_scontrol_when_available(monkeypatch, tmp_path):
    scontrol = tmp_path / "scontrol"
    scontrol.write_text("#!/bin/sh\necho head-node\necho other-node\n")
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{__import__('os').environ['PATH']}")
    assert slurm_environment(SLURM)["MASTER_ADDR"] == "head-node"


def test_worker_overrides_follow_the_slurm_rank(monkeypatch):
    from mixsga_train.training.distributed import launcher_rank, worker_overrides

    monkeypatch.delenv("RANK", raising=False)
    for key, value in SLURM.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr("shutil.which", lambda name: None)
    assert launcher_rank() == 5 and "hydra.output_subdir=null" in worker_overrides()
