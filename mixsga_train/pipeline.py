"""One run, start to end: check the run dir -> read data -> load the model -> tokenise -> write
config/provenance -> convert -> evaluate -> train -> evaluate -> write metrics.

Knows the order of things and nothing about how each is done; ``train.py`` (Hydra) and
``evaluate.py`` call into it. Everything that can fail on bad input (the run directory, data
files, the model name, corpus length) fails before anything is written to the run directory.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from .attention import calibrate_decode_thresholds, convert_model, converted
from .attention.config import ResolvedAttention
from .config import RunConfig
from .data.config import TaskConfig
from .data.documents import load_documents
from .data.instructions import EvalExample, SFTCollator, SFTDataset, load_eval_sets, load_sft_splits
from .data.text import (
    DocumentBlockDataset,
    LMBlockDataset,
    TextSplit,
    count_words,
    document_blocks,
    lm_blocks,
    load_text_splits,
    tokenize_corpus,
)
from .errors import ConfigError
from .evaluation.generation import generate_and_score
from .evaluation.kv import native_kv_bytes_per_token
from .evaluation.perplexity import scored_words
from .evaluation.rolling import rolling_windows
from .evaluation.suite import evaluate_lm, evaluate_sft
from .metrics import EvalMetrics, RunMetrics, TrainMetrics
from .models.loading import load_model
from .run_dir import (
    EVAL_BEFORE,
    METRICS,
    check_run_dir,
    read_json,
    record_provenance,
    storage_error,
    write_config,
    write_json_atomic,
)
from .tracking import run_name, start_tracker
from .training.distributed import Dist, full_parameters, init_distributed, main_process_first
from .training.loop import total_steps, train

log = logging.getLogger(__name__)


@dataclass
class TaskData:
    """A task's tensors: training set + collate, and what evaluation needs."""

    train: object
    collate: object
    eval_blocks: torch.Tensor | None = None
    eval_words: int | None = None
    eval_labels: torch.Tensor | None = None  # rolling windows (task.stride < seq_len): -100 on context tokens
    test_batches: list | None = None
    eval_sets: dict | None = None


@dataclass
class RawTask:
    """A task's data as read, before tokenising: text splits (``lm``) or record splits and
    ROUGE-L sets (``sft``); for an ``lm`` task with a document corpus, its training documents too."""

    text: dict[str, TextSplit] | None = None
    documents: object = None  # datasets.Dataset of training documents (task.train_hub_path / train_files)
    records: dict | None = None
    eval_sets: dict | None = None


def read_task(task: TaskConfig) -> RawTask:
    """Read (and so check) a task's files or Hub data; needs no tokenizer or model."""
    if task.kind == "lm":
        return RawTask(text=load_text_splits(task), documents=load_documents(task))
    records = load_sft_splits(task)
    return RawTask(records=records, eval_sets=load_eval_sets(task, records["test"]))


def load_task_data(cfg: RunConfig, tokenizer, raw: RawTask | None = None) -> TaskData:
    """Tokenised train/eval data of an ``lm`` or ``sft`` task (``raw``: already read by ``read_task``).
    A document corpus is not tokenised here (``train`` is None): ``document_train_set`` does it once
    the process group exists."""
    task = cfg.task
    raw = raw if raw is not None else read_task(task)
    if task.kind == "lm":
        splits = raw.text
        train = None
        if raw.documents is None:
            train_split = splits["train"]
            blocks = lm_blocks(train_split.text, tokenizer, task.seq_len, task.max_train_tokens, train_split.origin)
            train = LMBlockDataset(blocks)
        eval_blocks = lm_blocks(
            splits["test"].text, tokenizer, task.seq_len, task.max_eval_tokens, splits["test"].origin
        )
        if task.eval_stride() < task.seq_len:
            stream = tokenize_corpus(splits["test"].text, tokenizer, task.max_eval_tokens)
            windows, labels = rolling_windows(stream, task.seq_len, task.eval_stride())
            return TaskData(train, _stack, windows, count_words(tokenizer.decode(stream.tolist())), labels)
        return TaskData(train, _stack, eval_blocks, scored_words(tokenizer, eval_blocks))
    splits = raw.records
    collate = SFTCollator(tokenizer.pad_token_id)
    test = SFTDataset(splits["test"][: task.eval_max_examples], tokenizer, task.max_len, task.max_prompt_len)
    bs = cfg.trainer.eval_batch_size
    test_batches = [collate([test[i] for i in range(s, min(s + bs, len(test)))]) for s in range(0, len(test), bs)]
    return TaskData(
        SFTDataset(splits["train"], tokenizer, task.max_len, task.max_prompt_len),
        collate,
        test_batches=test_batches,
        eval_sets=raw.eval_sets,
    )


