"""Process-group setup that works the same with no launcher, ``torchrun`` or ``deepspeed --no_local_rank``."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import deepspeed
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> Dist:
    """Initialise torch.distributed through DeepSpeed (gloo on CPU, nccl on GPUs).

    Without a launcher, the single-process defaults (RANK=0, WORLD_SIZE=1, a free local port)
    are filled in, which DeepSpeed needs on CPU to avoid its MPI discovery.
    """
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    os.environ.setdefault("LOCAL_RANK", os.environ["RANK"])
    local_rank = int(os.environ["LOCAL_RANK"])
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, device)


def all_mean(value: float, device: torch.device) -> float:
    """Mean of a float over all ranks."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def all_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Elementwise sum over all ranks (a copy)."""
    out = tensor.clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(out)
    return out


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
