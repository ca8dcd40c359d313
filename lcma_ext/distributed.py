"""Multi-process training with ``torch.distributed``: the process group of a ``torchrun`` launch.

The package never launches processes itself. ``torchrun`` starts them and sets ``RANK``,
``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``; :func:`init_from_env` joins
the process group (NCCL on CUDA devices, gloo on the CPU), and :func:`world` answers who this
process is. Outside ``torchrun`` nothing is initialised and every helper is a no-op for the one
process, so the single-process code path is unchanged.

Example (two processes on one machine, gloo on the CPU)::

    torchrun --standalone --nproc_per_node 2 -m lcma_ext run --quick

References:
    PyTorch, "torchrun (Elastic Launch)" and "DistributedDataParallel",
    https://pytorch.org/docs/stable/elastic/run.html and
    https://pytorch.org/docs/stable/generated/torch.nn.parallel.DistributedDataParallel.html
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

__all__ = [
    "World",
    "all_gather_objects",
    "all_reduce_sum",
    "barrier",
    "broadcast_object",
    "init_from_env",
    "launched_by_torchrun",
    "lost_peer",
    "world",
]

#: Words of the errors a collective raises when another process of the job is gone.
_PEER_LOST = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "gloo")

T = TypeVar("T")

#: The environment variables ``torchrun`` sets for every process it starts.
TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class World:
    """Who this process is in the process group.

    Attributes:
        rank: Global rank, ``0 .. size - 1``.
        size: Number of processes (the world size).
        local_rank: Rank on this machine (the CUDA device index under ``torchrun``).
        distributed: True when a ``torch.distributed`` process group is initialised (also for
            ``torchrun --nproc_per_node 1``).
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    distributed: bool = False

    @property
    def is_main(self) -> bool:
        """True on rank 0, the one process that writes files."""
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """True when the ``torchrun`` environment variables are all set."""
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


def world() -> World:
    """This process's :class:`World` (one process when no process group is initialised)."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    return World(
        rank=dist.get_rank(),
        size=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        distributed=True,
    )


def init_from_env(device: str | torch.device) -> torch.device:
    """Join the ``torchrun`` process group, if launched by it, and return this rank's device.

    Args:
        device: The requested device. Under ``torchrun`` a CUDA device becomes
            ``cuda:<LOCAL_RANK>`` (one GPU per process, NCCL); any other device uses gloo.

    Returns:
        The device this process trains on (``device`` itself outside ``torchrun``).

    Raises:
        RuntimeError: if launched by ``torchrun`` but ``torch.distributed`` is unavailable, or
            more processes per machine than CUDA devices are started.
    """
    device = torch.device(device)
    if not launched_by_torchrun():
        return device
    if not dist.is_available():
        raise RuntimeError(
            "expected a torch build with torch.distributed for a torchrun launch; got one without"
        )
    local_rank = int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"expected at most {torch.cuda.device_count()} processes per machine (one per "
                f"CUDA device); got LOCAL_RANK {local_rank}"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return device


def lost_peer(error: BaseException) -> bool:
    """True when ``error`` is a collective's failure because another process stopped.

    gloo reports a killed rank to the survivors as a ``RuntimeError`` (``Connection reset by
    peer``); torch's own ``DistError`` family covers the other backends.
    """
    if isinstance(error, dist.DistError):
        return True
    return isinstance(error, RuntimeError) and any(word in str(error) for word in _PEER_LOST)


def barrier() -> None:
    """Wait for every rank (no-op for one process)."""
    if world().distributed:
        dist.barrier()


def broadcast_object(obj: T) -> T:
    """Rank 0's ``obj`` on every rank (``obj`` itself for one process)."""
    if not world().distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` for one process)."""
    current = world()
    if not current.distributed:
        return [obj]
    gathered: list[Any] = [None] * current.size
    dist.all_gather_object(gathered, obj)
    return gathered


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum of ``values`` over the ranks, in place and returned (``values`` for one process)."""
    if world().distributed:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values
