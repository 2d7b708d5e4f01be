"""Instruction data: JSONL errors, the template, the response-only loss mask, splits, collator, eval sets."""

import json
import logging
from pathlib import Path

import pytest

from mixsga_train.data.config import TaskConfig
from mixsga_train.data.instructions import (
    IGNORE_INDEX,
    InstructionRecord,
    SFTCollator,
    SFTDataset,
    build_sft_example,
    encode_prompt,
    fit_split_sizes,
    format_prompt,
    load_eval_set,
    load_eval_sets,
    load_instruction_jsonl,
    load_sft_splits,
    records_from_json,
    split_records,
)
from mixsga_train.errors import ConfigError, DataError
from tiny import byte_bpe_tokenizer

FIXTURES = Path(__file__).parent / "fixtures"  # see fixtures/README.md
DOLLY = FIXTURES / "dolly" / "dolly_sample.jsonl"
SEED_TASKS = FIXTURES / "self-instruct" / "seed_tasks.jsonl"


@pytest.fixture(scope="module")
def dolly():
    return load_instruction_jsonl(DOLLY)


@pytest.fixture(scope="module")
def tokenizer():
    return byte_bpe_tokenizer(DOLLY.read_text(encoding="utf-8")[:30000])


def test_prompt_template_with_and_without_input():
    assert format_prompt("Add 2 and 3.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nAdd 2 and 3.\n\n### Response:\n"
    )
    assert format_prompt("Summarise.", "Some text.") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request."
        "\n\n### Instruction:\nSummarise.\n\n### Input:\nSome text.\n\n### Response:\n"
    )


