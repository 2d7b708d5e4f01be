"""The bad-input table: each case ends in one line naming the file or key and the fix, the
right exit code (2 for config/data errors, 3 for a diverged run), nothing already in the run
directory changed, and no model loaded when the data alone is wrong.

Most cases run ``mixsga-train`` in this process (fast); the diverging run is a real subprocess.
"""

import hashlib
import logging
import shutil
import sys

import pytest

from cli import DOLLY, WIKITEXT
from in_process import error_lines, run_train
from mixsga_train.training import checkpoints
from training_runs import run

SMOKE_LM = ["experiment=smoke_lm", f"task.local_dir={WIKITEXT}"]
SMOKE_SFT = ["experiment=smoke_sft", f"task.jsonl={DOLLY}"]


class Loaded(AssertionError):
    """Raised by the stand-ins below: the run got further than the bad input should allow."""


@pytest.fixture
def existing_run(tmp_path):
    """A run directory from an earlier, interrupted run: config, provenance, one complete checkpoint."""
    run_dir = tmp_path / "run"
    root = checkpoints.checkpoint_root(run_dir)
    (root / checkpoints.tag(4)).mkdir(parents=True)
    (root / checkpoints.tag(4) / "mp_rank_00_model_states.pt").write_bytes(b"weights")
    checkpoints.mark_complete(root, 4)
    (run_dir / "config.yaml").write_text("original: config\n")
    (run_dir / "provenance.json").write_text('{"seed": 0}\n')
    (run_dir / "eval_before.json").write_text('{"ppl": 300.0}\n')
    return run_dir


def snapshot(run_dir) -> dict:
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest() for p in run_dir.rglob("*") if p.is_file()}


def train_in_process(argv, monkeypatch, capsys, *, stop_at: str = "init_distributed") -> tuple[int, list[str]]:
    """``mixsga-train ARGV`` in this process; returns (exit code, the ``error:`` lines of stderr).

    ``stop_at`` names the pipeline step replaced by a stand-in that raises ``Loaded``: the error
    under test must come before it (``load_model``: before any model loads; ``init_distributed``:
    before training is set up and anything is written).
    """
    from mixsga_train import pipeline

    def reached(*args, **kwargs):
        raise Loaded(f"pipeline reached {stop_at}")

    monkeypatch.setattr(pipeline, stop_at, reached)
    code, stderr = run_train([*argv, "logger=none"], monkeypatch, capsys)
    assert "Traceback" not in stderr, stderr[-3000:]
    return code, error_lines(stderr)


