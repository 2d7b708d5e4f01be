"""Instruction data: records, the MiniLLM/Alpaca template, tokenised SFT examples, splits, eval sets.

Records come from JSONL (Dolly: instruction/context/response; MiniLLM: instruction/input/output,
output a string or a list of references; Self-Instruct seeds: instruction + ``instances`` of
input/output) or from the Hub. Training examples are ``prompt + response + EOS`` with the loss
on the response and EOS only. The prompt is tokenised on its own, exactly as at generation time.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from ..errors import DataError
from .config import DOLLY_TEST, MINILLM_EVAL_SETS, TaskConfig, eval_set_label
from .files import read_utf8

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
RESPONSE_CUE = "\n\n### Response:\n"  # kept whole when a long prompt is cut


@dataclass
class InstructionRecord:
    """One instruction with optional input and one or more references (the first is the training target)."""

    instruction: str
    input: str
    references: list[str]

    def prompt(self) -> str:
        """The templated prompt, ending in ``### Response:\\n``."""
        return format_prompt(self.instruction, self.input)


@dataclass
class EvalExample:
    """A ROUGE-L example: the templated prompt and every acceptable reference."""

    prompt: str
    references: list[str]


def format_prompt(instruction: str, input: str = "") -> str:
    """The MiniLLM/Alpaca prompt; the input paragraph only when ``input`` is non-empty."""
    if input:
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


def records_from_json(raw: object, where: str) -> list[InstructionRecord]:
    """Records from one parsed JSON object (several for a Self-Instruct seed with many instances).

    ``where`` names the source in errors, e.g. ``data.jsonl:12``.
    """
    instruction = _field(raw, "instruction", where)
    if instruction is None:
        raise DataError(f"{where}: missing key 'instruction'; every record needs instruction and response (or output)")
    if "instances" not in raw:
        source_input = _field(raw, "input", where)
        if source_input is None:
            source_input = _field(raw, "context", where)
        return [InstructionRecord(instruction, source_input or "", _references(raw, where))]
    instances = raw["instances"]
    if not isinstance(instances, list) or not instances:
        raise DataError(f"{where}: 'instances' must be a non-empty list of {{input, output}} objects")
    return [
        InstructionRecord(instruction, _field(inst, "input", where) or "", _references(inst, where)) for inst in instances
    ]


def _field(raw: object, key: str, where: str) -> str | None:
    """``raw[key]`` as a string, None when absent or null; DataError for a non-object or a non-string."""
    if not isinstance(raw, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(raw).__name__}; write one record per line")
    value = raw.get(key)
    if value is not None and not isinstance(value, str):
        raise DataError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
    return value


def _references(raw: dict, where: str) -> list[str]:
    value = raw.get("output", raw.get("response"))
    refs = value if isinstance(value, list) else [value]
    if value is None:
        raise DataError(f"{where}: missing key 'response' (or 'output'); every record needs instruction and response")
    if not refs or not all(isinstance(r, str) for r in refs):
        raise DataError(f"{where}: 'response'/'output' must be a string or a non-empty list of strings")
    return refs


def load_instruction_jsonl(path: str | Path) -> list[InstructionRecord]:
    """Every record of a JSONL file (UTF-8, optional BOM); blank lines skipped; errors name ``file:line``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file; fix the path in the task config")
    records = []
    for lineno, line in enumerate(read_utf8(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(
                f"{path}:{lineno}: malformed JSON ({err.msg} at column {err.colno}); fix or delete the line"
            ) from None
        records.extend(records_from_json(raw, f"{path}:{lineno}"))
    if not records:
        raise DataError(f"{path}: no records (the file is empty); write one JSON object per line")
    return records


def _load_hub_records(path: str, name: str | None, data_files: str | None = None) -> list[InstructionRecord]:
    import datasets  # deferred: heavy import, only the Hub path needs it

    where = f"{path}/{data_files or name or 'train'}"
    try:
        rows = datasets.load_dataset(path, name, data_files=data_files, split="train")
    except OSError as err:  # offline, unknown name, no access: ConnectionError, DatasetNotFoundError
        raise DataError(
            f"Hub dataset {where}: cannot load it ({type(err).__name__}); "
            "offline or a wrong name? use a local file: task.jsonl=/path/to/data.jsonl (eval_sets take .jsonl paths too)"
        ) from None
    return [rec for i, row in enumerate(rows) for rec in records_from_json(row, f"{where}[{i}]")]


def load_sft_records(cfg: TaskConfig) -> tuple[list[InstructionRecord], str]:
    """All records of an ``sft`` task and their origin (the local file, else the Hub dataset)."""
    if cfg.jsonl is not None:
        return load_instruction_jsonl(Path(cfg.jsonl).expanduser()), cfg.jsonl
    path, name = cfg.hub_source()
    return _load_hub_records(path, name), path


def fit_split_sizes(n: int, sizes: list[int], origin: str) -> tuple[int, int, int]:
    """Train/valid/test counts that fit ``n`` records.

    As asked when they fit; else valid/test kept and train shrunk; else valid/test scaled
    down in proportion to the request (each requested split keeps >= 1) and train takes the
    rest. Every change is logged; DataError when not even one training record is left.
    """
    train, valid, test = sizes
    if n >= train + valid + test:
        return train, valid, test
    if n > valid + test:
        fitted = (n - valid - test, valid, test)
    else:
        total = train + valid + test
        valid, test = (max(1, s * n // total) if s else 0 for s in (valid, test))
        fitted = (n - valid - test, valid, test)
        if fitted[0] < 1:
            raise DataError(f"{origin}: {n} records cannot hold a train split besides valid/test; use a bigger file")
    log.warning("%s has %d records, fewer than split_sizes %s: using %s", origin, n, list(sizes), list(fitted))
    return fitted


def split_records(
    records: list[InstructionRecord], sizes: list[int], seed: int, origin: str = "records"
) -> dict[str, list[InstructionRecord]]:
    """Seeded split: one permutation; valid = first, test = next, train = following records.

    Valid and test come first so they stay the same records when only the train size changes.
    """
    train_n, valid_n, test_n = fit_split_sizes(len(records), list(sizes), origin)
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed)).tolist()
    ends = {"valid": valid_n, "test": valid_n + test_n, "train": valid_n + test_n + train_n}
    starts = {"valid": 0, "test": ends["valid"], "train": ends["test"]}
    return {split: [records[i] for i in order[starts[split] : ends[split]]] for split in ("train", "valid", "test")}


def load_sft_splits(cfg: TaskConfig) -> dict[str, list[InstructionRecord]]:
    """The task's ``train``/``valid``/``test`` records."""
    records, origin = load_sft_records(cfg)
    return split_records(records, list(cfg.split_sizes), cfg.split_seed, origin)


