"""DDP set-up from the `torchrun` environment: NCCL on GPUs, gloo on CPU; a no-op for one process."""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    device: str = "cpu"
    initialized_here: bool = False

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistInfo:
    """Join the process group described by RANK / WORLD_SIZE / LOCAL_RANK (set by torchrun)."""
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world <= 1:
        return DistInfo(device="cuda" if cuda else "cpu")
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    backend = "nccl" if cuda else "gloo"
    device = f"cuda:{local}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(local)
    here = False
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
        here = True
    return DistInfo(rank, world, local, backend, device, here)


def cleanup(info: DistInfo) -> None:
    import torch.distributed as dist

    if info.initialized_here and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values, info: DistInfo):
    """Sum a list of floats over processes (float64 on the process device)."""
    import torch

    if not info.distributed:
        return list(values)
    import torch.distributed as dist

    t = torch.tensor(list(values), dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return t.tolist()


def all_gather_object(obj, info: DistInfo) -> list:
    if not info.distributed:
        return [obj]
    import torch.distributed as dist

    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, info: DistInfo):
    if not info.distributed:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(info: DistInfo) -> None:
    if info.distributed:
        import torch.distributed as dist

        dist.barrier()