def test_dolly_slice_loads_with_context_as_input(dolly):
    assert len(dolly) == 120
    assert dolly[0].instruction == "When did Virgin Australia start operating?"
    assert dolly[0].input.startswith("Virgin Australia, the trading name")
    assert "### Input:\n" in dolly[0].prompt() and len(dolly[0].references) == 1


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "a", "response": "b"}\n\n{"instruction": "c", "response": \n', encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{path}:3: malformed JSON"):
        load_instruction_jsonl(path)
    path.write_text('{"instruction": "a", "response": "b"}\n{"instruction": "c"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{path}:2: missing key 'response'"):
        load_instruction_jsonl(path)
    path.write_text('{"response": "b"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{path}:1: missing key 'instruction'"):
        load_instruction_jsonl(path)
    path.write_text('["instruction"]\n', encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{path}:1: expected a JSON object"):
        load_instruction_jsonl(path)
    with pytest.raises(DataError, match="no such file"):
        load_instruction_jsonl(tmp_path / "absent.jsonl")


def test_minillm_output_list_is_every_reference():
    (rec,) = records_from_json({"instruction": "Say hi.", "input": "", "output": ["hi", "hello"]}, "x:1")
    assert rec.references == ["hi", "hello"] and rec.input == ""


def test_loss_mask_covers_exactly_the_response_and_eos(tokenizer):
    record = InstructionRecord("Name a colour.", "", ["Blue is a colour of the sky."])
    ex = build_sft_example(tokenizer, record, max_len=512, max_prompt_len=256)
    ids, labels = ex["input_ids"], ex["labels"]
    prompt_len = len(encode_prompt(tokenizer, record.prompt(), 256))
    response_ids = tokenizer(record.references[0], add_special_tokens=False)["input_ids"]
    assert labels[:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert labels[prompt_len:] == ids[prompt_len:] == response_ids + [tokenizer.eos_token_id]
    assert tokenizer.decode(ids[:prompt_len]) == record.prompt()
    assert tokenizer.decode(labels[prompt_len:-1]) == record.references[0]


def test_truncation_keeps_the_response_cue_and_max_len(tokenizer):
    record = InstructionRecord("Summarise.", "word " * 400, ["short " * 300])
    ex = build_sft_example(tokenizer, record, max_len=160, max_prompt_len=100)
    prompt = encode_prompt(tokenizer, record.prompt(), 100)
    assert len(prompt) == 100 and tokenizer.decode(prompt).endswith("\n\n### Response:\n")
    assert tokenizer.decode(prompt).startswith("Below is an instruction")
    assert len(ex["input_ids"]) == 160 and ex["input_ids"][:100] == prompt
    assert tokenizer.eos_token_id not in ex["labels"]  # a cut response does not teach stopping


def test_collator_right_pads(tokenizer, dolly):
    batch = SFTCollator(pad_id=tokenizer.pad_token_id)([SFTDataset(dolly[:3], tokenizer, 512, 256)[i] for i in range(3)])
    lengths = batch["attention_mask"].sum(1)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["input_ids"].shape[1] == int(lengths.max())
    for row, n in enumerate(lengths.tolist()):
        assert batch["attention_mask"][row, :n].all() and not batch["attention_mask"][row, n:].any()
        assert (batch["input_ids"][row, n:] == tokenizer.pad_token_id).all()
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()


def test_split_keeps_valid_test_and_shrinks_train(dolly, caplog):
    with caplog.at_level(logging.WARNING):
        splits = split_records(dolly, [14000, 40, 40], seed=0, origin="dolly_sample")
    assert [len(splits[s]) for s in ("train", "valid", "test")] == [40, 40, 40]
    assert "dolly_sample has 120 records" in caplog.text and "[40, 40, 40]" in caplog.text
    ids = [{id(r) for r in splits[s]} for s in ("train", "valid", "test")]
    assert sum(map(len, ids)) == len(set().union(*ids)) == 120
    again = split_records(dolly, [14000, 40, 40], seed=0)
    assert all(again[s] == splits[s] for s in splits)
    other = split_records(dolly, [14000, 40, 40], seed=1)
    assert other["test"] != splits["test"]
    smaller = split_records(dolly, [20, 40, 40], seed=0)
    assert smaller["test"] == splits["test"] and smaller["train"] == splits["train"][:20]


def test_fit_split_sizes_scales_down_when_valid_test_do_not_fit():
    assert fit_split_sizes(15011, [14000, 500, 500], "x") == (14000, 500, 500)
    assert fit_split_sizes(600, [14000, 500, 500], "x") == (560, 20, 20)
    assert fit_split_sizes(10, [14000, 500, 500], "x") == (8, 1, 1)
    assert fit_split_sizes(10, [9, 0, 5], "x") == (5, 0, 5)
    assert fit_split_sizes(4, [9, 0, 5], "x") == (3, 0, 1)
    with pytest.raises(DataError, match="x: 2 records"):
        fit_split_sizes(2, [1, 1, 1], "x")


def test_sft_task_splits_and_eval_sets_from_local_files(caplog):
    cfg = TaskConfig(
        name="dolly", kind="sft", jsonl=str(DOLLY), split_sizes=[60, 20, 30],
        eval_sets=["dolly_test", str(SEED_TASKS)], eval_max_examples=None,
    )
    cfg.validate()
    splits = load_sft_splits(cfg)
    assert [len(splits[s]) for s in ("train", "valid", "test")] == [60, 20, 30]
    sets = load_eval_sets(cfg, dolly_test=splits["test"])
    assert list(sets) == ["dolly_test", "seed_tasks"]
    assert len(sets["dolly_test"]) == 30 and len(sets["seed_tasks"]) == 20
    first = sets["seed_tasks"][0]
    assert first.prompt == format_prompt(
        "Is there anything I can eat for a breakfast that doesn't include eggs, yet includes protein, "
        "and has roughly 700-1000 calories?"
    )
    assert first.references[0].startswith("Yes, you can have 1 oatmeal banana protein shake")
    assert sum("### Input:\n" in ex.prompt for ex in sets["seed_tasks"]) > 0
    assert len(load_eval_set(str(SEED_TASKS), max_examples=5)) == 5


def test_minillm_hub_set_uses_the_real_dataset_files(monkeypatch):
    calls = []

    def fake_load_dataset(path, name=None, data_files=None, split=None):
        calls.append((path, name, data_files, split))
        return [{"instruction": "Define x.", "input": "", "output": ["x is y", "x = y"], "prompt": "ignored"}]

    import datasets

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    (ex,) = load_eval_set("sinst")
    assert calls == [("MiniLLM/sinst", None, "11_/valid.jsonl", "train")]
    assert ex.prompt == format_prompt("Define x.") and ex.references == ["x is y", "x = y"]


@pytest.mark.parametrize(
    ("overrides", "key", "hint"),
    [
        ({"eval_sets": ["alpaca"]}, "task.eval_sets", "unknown set 'alpaca'"),
        ({"eval_sets": ["missing/dir/x.jsonl"]}, "task.eval_sets", "is not a file"),
        ({"jsonl": "nowhere.jsonl"}, "task.jsonl", "nowhere.jsonl is not a file"),
        ({"max_prompt_len": 512}, "task.max_prompt_len", "room for a response"),
        ({"split_sizes": [100, 10]}, "task.split_sizes", "three counts"),
        ({"split_sizes": [100, 10, 0], "eval_sets": ["dolly_test"]}, "task.eval_sets", "test split"),
        ({"local_dir": "."}, "task.local_dir", "kind=lm"),
    ],
)
def test_sft_config_errors_name_the_key(overrides, key, hint):
    with pytest.raises(ConfigError, match=hint) as err:
        TaskConfig(kind="sft", **overrides).validate()
    assert err.value.key == key and "\n" not in str(err.value)


def test_sft_default_source_is_dolly_on_the_hub():
    cfg = TaskConfig(name="dolly", kind="sft", eval_sets=["dolly_test", "self-inst", "vicuna", "sinst", "uinst"])
    cfg.validate()
    assert cfg.hub_source() == ("databricks/databricks-dolly-15k", None)


def test_eval_set_file_with_bad_line_names_it(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps({"instruction": "a", "output": 3}) + "\n", encoding="utf-8")
    TaskConfig(kind="sft", jsonl=str(DOLLY), eval_sets=[str(path)]).validate()
    with pytest.raises(DataError, match=rf"^{path}:1: 'response'/'output' must be a string"):
        load_eval_set(str(path))
