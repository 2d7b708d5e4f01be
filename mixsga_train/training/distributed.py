"""Process-group setup that works the same with no launcher, ``torchrun`` or ``deepspeed --no_local_rank``."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

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


def launcher_rank() -> int:
    """This process's global rank as the launcher set it (0 without a launcher)."""
    return int(os.environ.get("RANK", "0"))


def worker_overrides() -> list[str]:
    """Hydra overrides for ranks other than 0, so that only rank 0 writes into the shared run
    directory (no ``.hydra/`` copy, no job log file: they log to stdout)."""
    if launcher_rank() == 0:
        return []
    return ["hydra.output_subdir=null", "hydra/job_logging=stdout"]


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
        import deepspeed  # imported here: it takes seconds, and `--help` should not wait for it

        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, device)


def _multi() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """Elementwise sum over all ranks of a list of floats (float64; unchanged on one process)."""
    if not _multi():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_gather_object(obj) -> list:
    """``obj`` of every rank, in rank order."""
    if not _multi():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if _multi():
        dist.barrier()
