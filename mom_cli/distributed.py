"""Data-parallel training on PyTorch's own engine, for `torchrun --nproc-per-node N -m mom_cli ...`.

One process per device. torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; without them everything here
is a no-op and the same training code runs as one process. The backend is NCCL on GPUs and gloo on
CPU (which is how the tests run two processes on one machine). Rank 0 writes every file.
Sharded training (FSDP) for models that do not fit one GPU is not implemented yet.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def from_env() -> Dist:
    """The process's place in a torchrun job (rank 0 of 1 when not launched by torchrun)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    return Dist(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))


def init(d: Dist, device: str) -> str:
    """Join the process group; returns this rank's device (cuda:LOCAL_RANK on GPUs)."""
    if not d.active:
        return device
    import torch.distributed as dist

    if device.startswith("cuda"):
        device = f"cuda:{d.local_rank}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return device


def shutdown(d: Dist) -> None:
    import torch.distributed as dist

    if d.active and dist.is_initialized():
        dist.destroy_process_group()


def barrier(d: Dist) -> None:
    if d.active:
        import torch.distributed as dist

        dist.barrier()


def mean(d: Dist, values: torch.Tensor) -> torch.Tensor:
    """The mean of a small tensor over ranks (for logged metrics)."""
    if not d.active:
        return values
    import torch.distributed as dist

    values = values.clone()
    dist.all_reduce(values)
    return values / d.world


def total(d: Dist, values: torch.Tensor) -> torch.Tensor:
    """The sum over ranks (routing counts); the tensor moves to the process group's device and back."""
    if not d.active:
        return values
    import torch.distributed as dist

    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    out = values.to(device).clone()
    dist.all_reduce(out)
    return out.to(values.device)


def wrap(d: Dist, model: nn.Module, device: str) -> nn.Module:
    """DDP: every rank holds the whole model and gradients are averaged over ranks in backward.

    Routing sends tokens to a subset of modules, so some parameters may get no gradient in a step:
    DDP has to look for them (`find_unused_parameters`).
    """
    if not d.active:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [torch.device(device).index] if device.startswith("cuda") else None
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)
