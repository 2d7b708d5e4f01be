"""The hostile-input table (issue 13): what a careless or unlucky user does, one row each, grouped
by class. Every row ends in one ``error:`` line with the right exit code (or a correct run), and
nothing of another run is lost. Rows run in this process with tiny models; three rows need a real
process (a lock held by another process, an evaluation-only run, SIGTERM during training).
"""

import errno
import hashlib
import json
import os
import signal
import time

import pytest
from cli import DOLLY, WIKITEXT
from in_process import error_lines, run_train, run_train_output
from training_runs import command, run, start, wait_for_checkpoint

from mixsga_train.errors import ConfigError, DataError, StorageError
from mixsga_train.training import checkpoints

SMOKE_LM = ["experiment=smoke_lm", f"task.local_dir={WIKITEXT}", "logger=none"]
SMOKE_SFT = ["experiment=smoke_sft", f"task.jsonl={DOLLY}", "logger=none"]
BUSY = (
    "error: hydra.run.dir: {run_dir} is in use by another running mixsga-train; wait for it or choose another directory"
)


class Reached(AssertionError):
    """Raised by a pipeline stand-in: the run got further than the hostile input should allow."""


def snapshot(folder) -> dict:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


def stop_at(monkeypatch, name: str) -> None:
    from mixsga_train import pipeline

    def reached(*args, **kwargs):
        raise Reached(f"pipeline reached {name}")

    monkeypatch.setattr(pipeline, name, reached)


def one_error(argv, monkeypatch, capsys, code: int = 2) -> str:
    """Run ``mixsga-train ARGV`` here; assert exit ``code``, one ``error:`` line, no traceback; return the line."""
    got, stderr = run_train(argv, monkeypatch, capsys)
    errors = error_lines(stderr)
    assert got == code and len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return errors[0]


