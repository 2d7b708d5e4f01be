"""Document corpora (MiniPile's format): read from local parquet/jsonl, tokenised with datasets.map, EOS after
every document, cut into blocks, cached so the next run (or rank) does not tokenise again."""

import json

import datasets
import pytest
import torch

from mixsga_train.config import RunConfig
from mixsga_train.data.config import TaskConfig
from mixsga_train.data.documents import load_documents
from mixsga_train.data.text import DocumentBlockDataset, document_blocks
from mixsga_train.errors import ConfigError, DataError
from mixsga_train.models.tiny import tiny_tokenizer

DOCS = ["The first document is short.", "A second one, a little longer than the first.", "Third!", "Fourth and last."]


@pytest.fixture(autouse=True)
def private_datasets_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


def write_corpus(folder, fmt):
    folder.mkdir(exist_ok=True)
    rows = [{"text": doc, "meta": i} for i, doc in enumerate(DOCS)]
    if fmt == "jsonl":
        path = folder / "docs.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    else:
        path = folder / "docs.parquet"
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_blocks_are_the_documents_tokens_with_eos_between_them(tmp_path, fmt):
    path = write_corpus(tmp_path / "corpus", fmt)
    task = TaskConfig(name="docs", train_files=str(path), seq_len=8)
    task.validate()
    tokenizer = tiny_tokenizer()
    documents = load_documents(task)
    assert documents.column_names == ["text"] and documents["text"] == DOCS
    blocks = document_blocks(documents, tokenizer, seq_len=8)
    eos = tokenizer.eos_token_id
    stream = [t for doc in DOCS for t in tokenizer(doc, add_special_tokens=False)["input_ids"] + [eos]]
    expected = torch.tensor(stream[: len(stream) // 8 * 8]).view(-1, 8)
    data = DocumentBlockDataset(blocks)
    assert len(data) == expected.shape[0]
    got = torch.stack([data[i]["input_ids"] for i in range(len(data))])
    assert got.dtype == torch.long and torch.equal(got, expected)
    assert torch.equal(data[1]["labels"], expected[1])
    capped = document_blocks(documents, tokenizer, seq_len=8, max_tokens=20)
    assert len(capped) == 2


def test_tokenised_blocks_are_cached_for_the_next_run(tmp_path, monkeypatch):
    path = write_corpus(tmp_path / "corpus", "jsonl")
    task = TaskConfig(name="docs", train_files=str(path), seq_len=8)
    tokenizer = tiny_tokenizer()
    first = document_blocks(load_documents(task), tokenizer, seq_len=8)
    assert first.cache_files, "a corpus read from files is tokenised into the datasets cache"

    def no_tokenising(*args, **kwargs):
        raise AssertionError("tokenised again instead of loading the cache")

    monkeypatch.setattr(type(tokenizer), "__call__", no_tokenising)
    again = document_blocks(load_documents(task), tiny_tokenizer(), seq_len=8)
    assert again["input_ids"] == first["input_ids"] and again.cache_files == first.cache_files
    monkeypatch.undo()
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    other_length = document_blocks(load_documents(task), tiny_tokenizer(), seq_len=4)
    assert len(other_length) > len(first)


def test_bad_document_sources_are_named(tmp_path):
    with pytest.raises(ConfigError, match="task.train_files"):
        TaskConfig(train_files=str(tmp_path / "none-*.parquet")).validate()
    odd = tmp_path / "docs.txt"
    odd.write_text("x")
    with pytest.raises(ConfigError, match="docs.txt: not .parquet or .jsonl"):
        TaskConfig(train_files=str(odd)).validate()
    with pytest.raises(ConfigError, match="either train_hub_path or train_files"):
        TaskConfig(train_files=str(odd), train_hub_path="JeanKaddour/minipile").validate()
    no_text = tmp_path / "no_text.jsonl"
    no_text.write_text('{"content": "a"}\n')
    with pytest.raises(DataError, match="no 'text' field"):
        load_documents(TaskConfig(train_files=str(no_text)))


def test_load_task_data_trains_on_documents_and_evaluates_on_the_text_corpus(tmp_path):
    from mixsga_train.pipeline import document_train_set, load_task_data, read_task

    path = write_corpus(tmp_path / "corpus", "parquet")
    wiki = tmp_path / "wiki"
    wiki.mkdir()
    (wiki / "valid.txt").write_text("valid text " * 40)
    (wiki / "test.txt").write_text("held out test text " * 40)
    cfg = RunConfig(task=TaskConfig(name="docs", train_files=str(path), local_dir=str(wiki), seq_len=8))
    cfg.task.validate()
    raw = read_task(cfg.task)
    data = load_task_data(cfg, tiny_tokenizer(), raw)
    assert data.train is None  # tokenised after the process group exists, rank 0 first
    train = document_train_set(cfg.task, raw.documents, tiny_tokenizer(), is_main=True)
    assert isinstance(train, DocumentBlockDataset) and train[0]["input_ids"].shape == (8,)
    assert data.eval_blocks.shape == (len("held out test text " * 40) // 8, 8)  # bytes: one token each
