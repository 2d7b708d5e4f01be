"""The training loop: a DeepSpeed engine fed by a deterministic, resumable data order.

Optimizer step ``s`` consumes global sequences ``G*s .. G*s+G-1`` (G = micro_batch * grad_accum *
world_size) of a per-epoch seeded permutation, and rank ``r``'s micro-batch ``m`` is slice
``m*world + r`` of them. The data position is therefore the step number alone, and one process
with grad_accum = k sees the same global batches as k processes with grad_accum = 1.

Every number the loop reports (losses, tokens, routing counts) is reduced over all ranks, so
each rank holds the same ``TrainResult``; only rank 0 writes it anywhere.
"""

from __future__ import annotations

import logging
import math
import signal
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

import deepspeed
import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..attention import RoutingStats, routing_context
from ..config import TrainerConfig
from ..errors import EXIT_DIVERGED, EXIT_INTERRUPTED, DataError
from ..tracking import Tracker
from . import checkpoints
from .distributed import Dist, all_gather_object, all_sum, barrier
from .engine_config import deepspeed_config, lr_schedule, parameter_groups, relative_change, router_parameters

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf; the step was not applied."""

    exit_code = EXIT_DIVERGED


class TrainingInterrupted(RuntimeError):
    """SIGINT/SIGTERM: a checkpoint was saved and training stopped."""

    exit_code = EXIT_INTERRUPTED


@dataclass
class TrainResult:
    """What training did, summed or averaged over all ranks; saved in every checkpoint.

    losses: the per-step loss curve (mean over the step's micro-batches and ranks), final_loss
    its last value; final_lm_loss: the same without the router aux loss. expert_tokens,
    routing_agree, routing_compared: mixSGA only, the training tokens routed to each expert and
    how many top-k decisions argmax routing would have matched; router_weight_change: relative
    L2 change of the router weights from conversion to the end of training.
    """

    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    final_loss: float | None = None
    final_lm_loss: float | None = None
    losses: list[float] = field(default_factory=list)
    resumed_from: int | None = None
    expert_tokens: list[int] | None = None
    routing_agree: int = 0
    routing_compared: int = 0
    router_weight_change: float | None = None

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def routing(self) -> dict | None:
        """Training routing statistics over all ranks and steps (None without routers)."""
        if self.expert_tokens is None:
            return None
        total = sum(self.expert_tokens)
        return {
            "expert_fractions": [n / total if total else 0.0 for n in self.expert_tokens],
            "routing_agreement": self.routing_agree / self.routing_compared if self.routing_compared else None,
            "router_weight_change": self.router_weight_change,
        }


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
    """Turns the first SIGINT/SIGTERM into a flag the loop checks after each optimizer step; the
    previous handlers come back at once, so a second Ctrl-C stops without waiting for the save."""

    def __init__(self):
        self.received: int | None = None

    def __enter__(self):
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame):
        self.received = signum
        self._restore()

    def _restore(self):
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def __exit__(self, *exc):
        self._restore()


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer in the backward pass (transformers' activation checkpointing,
    non-reentrant). A mixSGA model's routers run again in the recomputation and route the same way;
    their statistics are not recorded a second time."""
    context = routing_context(model) if getattr(model, "_mixsga_resolved", None) is not None else None
    contexts = partial(_checkpoint_contexts, context)
    model.activation_checkpointing_enable({"use_reentrant": False, "context_fn": contexts})


def _checkpoint_contexts(context) -> tuple:
    """(forward, recomputation) contexts for ``torch.utils.checkpoint``'s ``context_fn``."""
    return nullcontext(), (_routing_stats_paused(context) if context is not None else nullcontext())


@contextmanager
def _routing_stats_paused(context):
    saved, context.stats = context.stats, None
    try:
        yield
    finally:
        context.stats = saved


class _RoutingTally:
    """Counts this rank's training tokens per expert and top-k/argmax agreement of a mixSGA
    model, step by step (``take``); a no-op for other models."""

    def __init__(self, model: nn.Module):
        resolved = getattr(model, "_mixsga_resolved", None)
        self.experts = len(resolved.expert_kv_heads) if resolved is not None and resolved.method == "mixsga" else 0
        self.context = routing_context(model) if self.experts else None

    def __enter__(self):
        if self.context is not None:
            self._saved, self.context.stats = self.context.stats, RoutingStats(self.experts)
        return self

    def take(self) -> list[float]:
        """[tokens per expert..., agreeing, compared] since the last call ([] without routers)."""
        if self.context is None:
            return []
        stats, self.context.stats = self.context.stats, RoutingStats(self.experts)
        return [*map(float, stats.prefill.tolist()), float(stats.agree), float(stats.compared)]

    def __exit__(self, *exc):
        if self.context is not None:
            self.context.stats = self._saved


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
    on_step: Callable[[int], None] | None = None,
) -> TrainResult:
    """Train ``model`` for ``total_steps`` optimizer steps with DeepSpeed and return what happened.

    Checkpoints every ``save_every`` steps and at the end (complete-or-invisible, see
    checkpoints.py). ``resume_step`` continues from that complete checkpoint: weights,
    optimizer, scheduler, RNG, data position and the result so far. NaN/inf loss raises
    TrainingDiverged before the step is applied; SIGINT/SIGTERM saves a checkpoint and raises
    TrainingInterrupted. ``on_step(step)`` runs after every optimizer step on every rank (e.g.
    periodic evaluation); its forward passes do not count as training routing.
    """
    steps = total_steps(cfg, len(dataset), dist.world_size)
    if cfg.train_only_routers:
        for name, param in model.named_parameters():
            param.requires_grad_(".router." in name)
    routers_before = {name: p.detach().float().cpu().clone() for name, p in router_parameters(model).items()}
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=parameter_groups(model, cfg),
        config=deepspeed_config(cfg, dist.world_size),
        lr_scheduler=lr_schedule(cfg, steps),
    )
    root = checkpoints.checkpoint_root(run_dir)
    result = _resume(engine, root, resume_step, dist) if resume_step is not None else TrainResult()
    engine.train()
    bar = tqdm(total=steps, initial=result.steps, desc="train", disable=not dist.is_main, dynamic_ncols=True)
    with bar, _StopSignal() as stop, _RoutingTally(model) as tally:
        while result.steps < steps:
            started = time.perf_counter()
            loss, lm_loss, tokens = _optimizer_step(engine, dataset, collate, cfg, dist, seed, result.steps, root)
            stopping, *routing = all_sum([float(stop.received is not None), *tally.take()], dist.device)
            _record_step(result, loss, lm_loss, tokens, routing, time.perf_counter() - started)
            bar.update(1)
            if result.steps % cfg.log_every == 0 or result.steps == steps:
                _log_step(result, engine, bar, tracker)
            step = result.steps
            if step == steps or stopping or (cfg.save_every and step % cfg.save_every == 0):
                save(engine, root, step, result, dist, cfg.keep_checkpoints)
            if stopping:
                raise TrainingInterrupted(
                    f"interrupted at step {step}; checkpoint saved in {root / checkpoints.tag(step)}; "
                    "rerun the same command with trainer.resume=auto to continue"
                )
            if on_step is not None:
                on_step(step)
                tally.take()
                engine.train()
    model.eval()
    result.router_weight_change = relative_change(routers_before, model)
    return result


