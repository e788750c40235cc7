"""The process group of a distributed job, and the one gather the jobs need.

``init_process_group()`` -> ``DistContext`` (gloo on CPU, nccl on CUDA; a 1-process group
outside torchrun so the same code path runs with N = 1). ``gather_to_rank0`` collects per-rank
arrays in rank order.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_process_group(device: str | torch.device | None = None) -> DistContext:
    """Join (or create) the default process group: nccl on CUDA, gloo on CPU.

    Inside torchrun the rank/world come from its environment; outside it a 1-process gloo group on
    an in-memory store is created, so sharding and DCP run the same code with N = 1.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank if device.index is None else device.index)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend=backend)
        else:
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
    world_size = dist.get_world_size()
    return DistContext(
        rank=dist.get_rank(),
        world_size=world_size,
        local_rank=local_rank,
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size))),
        device=device,
        backend=dist.get_backend(),
    )


def destroy_process_group() -> None:
    """Leave the group at the end of a job: a barrier first, so no rank closes its connections while
    another still receives (gloo aborts the process when a peer vanishes mid-transfer)."""
    if dist.is_initialized():
        if dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def gather_to_rank0(arrays: dict[str, np.ndarray], n_rows: int | None = None) -> dict[str, np.ndarray] | None:
    """Concatenate every rank's arrays in rank order on rank 0 (``None`` elsewhere).

    With ``n_rows`` (the file's row count under ``tail="pad"``) the padding repeats at the end
    are cut off, so row i of the result is row i of the file.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return {k: np.asarray(v)[:n_rows] for k, v in arrays.items()}
    rank = dist.get_rank()
    received: list[Any] | None = [None] * dist.get_world_size() if rank == 0 else None
    dist.gather_object({k: np.asarray(v) for k, v in arrays.items()}, received, dst=0)
    if received is None:
        return None
    return {k: np.concatenate([part[k] for part in received])[:n_rows] for k in arrays}