def document_train_set(task: TaskConfig, documents, tokenizer, is_main: bool) -> DocumentBlockDataset:
    """The training blocks of a document corpus: rank 0 tokenises into the ``datasets`` cache
    first, then the other ranks load it (``main_process_first``)."""
    origin = task.train_files or task.train_hub_path
    with main_process_first(is_main):
        blocks = document_blocks(documents, tokenizer, task.seq_len, task.max_train_tokens, origin)
    return DocumentBlockDataset(blocks)


def _stack(items: list[dict]) -> dict:
    return {k: torch.stack([item[k] for item in items]) for k in items[0]}


CALIBRATION_TOKENS = 8192  # training tokens the ``calibrated`` decode policy's thresholds are fitted on


def calibrate_for_decoding(model, data: TaskData, cfg: RunConfig) -> None:
    """Under ``attention.decode_policy: calibrated``, fit the routers' decode thresholds on the first
    ~CALIBRATION_TOKENS tokens of the training set (before every evaluation, since training moves
    the routers). Nothing to do for other policies and methods."""
    handle = converted(model)
    if handle is None or handle.context.decode_policy != "calibrated":
        return
    if data.train is None or len(data.train) == 0:
        raise ConfigError(
            "attention.decode_policy", "'calibrated' needs training examples to fit its thresholds; use budget"
        )
    length = cfg.task.seq_len if cfg.task.kind == "lm" else cfg.task.max_len
    count = min(len(data.train), -(-CALIBRATION_TOKENS // length))
    size = cfg.trainer.eval_batch_size
    items = [data.train[i] for i in range(count)]
    batches = [data.collate(items[i : i + size]) for i in range(0, count, size)]
    calibrate_decode_thresholds(model, batches)


def evaluate(model, tokenizer, data: TaskData, cfg: RunConfig) -> EvalMetrics:
    calibrate_for_decoding(model, data, cfg)
    if cfg.task.kind == "lm":
        return evaluate_lm(model, data.eval_blocks, data.eval_words, cfg.trainer.eval_batch_size, data.eval_labels)
    return evaluate_sft(
        model, tokenizer, data.test_batches, data.eval_sets, cfg.task, cfg.trainer.eval_batch_size, cfg.seed
    )


def run_tags(resolved: ResolvedAttention) -> list[str]:
    return [f"method:{resolved.method}", f"budget:{resolved.kv_budget:.3f}"]


def run(cfg: RunConfig, resolved: ResolvedAttention, run_dir: Path, config_yaml: dict) -> RunMetrics:
    """Train and evaluate one configuration in ``run_dir``; returns the metrics written there.

    Every rank runs all of it (evaluation is replicated, so every rank computes the same
    metrics); only rank 0 writes files and tracks.
    """
    resume_step = check_run_dir(run_dir, cfg.trainer.resume, config_yaml)
    raw = read_task(cfg.task)
    model, tokenizer = load_model(cfg.model)
    data = load_task_data(cfg, tokenizer, raw)
    dist = init_distributed()
    if raw.documents is not None:
        data.train = document_train_set(cfg.task, raw.documents, tokenizer, dist.is_main)
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_config(run_dir, config_yaml)
        record_provenance(run_dir, cfg.seed, resume_step)
    torch.manual_seed(cfg.seed)
    convert_model(model, resolved)
    model.to(dist.device)
    log.info("%s", resolved.describe())
    per_layer = resolved.to_dict().get("layer_ratios") is not None
    name = run_name(resolved.method, resolved.kv_budget, resolved.summary_fields()["ratio"], cfg.seed, per_layer)
    tracker = start_tracker(
        cfg.logger, run_dir, name, cfg.experiment_name, run_tags(resolved), config_yaml, dist.is_main
    )
    if cfg.trainer.max_steps == 0:
        print("trainer.max_steps=0: evaluation only, nothing is trained or checkpointed", flush=True)
        before, result = None, None
    else:
        before = evaluate_before(model, tokenizer, data, cfg, run_dir, resume_step, dist, tracker)
        last_step = total_steps(cfg.trainer, len(data.train), dist.world_size)

        def evaluate_during_training(step: int) -> None:  # the last step's evaluation follows training
            if cfg.trainer.eval_every and step % cfg.trainer.eval_every == 0 and step < last_step:
                track_eval(tracker, "eval", evaluate(model, tokenizer, data, cfg), step)

        result = train(
            model,
            data.train,
            data.collate,
            cfg.trainer,
            run_dir,
            dist,
            tracker,
            cfg.seed,
            resume_step,
            on_step=evaluate_during_training,
        )
    after = evaluate(model, tokenizer, data, cfg)
    track_eval(tracker, "eval", after, result.steps if result is not None else 0)
    if tracker.active and cfg.logger.samples and (cfg.task.kind == "lm" or data.eval_sets):
        tracker.table("samples", ["prompt", "reference", "generation"], generation_samples(model, tokenizer, data, cfg))
    metrics = assemble_metrics(cfg, resolved, model, before, after, result)
    with full_parameters(model):  # ZeRO-3: the saved weights are the gathered, not the partitioned, ones
        if dist.is_main:
            save_model(model, tokenizer, run_dir / "model")
    if dist.is_main:
        write_json_atomic(run_dir / METRICS, metrics.to_json())
    tracker.summary(metrics)
    tracker.finish()
    return metrics


def save_model(model, tokenizer, folder: Path) -> None:
    """``save_pretrained`` of the model and tokenizer; a failed write (disk full) is one line naming the folder."""
    try:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    except (OSError, RuntimeError) as err:
        if not isinstance(err, OSError) and "inline_container" not in str(err):
            raise
        raise storage_error(folder, err if isinstance(err, OSError) else OSError(str(err))) from None


def evaluate_before(
    model, tokenizer, data: TaskData, cfg: RunConfig, run_dir: Path, resume_step: int | None, dist: Dist, tracker
) -> EvalMetrics | None:
    """The evaluation before training (``trainer.eval_before``), kept in ``eval_before.json`` so a
    resumed run reports the same numbers as an uninterrupted one without recomputing them."""
    if not cfg.trainer.eval_before:
        return None
    saved = read_json(run_dir / EVAL_BEFORE) if resume_step is not None else None
    if saved is not None:
        return EvalMetrics.from_json(saved)
    before = evaluate(model, tokenizer, data, cfg)
    if dist.is_main:
        write_json_atomic(run_dir / EVAL_BEFORE, before.to_json())
    track_eval(tracker, "eval_before", before, 0)
    return before


def track_eval(tracker, prefix: str, results: EvalMetrics, step: int) -> None:
    """Log an evaluation's numbers (perplexities, KV bytes, ROUGE-L per set) as curves at ``step``."""
    tracker.log(results.curves(prefix), step=step)


def generation_samples(model, tokenizer, data: TaskData, cfg: RunConfig) -> list[list[str]]:
    """``logger.samples`` greedy generations for the W&B table, as rows [prompt, reference,
    generation]: the first examples of the first eval set (SFT), or the first test blocks cut into
    a prompt and its true continuation (LM)."""
    n, max_new = cfg.logger.samples, cfg.task.max_new_tokens
    if cfg.task.kind == "sft":
        examples = list(next(iter(data.eval_sets.values())))[:n]
    else:
        half = data.eval_blocks.shape[1] // 2
        max_new = min(max_new, data.eval_blocks.shape[1] - half)
        examples = [
            EvalExample(tokenizer.decode(block[:half]), [tokenizer.decode(block[half : half + max_new])])
            for block in data.eval_blocks[:n]
        ]
    prompt_len = cfg.task.max_prompt_len if cfg.task.kind == "sft" else data.eval_blocks.shape[1]
    result = generate_and_score(
        model, tokenizer, examples, max_new, cfg.trainer.eval_batch_size, prompt_len, seed=cfg.seed
    )
    return [[ex.prompt, ex.references[0], pred] for ex, pred in zip(examples, result.predictions)]


def assemble_metrics(
    cfg: RunConfig, resolved: ResolvedAttention, model, before: EvalMetrics | None, after: EvalMetrics, result
) -> RunMetrics:
    """The metrics.json contract (``metrics.py``, docs/metrics.md)."""
    dtype = next(model.parameters()).dtype
    train_block = None
    if result is not None:
        train_block = TrainMetrics(
            steps=result.steps,
            tokens=result.tokens,
            seconds=result.seconds,
            tokens_per_s=result.tokens_per_s,
            final_loss=result.final_loss,
            final_lm_loss=result.final_lm_loss,
            losses=result.losses,
            routing=result.routing(),
            resumed_from=result.resumed_from,
        )
    return RunMetrics(
        model=cfg.model.name,
        task=cfg.task.name,
        experiment=cfg.experiment_name,
        seed=cfg.seed,
        method=resolved.method,
        **resolved.summary_fields(),
        kv_budget=resolved.kv_budget,
        kv_bytes_per_token=after.kv_bytes_per_token,
        kv_bytes_per_token_native=native_kv_bytes_per_token(model.config, dtype),
        params=sum(p.numel() for p in model.parameters()),
        attention=resolved.to_dict(),
        train=train_block,
        eval_before=before,
        eval=after,
    )
