"""The training loop: a DeepSpeed engine fed by a deterministic, resumable data order.

Optimizer step ``s`` consumes global sequences ``G*s .. G*s+G-1`` (G = micro_batch * grad_accum *
world_size) of a per-epoch seeded permutation, and rank ``r``'s micro-batch ``m`` is slice
``m*world + r`` of them. The data position is therefore the step number alone, and one process
with grad_accum = k sees the same global batches as k processes with grad_accum = 1.
"""

from __future__ import annotations

import logging
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import deepspeed
import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..attention.convert import routing_context
from ..config import TrainerConfig
from ..tracking import Tracker
from . import checkpoints
from .distributed import Dist, all_mean, barrier
from .engine_config import deepspeed_config, lr_schedule, parameter_groups

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf; the step was not applied."""


class TrainingInterrupted(RuntimeError):
    """SIGINT/SIGTERM: a checkpoint was saved and training stopped."""


@dataclass
class TrainResult:
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    final_loss: float | None = None
    final_lm_loss: float | None = None
    losses: list[float] = field(default_factory=list)
    resumed_from: int | None = None

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def total_steps(cfg: TrainerConfig, dataset_size: int, world_size: int) -> int:
    """Optimizer steps the run will take (``max_steps``, or ``epochs`` full passes)."""
    if cfg.max_steps is not None:
        return cfg.max_steps
    return cfg.epochs * steps_per_epoch(cfg, dataset_size, world_size)


def steps_per_epoch(cfg: TrainerConfig, dataset_size: int, world_size: int) -> int:
    global_batch = cfg.micro_batch_size * cfg.grad_accum * world_size
    return max(dataset_size // global_batch, 1)


def micro_batch_indices(step: int, micro: int, cfg: TrainerConfig, dataset_size: int, dist: Dist, seed: int) -> list[int]:
    """Dataset indices of rank ``dist.rank``'s micro-batch ``micro`` of optimizer step ``step``."""
    global_batch = cfg.micro_batch_size * cfg.grad_accum * dist.world_size
    per_epoch = steps_per_epoch(cfg, dataset_size, dist.world_size)
    epoch, offset = divmod(step, per_epoch)
    order = torch.randperm(dataset_size, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    order = order * math.ceil(global_batch / dataset_size)  # a dataset smaller than one global batch repeats
    start = offset * global_batch + (micro * dist.world_size + dist.rank) * cfg.micro_batch_size
    return order[start:start + cfg.micro_batch_size]


class _StopSignal:
    """Turns SIGINT/SIGTERM into a flag the loop checks after each optimizer step."""

    def __init__(self):
        self.received: int | None = None

    def __enter__(self):
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame):
        self.received = signum

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def train(
    model: nn.Module,
    dataset: Dataset,
    collate: Callable[[list[dict]], dict],
    cfg: TrainerConfig,
    run_dir: Path,
    dist: Dist,
    tracker: Tracker,
    seed: int,
    resume_step: int | None = None,
) -> TrainResult:
    """Train ``model`` for ``total_steps`` optimizer steps with DeepSpeed and return what happened.

    Checkpoints every ``save_every`` steps and at the end (complete-or-invisible, see
    checkpoints.py). ``resume_step`` continues from that complete checkpoint: weights,
    optimizer, scheduler, RNG and data position. NaN/inf loss raises TrainingDiverged before the
    step is applied; SIGINT/SIGTERM saves a checkpoint and raises TrainingInterrupted.
    """
    steps = total_steps(cfg, len(dataset), dist.world_size)
    if cfg.train_only_routers:
        for name, param in model.named_parameters():
            param.requires_grad_(".router." in name)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=parameter_groups(model, cfg.weight_decay),
        config=deepspeed_config(cfg, dist.world_size),
        lr_scheduler=lr_schedule(cfg, steps),
    )
    root = checkpoints.checkpoint_root(run_dir)
    result = TrainResult()
    step = 0
    if resume_step is not None:
        _, client = engine.load_checkpoint(str(root), tag=checkpoints.tag(resume_step))
        step = client["step"]
        result = TrainResult(**client["result"])
        torch.set_rng_state(client["rng"][dist.rank])
        result.resumed_from = step
        log.info("resumed from %s at step %d", root / checkpoints.tag(step), step)
    context = routing_context(model) if hasattr(model, "_mixsga_context") else None
    alpha = model._mixsga_resolved.alpha if context is not None else 0.0
    engine.train()
    bar = tqdm(total=steps, initial=step, desc="train", disable=not dist.is_main, dynamic_ncols=True)
    with _StopSignal() as stop:
        while step < steps:
            started = time.perf_counter()
            losses, lm_losses, tokens = [], [], 0
            for micro in range(cfg.grad_accum):
                indices = micro_batch_indices(step, micro, cfg, len(dataset), dist, seed)
                batch = {k: v.to(dist.device) for k, v in collate([dataset[i] for i in indices]).items()}
                loss = engine(**batch).loss
                if not torch.isfinite(loss).all():
                    raise TrainingDiverged(_diverged_message(step, loss, root))
                aux = context.last_aux_loss if context is not None else None
                losses.append(loss.item())
                lm_losses.append(loss.item() - (alpha * aux.item() if aux is not None else 0.0))
                tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
                engine.backward(loss)
                engine.step()
            step += 1
            result.steps = step
            result.tokens += int(all_mean(tokens, dist.device) * dist.world_size)
            result.seconds += time.perf_counter() - started
            result.final_loss = all_mean(sum(losses) / len(losses), dist.device)
            result.final_lm_loss = all_mean(sum(lm_losses) / len(lm_losses), dist.device)
            result.losses.append(result.final_loss)
            bar.update(1)
            if step % cfg.log_every == 0 or step == steps:
                lr = engine.get_lr()[0]
                bar.set_postfix(loss=f"{result.final_loss:.4f}", lr=f"{lr:.2e}")
                tracker.log({"train/loss": result.final_loss, "train/lm_loss": result.final_lm_loss, "train/lr": lr,
                             "train/tokens_per_s": result.tokens_per_s}, step=step)
            stop_now = _agree(stop.received is not None, dist)
            if step == steps or stop_now or (cfg.save_every and step % cfg.save_every == 0):
                save(engine, root, step, result, dist, cfg.keep_checkpoints)
            if stop_now:
                raise TrainingInterrupted(f"interrupted at step {step}; checkpoint saved in {root / checkpoints.tag(step)}; "
                                          "rerun the same command with trainer.resume=auto to continue")
    bar.close()
    model.eval()
    return result


def _agree(flag: bool, dist: Dist) -> bool:
    """True on every rank if any rank got a stop signal (so all ranks save the same step)."""
    return all_mean(float(flag), dist.device) > 0


def _diverged_message(step: int, loss: torch.Tensor, root: Path) -> str:
    last = checkpoints.latest_complete(root)
    kept = f"the last good checkpoint is {root / checkpoints.tag(last)}" if last is not None else "no checkpoint was saved yet"
    return f"loss became {loss.item()} at step {step + 1}; training stopped before applying it; {kept}"


def save(engine, root: Path, step: int, result: TrainResult, dist: Dist, keep: int) -> None:
    """Save a DeepSpeed checkpoint, then mark it complete (rank 0) and prune old ones."""
    import torch.distributed as tdist

    rng = [None] * dist.world_size
    tdist.all_gather_object(rng, torch.get_rng_state())
    client = {"step": step, "rng": rng, "result": {k: v for k, v in vars(result).items()}}
    engine.save_checkpoint(str(root), tag=checkpoints.tag(step), client_state=client, save_latest=False)
    barrier()
    if dist.is_main:
        checkpoints.mark_complete(root, step)
        checkpoints.prune(root, keep)
    barrier()