def saved_config(argv: list[str], run_dir) -> None:
    """``run_dir/config.yaml`` as ``mixsga-train ARGV`` saves it."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from mixsga_train.cli_checks import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=argv)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.to_container(cfg, resolve=True)))


def fake_checkpoint(root, step: int, **files: bytes) -> None:
    """A complete checkpoint ``step`` holding ``files`` (name -> bytes), marked as the trainer marks it."""
    folder = root / checkpoints.tag(step)
    folder.mkdir(parents=True)
    files = files or {"mp_rank_00_model_states.pt": b"weights" * 10, "optim_states.pt": b"adam" * 10}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    checkpoints.mark_complete(root, step)


@pytest.fixture
def checkpointed_run(tmp_path):
    """An interrupted run of SMOKE_LM (attention 3:1:6): its config.yaml, provenance and checkpoints 4 and 8."""
    run_dir = tmp_path / "run"
    saved_config([*SMOKE_LM, f"hydra.run.dir={run_dir}"], run_dir)
    (run_dir / "provenance.json").write_text('{"seed": 0}\n')
    root = checkpoints.checkpoint_root(run_dir)
    fake_checkpoint(root, 4)
    fake_checkpoint(root, 8)
    return run_dir


# -- 1. Two runs, one run directory -----------------------------------------------------------------


def test_default_run_dirs_differ_within_one_second():
    from mixsga_train.cli_checks import compose

    dirs = {str(compose([]).hydra.run.dir) for _ in range(3)}
    assert len(dirs) == 3  # same second, three names: the ${run_id:} suffix


def test_a_busy_run_dir_is_refused_before_anything_is_touched(tmp_path, monkeypatch, capsys):
    from mixsga_train.run_dir import hold_run_dir

    run_dir = tmp_path / "run"
    stop_at(monkeypatch, "read_task")
    with hold_run_dir(run_dir):  # another run holds it
        error = one_error([*SMOKE_LM, f"hydra.run.dir={run_dir}"], monkeypatch, capsys)
    assert error == BUSY.format(run_dir=run_dir)
    assert list(run_dir.iterdir()) == []  # not even Hydra's .hydra/


def test_a_busy_run_dir_is_refused_across_processes(tmp_path):
    from mixsga_train.run_dir import hold_run_dir

    run_dir = tmp_path / "run"
    with hold_run_dir(run_dir):
        proc = run(command(run_dir, "logger=none"), timeout=120)
    assert proc.returncode == 2 and error_lines(proc.stderr) == [BUSY.format(run_dir=run_dir)], proc.stderr[-2000:]
    assert list(run_dir.iterdir()) == []


def test_an_interpolated_run_dir_of_a_finished_run_is_refused_before_hydra_writes(tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "finished" / "smoke_lm"
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.json").write_text("{}\n")
    monkeypatch.setenv("HOSTILE_ROOT", str(tmp_path / "finished"))
    stop_at(monkeypatch, "read_task")
    error = one_error([*SMOKE_LM, "hydra.run.dir=${oc.env:HOSTILE_ROOT}/${experiment_name}"], monkeypatch, capsys)
    assert error == (
        f"error: hydra.run.dir: {run_dir} already holds a finished run (metrics.json); "
        "choose another directory or delete it"
    )
    assert sorted(p.name for p in run_dir.iterdir()) == ["metrics.json"]


@pytest.mark.parametrize(
    "run_dir, message",
    [
        ("", "hydra.run.dir: is empty; give a directory for the run"),
        ("a_file", "is a file, not a directory; choose a directory path"),
    ],
)
def test_a_run_dir_that_is_no_directory_is_refused(run_dir, message, tmp_path, monkeypatch, capsys):
    (tmp_path / "a_file").write_text("not a run\n")
    monkeypatch.chdir(tmp_path)
    stop_at(monkeypatch, "read_task")
    error = one_error([*SMOKE_LM, f"hydra.run.dir={run_dir}"], monkeypatch, capsys)
    assert message in error, error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]  # nothing written into the working directory


# -- 2. Finished work is never overwritten ------------------------------------------------------------


@pytest.mark.parametrize(
    "name, problem",
    [
        ("metrics", "is a name the run itself uses"),
        ("eval_before", "is a name the run itself uses"),
        ("provenance", "is a name the run itself uses"),
        ("earlier", "already exists; choose another --name"),
        ("../elsewhere", "must be a plain file name"),
    ],
)
def test_evaluate_refuses_names_the_run_uses(name, problem, tmp_path, capsys):
    from mixsga_train import evaluate

    run_dir = tmp_path / "run"
    saved_config(SMOKE_LM, run_dir)
    for stem in ("metrics", "eval_before", "provenance", "earlier"):
        (run_dir / f"{stem}.json").write_text(f'{{"{stem}": 1}}\n')
    model = converted_model(tmp_path)  # mixSGA 3:1:6, as SMOKE_LM asks
    before = snapshot(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main([str(run_dir), "--name", name, "--checkpoint", str(model)])
    errors = error_lines(capsys.readouterr().err)
    assert exit_info.value.code == 2 and len(errors) == 1 and problem in errors[0], errors
    assert snapshot(tmp_path) == before


# -- 3. Resume with another config, or from a damaged checkpoint --------------------------------------


@pytest.mark.parametrize(
    "change, diff",
    [
        (["attention.ratio=[1,1,2]"], "attention.ratio=[3, 1, 6] -> [1, 1, 2]"),
        (["attention=gqa"], "attention.method=mixsga -> gqa"),
        (["trainer.lr=1e-3"], "trainer.lr=0.003 -> 0.001"),
        (["trainer.max_steps=40"], "trainer.max_steps=8 -> 40"),
        (["task.seq_len=40"], "task.seq_len=80 -> 40"),
    ],
)
def test_resume_with_another_config_is_refused_with_a_diff(change, diff, checkpointed_run, monkeypatch, capsys):
    before = snapshot(checkpointed_run)
    stop_at(monkeypatch, "read_task")
    argv = [*SMOKE_LM, *change, f"hydra.run.dir={checkpointed_run}", "trainer.resume=auto"]
    error = one_error(argv, monkeypatch, capsys)
    assert error.startswith(f"error: trainer.resume: {checkpointed_run} was checkpointed with another config: ")
    assert diff in error and error.endswith("resume with the original values, or start a new run directory")
    assert {k: v for k, v in snapshot(checkpointed_run).items() if not k.startswith(".hydra")} == before


def test_resume_may_change_logging_and_evaluation_only(checkpointed_run):
    from omegaconf import OmegaConf

    from mixsga_train.run_dir import check_run_dir

    requested = OmegaConf.to_container(OmegaConf.load(checkpointed_run / "config.yaml"))
    requested["trainer"].update(eval_batch_size=1, log_every=1, save_every=2, keep_checkpoints=5, resume="auto")
    requested["logger"]["backend"] = "wandb"
    requested["task"]["max_eval_tokens"] = 2000
    assert check_run_dir(checkpointed_run, "auto", requested) == 8
    requested["seed"] = 7
    with pytest.raises(ConfigError, match=r"another config: seed=0 -> 7;"):
        check_run_dir(checkpointed_run, "auto", requested)


def corrupt_marker(root):
    (root / checkpoints.tag(8) / checkpoints.MARKER).write_text('{"step": 8, "world')


def truncate_model_state(root):
    path = root / checkpoints.tag(8) / "mp_rank_00_model_states.pt"
    path.write_bytes(path.read_bytes()[:5])


def lose_optimizer(root):
    (root / checkpoints.tag(8) / "optim_states.pt").unlink()


@pytest.mark.parametrize(
    "damage, reason",
    [
        (corrupt_marker, "its complete.json is unreadable"),
        (truncate_model_state, "mp_rank_00_model_states.pt has 5 bytes, not the 70 written"),
        (lose_optimizer, "optim_states.pt is missing"),
    ],
)
def test_a_damaged_newest_checkpoint_falls_back_with_one_warning(damage, reason, checkpointed_run, monkeypatch, capsys):
    from mixsga_train import pipeline

    root = checkpoints.checkpoint_root(checkpointed_run)
    damage(root)

    def init_distributed():  # after every check, before anything is written: stop here
        raise DataError(f"stand-in: resuming from {pipeline.check_run_dir(checkpointed_run, 'auto', warn=False)}")

    monkeypatch.setattr(pipeline, "init_distributed", init_distributed)
    code, out, err = run_train_output(
        [*SMOKE_LM, f"hydra.run.dir={checkpointed_run}", "trainer.resume=auto"], monkeypatch, capsys
    )
    assert code == 2 and error_lines(err) == ["error: stand-in: resuming from 4"], err[-3000:]
    warning = (
        f"{root / checkpoints.tag(8)} is damaged ({reason}); resuming from the previous complete checkpoint, step 4"
    )
    assert (out + err).count(" is damaged (") == 1 and warning in out + err
    assert json.loads((checkpointed_run / "provenance.json").read_text()) == {"seed": 0}  # no resume entry


def test_no_intact_checkpoint_is_one_line(checkpointed_run, monkeypatch, capsys):
    root = checkpoints.checkpoint_root(checkpointed_run)
    truncate_model_state(root)
    (root / checkpoints.tag(4) / "optim_states.pt").unlink()
    stop_at(monkeypatch, "read_task")
    error = one_error([*SMOKE_LM, f"hydra.run.dir={checkpointed_run}", "trainer.resume=auto"], monkeypatch, capsys)
    assert error.startswith("error: trainer.resume: no intact checkpoint to resume from: ")
    assert "step00000008 is damaged (mp_rank_00_model_states.pt has 5 bytes" in error
    assert "step00000004 is damaged (optim_states.pt is missing)" in error
    assert error.endswith("start a new run directory")


# -- 4. Inputs that used to pass validation and crash later -------------------------------------------


def converted_model(tmp_path):
    from mixsga_train.attention import AttentionConfig, convert_model
    from mixsga_train.models.config import ModelConfig
    from mixsga_train.models.tiny import tiny_model, tiny_tokenizer

    tokenizer = tiny_tokenizer(256)
    model = tiny_model(ModelConfig(source="tiny", tiny_layers=1, max_seq_len=256), tokenizer)
    convert_model(model, AttentionConfig(method="mixsga"))
    model.save_pretrained(tmp_path / "converted")
    tokenizer.save_pretrained(tmp_path / "converted")
    return tmp_path / "converted"


def blank_test_split(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "valid.txt").write_text("Some text to train on.\n" * 50)
    (folder / "test.txt").write_text("  \n\n\t \n")
    return [*SMOKE_LM, f"task.local_dir={folder}"], f"{folder / 'test.txt'}: blank (no text, only whitespace)"


def blank_eval_set(tmp_path):
    path = tmp_path / "blank.jsonl"
    path.write_text("\n   \n")
    return [*SMOKE_SFT, f"task.eval_sets=[{path}]"], f"{path}: no records (the file is empty)"


def numbers(key_value: str, message: str):
    return lambda tmp_path: ([*SMOKE_LM, key_value], message)


VALIDATION = {
    "blank_test_split": blank_test_split,
    "blank_eval_set": blank_eval_set,
    "nan_lr": numbers("trainer.lr=nan", "trainer.lr: nan is not a finite number"),
    "overflowing_lr": numbers("trainer.lr=1e400", "trainer.lr: inf is not a finite number"),
    "infinite_alpha": numbers("attention.alpha=inf", "attention.alpha: inf is not a finite number"),
    "nan_budget": lambda tmp_path: ([*SMOKE_LM, "attention=gqa", "attention.budget=nan"], "attention.budget: nan"),
    "nan_beta": numbers("trainer.betas=[0.9,nan]", "trainer.betas[1]: nan is not a finite number"),
    "negative_weight_decay": numbers("trainer.weight_decay=-0.1", "trainer.weight_decay: -0.1 must be >= 0"),
    "zero_eps": numbers("+trainer.eps=0", "trainer.eps: 0.0 must be positive"),
    "min_lr_above_one": numbers("trainer.min_lr_ratio=2", "trainer.min_lr_ratio: 2.0 must be in [0, 1]"),
    "huge_steps": numbers("trainer.max_steps=99999999999999999999", "99999999999999999999 is too large (beyond int64)"),
    "negative_seed": numbers("seed=-1", "seed: -1 is outside [0, 2**32)"),
    "huge_seed": numbers("seed=4294967296", "seed: 4294967296 is outside [0, 2**32)"),
    "generation_beyond_positions": lambda tmp_path: (
        [*SMOKE_SFT, "task.max_new_tokens=200"],
        "task.max_new_tokens: max_prompt_len=128 + max_new_tokens=200 = 328 exceeds model.max_seq_len=256",
    ),
    "converted_model_path": lambda tmp_path: (
        [*SMOKE_LM, "model.source=local", f"model.path={converted_model(tmp_path)}"],
        f"model.path: {tmp_path / 'converted'} holds a model already converted by mixsga-train (mixsga)",
    ),
}


@pytest.mark.parametrize("case", VALIDATION, ids=list(VALIDATION))
def test_input_that_would_crash_later_is_refused_before_loading(case, tmp_path, monkeypatch, capsys):
    argv, message = VALIDATION[case](tmp_path)
    stop_at(monkeypatch, "load_model")
    run_dir = tmp_path / "run"
    error = one_error([*argv, f"hydra.run.dir={run_dir}"], monkeypatch, capsys)
    assert message in error, error
    assert not (run_dir / "config.yaml").exists()


def test_zero_steps_is_an_evaluation_only_run(tmp_path):
    run_dir = tmp_path / "run"
    proc = run(command(run_dir, "trainer.max_steps=0", "logger=none"), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "trainer.max_steps=0: evaluation only, nothing is trained or checkpointed" in proc.stdout
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["train"] is None and metrics["eval_before"] is None and metrics["eval"]["ppl"] > 1
    assert not (run_dir / "checkpoints").exists()


# -- 5. Encodings --------------------------------------------------------------------------------------


def latin1_jsonl(tmp_path):
    path = tmp_path / "latin1.jsonl"
    head = DOLLY.read_bytes().split(b"\n")[:2]
    path.write_bytes(b"\n".join([*head, '{"instruction": "Caf\xe9?", "response": "oui"}'.encode("latin-1")]) + b"\n")
    offset = len(head[0]) + len(head[1]) + 2 + len(b'{"instruction": "Caf')
    return (
        [*SMOKE_SFT, f"task.jsonl={path}"],
        f"{path}:3: not UTF-8 (byte 0xe9 at byte offset {offset}); files must be UTF-8: "
        f"if it is Latin-1, convert it with `iconv -f latin1 -t utf-8 {path} > converted.txt`",
    )


def utf16_corpus(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "valid.txt").write_text("Some text to train on.\n" * 50, encoding="utf-16")
    (folder / "test.txt").write_text("Some text to test on.\n" * 50)
    path = folder / "valid.txt"
    return (
        [*SMOKE_LM, f"task.local_dir={folder}"],
        f"{path}: UTF-16 text (it starts with a UTF-16 byte-order mark); files must be UTF-8: "
        f"convert it with `iconv -f utf-16 -t utf-8 {path} > converted.txt`",
    )


def ff_byte_in_valid(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "valid.txt").write_bytes(b"line one\nline two\nbad \xff here\n")
    (folder / "test.txt").write_text("Some text to test on.\n" * 50)
    return [*SMOKE_LM, f"task.local_dir={folder}"], f"{folder / 'valid.txt'}:3: not UTF-8 (byte 0xff at byte offset 22)"


ENCODINGS = {"latin1_jsonl": latin1_jsonl, "utf16_corpus": utf16_corpus, "ff_byte_in_valid": ff_byte_in_valid}


@pytest.mark.parametrize("case", ENCODINGS, ids=list(ENCODINGS))
def test_non_utf8_files_name_file_line_offset_and_the_conversion(case, tmp_path, monkeypatch, capsys):
    argv, message = ENCODINGS[case](tmp_path)
    stop_at(monkeypatch, "load_model")
    error = one_error([*argv, f"hydra.run.dir={tmp_path / 'run'}"], monkeypatch, capsys)
    assert message in error, error


@pytest.mark.parametrize("suffix", [".jsonl", ".txt"])
def test_a_utf8_bom_is_accepted_everywhere(suffix, tmp_path):
    from mixsga_train.data.config import TaskConfig
    from mixsga_train.data.instructions import load_instruction_jsonl
    from mixsga_train.data.text import load_text_splits

    if suffix == ".jsonl":
        path = tmp_path / "bom.jsonl"
        path.write_bytes(b"\xef\xbb\xbf" + DOLLY.read_bytes())
        plain = load_instruction_jsonl(DOLLY)
        assert load_instruction_jsonl(path) == plain
    else:
        for name in ("valid", "test"):
            (tmp_path / f"{name}.txt").write_bytes(b"\xef\xbb\xbf" + f"{name} text\n".encode())
        splits = load_text_splits(TaskConfig(kind="lm", local_dir=str(tmp_path)))
        assert splits["valid"].text == "valid text\n" and splits["test"].text == "test text\n"


# -- 6. Hydra's own errors -----------------------------------------------------------------------------


HYDRA = [
    (
        ["trainer.max_stepz=3"],
        "error: trainer.max_stepz: no such key or config group; did you mean "
        "'trainer.max_steps'? (to add a new key on purpose, write +trainer.max_stepz=...)",
    ),
    (["modle=tiny_llama"], "error: modle: no such key or config group; did you mean 'model'?"),
    (
        ["trainer.precison=bf16"],
        "error: trainer.precison: no such key or config group; did you mean 'trainer.precision'?",
    ),
    (
        ["trainer.eps=1e-6"],
        "error: trainer.eps: a setting the shipped YAML leaves at its default; set it with +trainer.eps=...",
    ),
    (["model=tiny_lama"], "error: model: unknown option 'tiny_lama'; available: gemma2_2b"),
    (["model=tiny_lama"], "; did you mean 'tiny_llama'?"),
    (["attention.ratio=[1,2"], "error: attention.ratio: cannot parse 'attention.ratio=[1,2' (no viable alternative"),
    (
        ["seed=1,2"],
        "error: config: Ambiguous value for argument 'seed=1,2'; a comma-separated value is a sweep: add --multirun",
    ),
    (["-m", "seed=1,2", "trainer.max_stepz=3,4"], "error: trainer.max_stepz: no such key or config group"),
]


@pytest.mark.parametrize("argv, message", HYDRA, ids=[f"{' '.join(a)}|{m[-12:]}" for a, m in HYDRA])
def test_hydra_errors_are_one_line_exit_2_with_did_you_mean(argv, message, tmp_path, monkeypatch, capsys):
    run_dir, sweep_dir = tmp_path / "run", tmp_path / "sweep"
    error = one_error([*argv, f"hydra.run.dir={run_dir}", f"hydra.sweep.dir={sweep_dir}"], monkeypatch, capsys)
    assert message in error and (error.startswith(message) or not message.startswith("error: ")), error
    assert not run_dir.exists() and not sweep_dir.exists()


@pytest.mark.parametrize("how", ["--verbose", "HYDRA_FULL_ERROR=1"])
def test_hydras_full_message_follows_on_request(how, tmp_path, monkeypatch, capsys):
    argv = ["trainer.max_stepz=3", f"hydra.run.dir={tmp_path / 'run'}"]
    if how == "--verbose":
        argv.append(how)
    else:
        monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    code, stderr = run_train(argv, monkeypatch, capsys)
    assert code == 2 and len(error_lines(stderr)) == 1
    assert "ConfigCompositionException: Could not override 'trainer.max_stepz'." in stderr


# -- 7. Signals and a full disk ------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_before_training_is_one_line_exit_130(signum, tmp_path, monkeypatch, capsys):
    from mixsga_train import pipeline

    def read_task_interrupted(task):
        os.kill(os.getpid(), signum)
        time.sleep(5)  # the handler raises first
        raise Reached("the signal did not interrupt")

    monkeypatch.setattr(pipeline, "read_task", read_task_interrupted)
    run_dir = tmp_path / "run"
    error = one_error([*SMOKE_LM, f"hydra.run.dir={run_dir}"], monkeypatch, capsys, code=130)
    assert error == (
        f"error: interrupted outside a checkpointed training step; {run_dir} keeps its last complete "
        "checkpoint, if any; rerun the same command with trainer.resume=auto"
    )


def test_a_second_signal_during_the_save_interrupts_at_once():
    from mixsga_train.train import signals_interrupt
    from mixsga_train.training.loop import _StopSignal

    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with signals_interrupt(), _StopSignal() as stop:
            os.kill(os.getpid(), signal.SIGTERM)  # first: a flag, training finishes the step and saves
            assert stop.received == signal.SIGTERM
            with pytest.raises(KeyboardInterrupt):  # second: stops the save at once (main turns it into one line)
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(5)
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


def test_sigterm_during_training_saves_a_checkpoint_and_exits_130(tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "log"
    proc = start(command(run_dir, "trainer.max_steps=400", "logger=none"), log)
    wait_for_checkpoint(proc, run_dir, log)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=240)
    output = log.read_text()
    errors = error_lines(output)
    assert proc.returncode == 130 and len(errors) == 1 and "Traceback" not in output, output[-3000:]
    step = int(errors[0].split("interrupted at step ")[1].split(";")[0])
    assert checkpoints.latest_intact(checkpoints.checkpoint_root(run_dir)) == (step, [])


class FullDisk:
    """A DeepSpeed engine stand-in whose checkpoint write runs out of space half-way."""

    def __init__(self, error: Exception):
        self.error = error

    def save_checkpoint(self, root, tag, client_state, save_latest):
        folder = os.path.join(root, tag)
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "mp_rank_00_model_states.pt"), "wb") as handle:
            handle.write(b"half")
        raise self.error


@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        RuntimeError(
            "[enforce fail at inline_container.cc:783] . PytorchStreamWriter failed writing file data/3: "
            "file write failed"
        ),
    ],
    ids=["ENOSPC", "torch_inline_container"],
)
def test_a_full_disk_names_the_path_and_keeps_the_last_checkpoint(error, tmp_path):
    import torch

    from mixsga_train.training.distributed import Dist
    from mixsga_train.training.loop import TrainResult, save

    root = tmp_path / "checkpoints"
    fake_checkpoint(root, 4)
    with pytest.raises(StorageError) as info:
        save(FullDisk(error), root, 8, TrainResult(steps=8), Dist(0, 1, 0, torch.device("cpu")), keep=2)
    message = str(info.value)
    assert message.startswith(f"{root / checkpoints.tag(8)}: ") and "\n" not in message
    assert "MiB free, the last checkpoint took 0 MiB" in message
    assert f"the last complete checkpoint {root / checkpoints.tag(4)} is kept" in message
    assert "rerun with trainer.resume=auto" in message
    if isinstance(error, OSError):
        assert "no space left on device" in message
    assert checkpoints.latest_intact(root) == (4, []) and not (root / checkpoints.tag(8)).exists()


def test_a_full_disk_while_writing_metrics_names_the_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    from pathlib import Path

    from mixsga_train.run_dir import write_json_atomic

    target = tmp_path / "metrics.json"
    target.write_text('{"old": 1}\n')

    def full(self, text, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(StorageError, match=rf"^{target}: no space left on device \(\d+ MiB free\); free some space"):
        write_json_atomic(target, {"new": 2})
    monkeypatch.undo()
    assert target.read_text() == '{"old": 1}\n' and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_a_saved_mha_run_is_a_valid_base_model(tmp_path):
    """attention=mha changes nothing, so its saved model (e.g. bench-replica's pretrained one) may be
    loaded and converted again; any real conversion is refused."""
    import json

    from mixsga_train.errors import ConfigError
    from mixsga_train.models.config import refuse_converted

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "mixsga": {"method": "mha"}}))
    refuse_converted(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "mixsga": {"method": "gqa"}}))
    with pytest.raises(ConfigError, match="already converted by mixsga-train \\(gqa\\)"):
        refuse_converted(tmp_path)


def test_a_saved_mha_run_loads_back_as_its_base_model(tmp_path):
    """What ``model.source=local`` does with such a model (its config.json names the remote-code
    class): the base architecture, the same weights, no trust_remote_code prompt."""
    from types import SimpleNamespace

    import torch
    from tiny import byte_bpe_tokenizer, tiny_model

    from mixsga_train.attention import AttentionConfig, convert_model
    from mixsga_train.models.loading import load_local

    model = tiny_model("llama", kv_heads=4, layers=2)
    convert_model(model, AttentionConfig(method="mha"))
    model.save_pretrained(tmp_path)
    byte_bpe_tokenizer("to be or not to be").save_pretrained(tmp_path)
    loaded, tokenizer = load_local(SimpleNamespace(path=str(tmp_path)), torch.float32)
    assert type(loaded).__name__ == "LlamaForCausalLM" and tokenizer("to be").input_ids
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
