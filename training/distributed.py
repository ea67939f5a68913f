"""One process or many: the process group, who writes, and summing metrics across ranks.

Under ``torchrun`` (one or many nodes) the rendezvous comes from its environment
variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``...). NCCL joins
GPU processes, gloo CPU ones. Without those variables everything here is a no-op,
so the same training script runs on one CPU.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import Sampler


class SetupError(RuntimeError):
    """No device for this process (asked for CUDA without one, more ranks than GPUs)."""


@dataclass(frozen=True)
class Context:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes files, logs and progress bars."""
        return self.rank == 0


def env_rank() -> int:
    """This process's rank before the process group exists (for error messages)."""
    return int(os.environ.get("RANK", "0"))


def setup(device: str = "auto") -> Context:
    """Pick the device and, under torchrun, join the process group.

    ``device`` is ``auto`` (CUDA when present), ``cpu`` or ``cuda``; with CUDA each
    process takes the GPU numbered by its ``LOCAL_RANK``.
    """
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda:
        if not torch.cuda.is_available():
            raise SetupError("--device cuda: no CUDA device is available")
        if local_rank >= torch.cuda.device_count():
            raise SetupError(f"local rank {local_rank} has no GPU: {torch.cuda.device_count()} visible on this node")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            init_method="env://",
            rank=rank,
            world_size=world_size,
            device_id=dev if use_cuda else None,
        )
    return Context(rank=rank, local_rank=local_rank, world_size=world_size, device=dev)


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: Sequence[float], ctx: Context) -> list[float]:
    """Element-wise sum of ``values`` over all ranks (float64, so image counts stay exact)."""
    if not ctx.distributed:
        return [float(v) for v in values]
    # NCCL reduces device tensors only; gloo reduces CPU tensors.
    t = torch.tensor(list(values), dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


class ShardSampler(Sampler[int]):
    """Every ``world_size``-th index, starting at ``rank``: each sample on exactly one rank.

    Unlike ``DistributedSampler`` it pads nothing, so summed validation metrics count every
    image once; ranks may get one sample more or less, which is fine where no collective
    runs per step (evaluation of the unwrapped model).
    """

    def __init__(self, length: int, rank: int, world_size: int) -> None:
        self.indices = range(rank, length, world_size)

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)
