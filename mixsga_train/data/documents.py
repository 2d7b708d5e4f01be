"""Document corpora to train on (MiniPile and the like): one document per row of a ``text`` field,
from the Hub (``task.train_hub_path``, its ``train`` split) or local ``.parquet``/``.jsonl`` files
(``task.train_files``, a path or glob). ``datasets`` reads them into its memory-mapped cache, so a
corpus far larger than memory works; ``text.document_blocks`` tokenises it."""

from __future__ import annotations

import glob
from pathlib import Path

from ..errors import DataError
from .config import TaskConfig

MINIPILE = "JeanKaddour/minipile"
TEXT_FIELD = "text"


def load_documents(task: TaskConfig):
    """The training documents of ``task`` as a ``datasets.Dataset`` with a ``text`` column, or None
    when the task trains on its text corpus's train split."""
    import datasets  # deferred: heavy import, only document corpora need it

    if task.train_files is not None:
        files = sorted(glob.glob(str(Path(task.train_files).expanduser())))
        builder = "parquet" if files and all(f.endswith(".parquet") for f in files) else "json"
        origin = task.train_files
        try:
            documents = datasets.load_dataset(builder, data_files={"train": files}, split="train")
        except (ValueError, datasets.exceptions.DatasetGenerationError) as err:
            raise DataError(f"{origin}: cannot read it as {builder} ({type(err).__name__}); one JSON object or "
                            "parquet row per document with a text field") from None
    elif task.train_hub_path is not None:
        origin = f"{task.train_hub_path}:train"
        try:
            documents = datasets.load_dataset(task.train_hub_path, split="train")
        except OSError as err:  # offline, unknown name, no access
            raise DataError(
                f"Hub dataset {task.train_hub_path}: cannot load it ({type(err).__name__}); offline? download it "
                "and set task.train_files to its .parquet files"
            ) from None
    else:
        return None
    if TEXT_FIELD not in documents.column_names:
        raise DataError(f"{origin}: no {TEXT_FIELD!r} field (has {', '.join(documents.column_names)}); "
                        "each document needs its text under 'text'")
    if len(documents) == 0:
        raise DataError(f"{origin}: no documents")
    return documents.select_columns([TEXT_FIELD])
