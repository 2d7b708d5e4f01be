"""LM text data: local Wikitext-2 folder, the offline Shakespeare corpus, token blocks, config checks."""

from pathlib import Path

import pytest
import torch

from mixsga_train.data import text as text_mod
from mixsga_train.data.config import TaskConfig
from mixsga_train.data.text import (
    LMBlockDataset,
    count_words,
    lm_blocks,
    load_text_splits,
    tokenize_corpus,
)
from mixsga_train.errors import ConfigError, DataError
from tiny import byte_bpe_tokenizer

WIKI = Path(__file__).parent / "fixtures" / "wikitext-2"


@pytest.fixture(scope="module")
def wiki():
    return load_text_splits(TaskConfig(local_dir=str(WIKI)))


@pytest.fixture(scope="module")
def tokenizer(wiki):
    return byte_bpe_tokenizer(wiki["valid"].text)


def test_wikitext_local_dir_trains_on_valid_and_strips_bom(wiki):
    assert set(wiki) == {"train", "valid", "test"}
    assert wiki["train"].text == wiki["valid"].text
    assert "as train" in wiki["train"].origin and wiki["train"].origin.endswith("valid.txt (as train)")
    assert wiki["valid"].text.startswith(" \n = Homarus gammarus = ")
    assert wiki["test"].text.startswith(" \n = Robert <unk> = ")
    # fixtures/README.md counts whitespace tokens of the raw file, where the BOM is one "word".
    assert count_words(wiki["valid"].text) == 1678 - 1
    assert count_words(wiki["test"].text) == 1092 - 1


def test_lm_blocks_are_non_overlapping_and_count_tokens(wiki, tokenizer):
    text = wiki["valid"].text
    ids = tokenize_corpus(text, tokenizer)
    blocks = lm_blocks(text, tokenizer, seq_len=128)
    assert blocks.dtype == torch.long and blocks.shape == (ids.numel() // 128, 128)
    assert torch.equal(blocks.flatten(), ids[: blocks.numel()])
    capped = lm_blocks(text, tokenizer, seq_len=64, max_tokens=1000)
    assert capped.shape == (15, 64) and torch.equal(capped.flatten(), ids[:960])


def test_block_dataset_items_are_input_and_labels(tokenizer):
    blocks = torch.arange(12).view(3, 4)
    item = LMBlockDataset(blocks)[1]
    assert len(LMBlockDataset(blocks)) == 3
    assert item["input_ids"].tolist() == [4, 5, 6, 7] and torch.equal(item["labels"], item["input_ids"])


def test_too_short_corpus_names_the_file(tmp_path, tokenizer):
    (tmp_path / "valid.txt").write_text("\ufeffonly a few words here\n", encoding="utf-8")
    (tmp_path / "test.txt").write_text("and here\n", encoding="utf-8")
    splits = load_text_splits(TaskConfig(local_dir=str(tmp_path)))
    assert splits["valid"].text == "only a few words here\n"
    with pytest.raises(DataError, match=r"test\.txt.*fewer than seq_len=64"):
        lm_blocks(splits["test"].text, tokenizer, 64, origin=splits["test"].origin)
    with pytest.raises(DataError, match=r"valid\.txt \(as train\)"):
        lm_blocks(splits["train"].text, tokenizer, 64, origin=splits["train"].origin)


def test_missing_local_files_are_config_errors(tmp_path):
    (tmp_path / "valid.txt").write_text("x\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"^task\.local_dir: .*test\.txt is missing"):
        TaskConfig(local_dir=str(tmp_path)).validate()
    with pytest.raises(ConfigError, match=r"^task\.local_dir: .*nowhere is not a directory"):
        TaskConfig(local_dir=str(tmp_path / "nowhere")).validate()


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"seq_len": 1}, "task.seq_len"),
        ({"kind": "rl"}, "task.kind"),
        ({"stride": 600}, "task.stride"),
        ({"max_eval_tokens": 10}, "task.max_eval_tokens"),
        ({"package": "bible"}, "task.package"),
        ({"jsonl": "x.jsonl"}, "task.jsonl"),
        ({"eval_sets": ["dolly_test"]}, "task.eval_sets"),
    ],
)
def test_lm_config_errors_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        TaskConfig(**overrides).validate()
    assert err.value.key == key and "\n" not in str(err.value)


def test_default_config_is_the_hub_wikitext():
    cfg = TaskConfig()
    cfg.validate()
    assert cfg.hub_source() == ("wikitext", "wikitext-2-raw-v1") and cfg.eval_stride() == cfg.seq_len


def test_hub_source_joins_rows_per_split(monkeypatch):
    calls = []

    def fake_load_dataset(path, name):
        calls.append((path, name))
        return {s: {"text": ["\ufeff = A = \n", f"{s} line\n"]} for s in ("train", "validation", "test")}

    import datasets

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    splits = load_text_splits(TaskConfig())
    assert calls == [("wikitext", "wikitext-2-raw-v1")]
    assert splits["valid"].text == " = A = \nvalidation line\n" and splits["valid"].origin.endswith(":validation")


def test_shakespeare_loads_offline_with_disjoint_splits():
    cfg = TaskConfig(package="shakespeare")
    cfg.validate()
    splits = load_text_splits(cfg)
    assert "HAMLET, PRINCE OF DENMARK" in splits["test"].text
    assert "HAMLET, PRINCE OF DENMARK" not in splits["train"].text + splits["valid"].text
    held_out = [name for names in text_mod.SHAKESPEARE_HELD_OUT.values() for name in names]
    assert len(set(held_out)) == 4
    for name in ("train", "valid", "test"):
        head = splits[name].text[:400]
        assert [other for other in splits if head in splits[other].text] == [name]
    assert count_words(splits["train"].text) > 8 * count_words(splits["test"].text) > 0
    assert load_text_splits(cfg)["valid"].text == splits["valid"].text