def _optimizer_step(engine, dataset, collate, cfg: TrainerConfig, dist: Dist, seed: int, step: int,
                    root: Path) -> tuple[float, float, int]:
    """Run optimizer step ``step + 1``'s micro-batches on every rank; returns its loss and LM loss
    (means over micro-batches and ranks) and the tokens of all ranks. A non-finite loss on any
    rank stops every rank before backward, so nothing of it is applied."""
    loss_sum = lm_sum = tokens = 0.0
    for micro in range(cfg.grad_accum):
        indices = micro_batch_indices(step, micro, cfg, len(dataset), dist, seed)
        batch = {k: v.to(dist.device) for k, v in collate([dataset[i] for i in indices]).items()}
        loss = engine(**batch, use_cache=False).loss
        n_tokens = int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
        value = loss.item()
        total, lm_total, n_total = all_sum([value, value - _aux_term(engine.module), n_tokens], dist.device)
        if not math.isfinite(total):
            raise TrainingDiverged(_diverged_message(step + 1, total / dist.world_size, root))
        loss_sum, lm_sum, tokens = loss_sum + total, lm_sum + lm_total, tokens + n_total
        engine.backward(loss)
        engine.step()
    per_step = cfg.grad_accum * dist.world_size
    return loss_sum / per_step, lm_sum / per_step, int(tokens)


