"""Process-group setup that works the same with no launcher, ``torchrun``, ``deepspeed --no_local_rank``
or plain ``srun`` (Slurm starts one task per process and sets ``SLURM_*`` instead of ``RANK``)."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
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


DEFAULT_MASTER_PORT = "29500"


def slurm_environment(env: dict[str, str]) -> dict[str, str]:
    """``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT`` from Slurm's variables,
    for tasks started by ``srun`` without a launcher; {} when a launcher already set ``RANK``, outside
    Slurm, or for a single task. The master is the first host of ``SLURM_NODELIST`` (``scontrol show
    hostnames`` when available)."""
    if "RANK" in env or "SLURM_PROCID" not in env or int(env.get("SLURM_NTASKS", "1")) <= 1:
        return {}
    nodelist = env.get("SLURM_NODELIST") or env.get("SLURM_JOB_NODELIST", "")
    return {
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": env["SLURM_NTASKS"],
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "MASTER_ADDR": env.get("MASTER_ADDR") or first_host(nodelist),
        "MASTER_PORT": env.get("MASTER_PORT", DEFAULT_MASTER_PORT),
    }


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list (``node[03-05,09],gpu1`` -> ``node03``)."""
    if not nodelist:
        raise RuntimeError("SLURM_PROCID is set but SLURM_NODELIST is empty; set MASTER_ADDR to the first node")
    if shutil.which("scontrol"):
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=False)
        if out.returncode == 0 and out.stdout.split():
            return out.stdout.split()[0]
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist)
    prefix, ranges = match.group(1), match.group(2)
    return prefix + ranges.split(",")[0].split("-")[0] if ranges else prefix


def launcher_rank() -> int:
    """This process's global rank as the launcher (or Slurm) set it (0 without one)."""
    return int(os.environ.get("RANK") or slurm_environment(dict(os.environ)).get("RANK", "0"))


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

    Under ``srun`` without a launcher the ranks come from Slurm (``slurm_environment``). Without
    either, the single-process defaults (RANK=0, WORLD_SIZE=1, a free local port)
    are filled in, which DeepSpeed needs on CPU to avoid its MPI discovery.
    """
    os.environ.update(slurm_environment(dict(os.environ)))
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


@contextmanager
def full_parameters(model: torch.nn.Module) -> Iterator[None]:
    """Every rank enters together; inside, a ZeRO-3 model's partitioned parameters are gathered in
    full on every rank (e.g. for rank 0's ``save_pretrained``). A no-op for ZeRO 0-2."""
    params = list(model.parameters())
    if not any(hasattr(p, "ds_id") for p in params):
        yield
        return
    import deepspeed  # only a ZeRO-3 model has partitioned parameters, so DeepSpeed is loaded already

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


@contextmanager
def main_process_first(is_main: bool) -> Iterator[None]:
    """Rank 0 runs the block first (e.g. tokenising into the ``datasets`` cache), then the other
    ranks run it and find the cache; a no-op on one process."""
    if not is_main:
        barrier()
    try:
        yield
    finally:
        if is_main:
            barrier()