def encode_prompt(tokenizer, prompt: str, max_prompt_len: int) -> list[int]:
    """Prompt token ids with the tokenizer's own special tokens (e.g. BOS), at most ``max_prompt_len``.

    A longer prompt loses its middle: the head (template, instruction) and the last tokens
    (as many as ``RESPONSE_CUE`` takes alone) are kept, so the model still sees the cue.
    """
    ids = tokenizer(prompt, add_special_tokens=True, verbose=False)["input_ids"]
    if len(ids) <= max_prompt_len:
        return ids
    tail = min(len(tokenizer(RESPONSE_CUE, add_special_tokens=False)["input_ids"]), max_prompt_len // 2)
    return ids[: max_prompt_len - tail] + ids[len(ids) - tail :]


def build_sft_example(tokenizer, record: InstructionRecord, max_len: int, max_prompt_len: int) -> dict[str, list[int]]:
    """input_ids = prompt + response + EOS, cut to ``max_len``; labels = IGNORE_INDEX on the prompt.

    The prompt is cut first (``encode_prompt``), then the response; a cut response keeps no EOS.
    Returns {input_ids: [L], labels: [L]} with L <= max_len.
    """
    if tokenizer.eos_token_id is None:
        raise DataError("tokenizer has no eos_token; set tokenizer.eos_token before building SFT examples")
    prompt_ids = encode_prompt(tokenizer, record.prompt(), max_prompt_len)
    response_ids = tokenizer(record.references[0], add_special_tokens=False, verbose=False)["input_ids"]
    response_ids = (response_ids + [tokenizer.eos_token_id])[: max_len - len(prompt_ids)]
    return {"input_ids": prompt_ids + response_ids, "labels": [IGNORE_INDEX] * len(prompt_ids) + response_ids}


class SFTDataset(Dataset):
    """Tokenised SFT examples (built once); item i is {input_ids: [L_i], labels: [L_i]} as lists."""

    def __init__(self, records: list[InstructionRecord], tokenizer, max_len: int, max_prompt_len: int):
        self.examples = [build_sft_example(tokenizer, r, max_len, max_prompt_len) for r in records]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.examples[index]


@dataclass
class SFTCollator:
    """Right-pads a batch: input_ids [B, L] (``pad_id``), labels [B, L] (-100 on padding), attention_mask [B, L]."""

    pad_id: int

    def __call__(self, batch: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        length = max(len(ex["input_ids"]) for ex in batch)
        input_ids = torch.full((len(batch), length), self.pad_id, dtype=torch.long)
        labels = torch.full((len(batch), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), length), dtype=torch.long)
        for row, ex in enumerate(batch):
            n = len(ex["input_ids"])
            input_ids[row, :n] = torch.as_tensor(ex["input_ids"], dtype=torch.long)
            labels[row, :n] = torch.as_tensor(ex["labels"], dtype=torch.long)
            attention_mask[row, :n] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def load_eval_set(
    entry: str, dolly_test: list[InstructionRecord] | None = None, max_examples: int | None = None
) -> list[EvalExample]:
    """One ROUGE-L set: ``dolly_test`` (pass the test records), a MiniLLM Hub set, or a local JSONL path."""
    if entry == DOLLY_TEST:
        if not dolly_test:
            raise DataError("dolly_test: no test records were given; load the sft task's splits first")
        records = dolly_test
    elif entry in MINILLM_EVAL_SETS:
        repo, data_file = MINILLM_EVAL_SETS[entry]
        records = _load_hub_records(repo, None, data_file)
    else:
        records = load_instruction_jsonl(Path(entry).expanduser())
    return [EvalExample(r.prompt(), list(r.references)) for r in records[:max_examples]]


def load_eval_sets(cfg: TaskConfig, dolly_test: list[InstructionRecord] | None = None) -> dict[str, list[EvalExample]]:
    """Every set in ``cfg.eval_sets``, keyed by its label (``eval_set_label``), capped at ``eval_max_examples``."""
    return {eval_set_label(e): load_eval_set(e, dolly_test, cfg.eval_max_examples) for e in cfg.eval_sets}