def _aux_term(model: nn.Module) -> float:
    """alpha * router aux loss of the last training forward (0.0 without routers or with alpha 0)."""
    context = getattr(model, "_mixsga_context", None)
    if context is None or context.last_aux_loss is None or not model._mixsga_resolved.alpha:
        return 0.0
    return model._mixsga_resolved.alpha * context.last_aux_loss.item()


def _record_step(result: TrainResult, loss: float, lm_loss: float, tokens: int, routing: list[float], seconds: float) -> None:
    """Add one optimizer step (already reduced over ranks) to ``result``."""
    result.steps += 1
    result.tokens += tokens
    result.seconds += seconds
    result.final_loss, result.final_lm_loss = loss, lm_loss
    result.losses.append(loss)
    if routing:
        *counts, agree, compared = (int(x) for x in routing)
        result.expert_tokens = [a + b for a, b in zip(result.expert_tokens or [0] * len(counts), counts)]
        result.routing_agree += agree
        result.routing_compared += compared


def _log_step(result: TrainResult, engine, bar, tracker: Tracker) -> None:
    lr = engine.get_lr()[0]
    bar.set_postfix(loss=f"{result.final_loss:.4f}", lr=f"{lr:.2e}")
    metrics = {"train/loss": result.final_loss, "train/lm_loss": result.final_lm_loss, "train/lr": lr,
               "train/tokens_per_s": result.tokens_per_s}
    routing = result.routing()
    if routing is not None and routing["routing_agreement"] is not None:
        metrics["train/routing_agreement"] = routing["routing_agreement"]
    tracker.log(metrics, step=result.steps)


def _diverged_message(step: int, loss: float, root: Path) -> str:
    last = checkpoints.latest_complete(root)
    kept = f"the last checkpoint is kept: {root / checkpoints.tag(last)}" if last is not None else "no checkpoint was saved yet"
    return (f"loss became {loss} at step {step}; training stopped before applying it; {kept}; "
            "lower trainer.lr (or raise trainer.warmup_ratio) and rerun in a new run dir")


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _resume(engine, root: Path, step: int, dist: Dist) -> TrainResult:
    """Load checkpoint ``step`` into ``engine`` (weights, optimizer, scheduler) and restore this
    rank's RNG; returns the result recorded up to that step."""
    try:
        _, client = engine.load_checkpoint(str(root), tag=checkpoints.tag(step))
    except Exception as err:  # noqa: BLE001 - any failure to read the files means the same to the user
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise DataError(f"{root / checkpoints.tag(step)}: cannot be loaded ({reason}); move it aside to resume from "
                        "the previous checkpoint, or start a new run directory") from None
    _set_rng_state(client["rng"][dist.rank])
    result = TrainResult(**client["result"])
    result.resumed_from = client["step"]
    log.info("resumed from %s at step %d", root / checkpoints.tag(step), step)
    return result


def save(engine, root: Path, step: int, result: TrainResult, dist: Dist, keep: int) -> None:
    """Save a DeepSpeed checkpoint (every rank writes its shards), then mark it complete (rank 0)
    and prune old ones. Leftovers of an earlier, crashed write of the same step go first."""
    rng = all_gather_object(_rng_state())
    if dist.is_main:
        checkpoints.discard_incomplete(root, step)
    barrier()
    client = {"step": step, "rng": rng, "result": asdict(result)}
    try:
        engine.save_checkpoint(str(root), tag=checkpoints.tag(step), client_state=client, save_latest=False)
        barrier()
        if dist.is_main:
            checkpoints.mark_complete(root, step, dist.world_size)
    except (OSError, RuntimeError) as err:
        if not isinstance(err, OSError) and "inline_container" not in str(err):
            raise
        if dist.is_main:
            checkpoints.discard_incomplete(root, step)  # frees the space; the last complete checkpoint stays
        raise checkpoints.write_failure(root, step, err) from None
    if dist.is_main:
        checkpoints.prune(root, keep)
    barrier()