def saved_config(argv: list[str], run_dir) -> None:
    """Write ``run_dir/config.yaml`` as a run of ``mixsga-train ARGV`` would have saved it."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from mixsga_train.cli_checks import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=argv)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.to_container(cfg, resolve=True)))


def corpus(tmp_path, valid: str, test: str | None = "some test text\n"):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "valid.txt").write_text(valid)
    if test is not None:
        (folder / "test.txt").write_text(test)
    return folder


def bad_jsonl(tmp_path):
    path = tmp_path / "bad.jsonl"
    lines = DOLLY.read_text().splitlines()[:2] + ['{"instruction": "Name a colour", "response": "red"']
    path.write_text("\n".join(lines) + "\n")
    return path


def case_malformed_jsonl(tmp_path):
    path = bad_jsonl(tmp_path)
    return [*SMOKE_SFT, f"task.jsonl={path}"], "load_model", f"{path}:3: malformed JSON", "fix or delete the line"


def case_empty_jsonl(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    return [*SMOKE_SFT, f"task.jsonl={path}"], "load_model", f"{path}: no records (the file is empty)", "one JSON object per line"


def case_empty_corpus(tmp_path):
    folder = corpus(tmp_path, valid="")
    return ([*SMOKE_LM, f"task.local_dir={folder}"], "load_model", f"{folder / 'valid.txt'}: blank",
            "every split needs text")


def case_too_short_corpus(tmp_path):
    folder = corpus(tmp_path, valid="A few words, far fewer than eighty bytes.\n")
    return ([*SMOKE_LM, f"task.local_dir={folder}"], "init_distributed",
            f"{folder / 'valid.txt'} (as train): 42 tokens, fewer than seq_len=80", "use a longer text or a smaller task.seq_len")


def case_missing_split(tmp_path):
    folder = corpus(tmp_path, valid="text\n", test=None)
    return [*SMOKE_LM, f"task.local_dir={folder}"], "load_model", f"task.local_dir: {folder / 'test.txt'} is missing", "needs valid.txt and test.txt"


def case_seq_len_above_model_max(tmp_path):
    return ([*SMOKE_LM, "task.seq_len=512"], "load_model",
            "task.seq_len: 512 exceeds model.max_seq_len=256 for tiny-llama", "lower task.seq_len")


def case_unknown_hub_model(tmp_path):
    return ([*SMOKE_LM, "model=smollm2_135m", "attention=mha", "model.source=hub", "model.hub_id=nobody/no-such-model"],
            "init_distributed", "model.hub_id: cannot load 'nobody/no-such-model'", "use model.source=local model.path=")


def case_unknown_hub_dataset(tmp_path):
    return (["experiment=smoke_lm"], "load_model",
            "Hub dataset wikitext/wikitext-2-raw-v1: cannot load it", "set task.local_dir to a folder with valid.txt and test.txt")


CASES = [case_malformed_jsonl, case_empty_jsonl, case_empty_corpus, case_too_short_corpus, case_missing_split,
         case_seq_len_above_model_max, case_unknown_hub_model, case_unknown_hub_dataset]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__[5:] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_loses_nothing(case, existing_run, tmp_path, monkeypatch, capsys):
    argv, stop_at, where, fix = case(tmp_path)
    argv = [*argv, f"hydra.run.dir={existing_run}", "trainer.resume=auto"]
    saved_config([*argv, "logger=none"], existing_run)  # resuming checks the run's own config.yaml
    before = snapshot(existing_run)
    code, errors = train_in_process(argv, monkeypatch, capsys, stop_at=stop_at)
    assert code == 2 and len(errors) == 1, errors
    assert where in errors[0] and fix in errors[0], errors[0]
    after = snapshot(existing_run)
    assert {k: after.get(k) for k in before} == before  # Hydra may add .hydra/ and its log; nothing existing changed


def test_nan_loss_stops_with_the_step_exit_3_and_keeps_the_last_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    proc = run([sys.executable, "-m", "mixsga_train.train", *SMOKE_LM, "trainer.lr=1e37", "trainer.save_every=1",
                "trainer.max_steps=4", "trainer.eval_before=false", f"hydra.run.dir={run_dir}"])
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 3 and len(errors) == 1, proc.stderr[-3000:]
    root = checkpoints.checkpoint_root(run_dir)
    assert errors[0].startswith("error: loss became inf at step 2; training stopped before applying it;")
    assert f"the last checkpoint is kept: {root / checkpoints.tag(1)}" in errors[0] and "lower trainer.lr" in errors[0]
    assert checkpoints.complete_steps(root) == [1]
    assert not (run_dir / "metrics.json").exists() and not (run_dir / "model").exists()


def test_a_tokenizer_without_pad_token_pads_with_eos(tmp_path):
    from transformers import AutoTokenizer

    from mixsga_train.data.instructions import SFTCollator
    from mixsga_train.models.registry import ModelConfig, load_model, tiny_model, tiny_tokenizer

    tokenizer = tiny_tokenizer(256)
    model = tiny_model(ModelConfig(source="tiny", tiny_layers=1, max_seq_len=256), tokenizer)
    tokenizer.pad_token = None
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path).pad_token is None
    _, loaded = load_model(ModelConfig(name="no-pad", source="local", path=str(tmp_path), max_seq_len=256))
    assert loaded.pad_token == loaded.eos_token == "<eos>"
    batch = SFTCollator(loaded.pad_token_id)([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4], "labels": [4]}])
    assert batch["input_ids"][1].tolist() == [4, loaded.eos_token_id, loaded.eos_token_id]
    assert batch["attention_mask"][1].tolist() == [1, 0, 0] and batch["labels"][1].tolist() == [4, -100, -100]


@pytest.fixture(scope="module")
def converted_checkpoints(tmp_path_factory):
    """save_pretrained directories of the same tiny model converted to mixSGA and to GQA with 2 and 1 KV heads."""
    from mixsga_train.attention import AttentionConfig, convert_model
    from mixsga_train.models.registry import ModelConfig, tiny_model, tiny_tokenizer

    folder = tmp_path_factory.mktemp("converted")
    methods = {"mixsga": dict(method="mixsga"), "mha": dict(method="mha"), "gqa2": dict(method="gqa", kv_heads=2),
               "gqa1": dict(method="gqa", kv_heads=1)}
    for name, attention in methods.items():
        tokenizer = tiny_tokenizer(256)
        model = tiny_model(ModelConfig(source="tiny", tiny_layers=1, max_seq_len=256), tokenizer)
        convert_model(model, AttentionConfig(**attention))
        model.save_pretrained(folder / name)
        tokenizer.save_pretrained(folder / name)
    return folder


def mixed(folder, config_of: str, weights_of: str, tmp_path):
    target = tmp_path / f"{config_of}-config-{weights_of}-weights"
    shutil.copytree(folder / config_of, target)
    shutil.copy(folder / weights_of / "model.safetensors", target / "model.safetensors")
    return target


def test_load_converted_names_a_checkpoint_from_another_method(converted_checkpoints, tmp_path):
    from mixsga_train.attention import load_converted

    target = mixed(converted_checkpoints, "mixsga", "mha", tmp_path)  # no router weights
    with pytest.raises(ValueError) as err:
        load_converted(target)
    message = str(err.value)
    assert "\n" not in message and str(target) in message and "was it saved from another method or budget?" in message


@pytest.mark.parametrize("config_of, weights_of", [("gqa1", "gqa2"), ("mixsga", "gqa2")])
def test_load_converted_names_a_checkpoint_from_another_budget(converted_checkpoints, tmp_path, config_of, weights_of):
    from mixsga_train.attention import load_converted

    target = mixed(converted_checkpoints, config_of, weights_of, tmp_path)
    with pytest.raises(ValueError, match="was it saved from another method or budget"):
        load_converted(target)


def test_evaluate_refuses_a_checkpoint_from_another_method(converted_checkpoints, tmp_path, capsys):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from mixsga_train import evaluate
    from mixsga_train.cli_checks import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*SMOKE_LM, "model.tiny_layers=1"])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    OmegaConf.save(cfg, run_dir / "config.yaml")
    checkpoint = converted_checkpoints / "gqa1"
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main([str(run_dir), "--checkpoint", str(checkpoint)])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert exit_info.value.code == 2 and len(errors) == 1
    assert f"--checkpoint: {checkpoint} holds gqa" in errors[0] and "but the config asks for mixsga" in errors[0]


def test_wandb_that_fails_to_start_warns_once_and_tracking_is_off(monkeypatch, tmp_path, caplog):
    import wandb

    from mixsga_train.config import LoggerConfig
    from mixsga_train.tracking import start_tracker

    def broken_init(**kwargs):
        raise RuntimeError("wandb-core could not start\nsecond line of detail")

    monkeypatch.setattr(wandb, "init", broken_init)
    with caplog.at_level(logging.WARNING, logger="mixsga_train.tracking"):
        tracker = start_tracker(LoggerConfig(mode="offline"), tmp_path, "run", "group", [], {}, is_main=True)
        tracker.log({"train/loss": 1.0}, step=1)
        tracker.summary({"train": {"final_loss": 1.0}})
        tracker.finish()
    assert not tracker.active
    assert [r.getMessage() for r in caplog.records] == [
        "W&B failed to start (RuntimeError: wandb-core could not start); training continues without tracking (logger=none turns it off)"
    ]


def test_wandb_that_fails_mid_run_warns_once_and_stops_tracking(caplog):
    from mixsga_train.tracking import Tracker

    class BrokenRun:
        calls = 0

        def log(self, metrics, step):
            BrokenRun.calls += 1
            raise OSError("disk full")

    tracker = Tracker(BrokenRun())
    with caplog.at_level(logging.WARNING, logger="mixsga_train.tracking"):
        for step in range(3):
            tracker.log({"train/loss": 1.0}, step=step)
        tracker.finish()
    assert BrokenRun.calls == 1 and not tracker.active
    assert [r.getMessage() for r in caplog.records] == ["W&B failed (OSError: disk full); the run continues without tracking"]
