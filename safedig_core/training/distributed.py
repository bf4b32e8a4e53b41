"""Data parallelism over prompts with torch.distributed (gloo on CPU, nccl on GPUs).

`torchrun --nproc-per-node N -m safedig_core collect ...` and `accelerate launch` set RANK / WORLD_SIZE /
MASTER_ADDR / MASTER_PORT; `init_from_env()` joins that group. Without them everything runs as rank 0
of 1 and no torch.distributed call is made.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_from_env(backend: str | None = None) -> DistInfo:
    """Join the process group described by the environment (no-op for a single process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if torch.cuda.is_available() else "gloo"))
    return current()


def current() -> DistInfo:
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size())
    return DistInfo()


def all_reduce_mean_(tensors: list[torch.Tensor]) -> None:
    """Average tensors across ranks in place (one flat buffer: one message per call)."""
    info = current()
    if not info.active or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= info.world_size
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    if current().active:
        dist.all_reduce(tensor)
    return tensor


def barrier() -> None:
    if current().active:
        dist.barrier()
