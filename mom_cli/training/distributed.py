"""Data-parallel training on PyTorch's own engine, for `torchrun --nproc-per-node N -m mom_cli ...`.

One process per device. torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; without them everything here
is a no-op and the same training code runs as one process. The backend is NCCL on GPUs and gloo on
CPU (which is how the tests run two processes on one machine). Rank 0 writes every file.

Two strategies (`wrap`): `ddp` keeps the whole model on every rank; `fsdp` (PyTorch's FSDP2,
`fully_shard`) keeps 1/N of every parameter, gradient and optimizer moment per rank, for models
that do not fit one GPU. With FSDP the parameters are DTensors: saving gathers full tensors on
rank 0 (`full_params`, `full_optim_state`, `full_state_dict`), so what is written is the same as
with DDP, and loading scatters them back (`load_params`, `load_optim_state`).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

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


STRATEGIES = ("ddp", "fsdp")


def wrap(d: Dist, model: nn.Module, device: str, strategy: str = "ddp") -> nn.Module:
    """DDP: every rank holds the whole model and gradients are averaged over ranks in backward.

    Routing sends tokens to a subset of modules, so some parameters may get no gradient in a step:
    DDP has to look for them (`find_unused_parameters`). `fsdp` shards instead (`shard`).
    """
    if not d.active:
        return model
    if strategy == "fsdp":
        return shard(d, model, device)
    from torch.nn.parallel import DistributedDataParallel

    ids = [torch.device(device).index] if device.startswith("cuda") else None
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)


# ----------------------------------------------------------------------------- FSDP


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def shard(d: Dist, model: nn.Module, device: str) -> nn.Module:
    """FSDP2 in place: each whole layer (the model's `_no_split_modules`: every MoM block and plain
    layer) is one unit, gathered just before its forward and backward and freed after; the root
    unit holds the embeddings, final norm and head. Parameters become DTensors (make optimizers after).

    Every rank runs every layer, but routing sends each rank's tokens to other pool modules, so a
    parameter may have a gradient on one rank and none on another; FSDP2's reduce-scatter must see
    the same parameters on every rank, so the unused ones take part with zeros
    (`set_reduce_scatter_unused_params`, FSDP2's counterpart of DDP's `find_unused_parameters`).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.split(":")[0], (d.world,))
    layers = set(getattr(model, "_no_split_modules", None) or ())
    for module in list(model.modules()):
        if type(module).__name__ in layers:
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.set_reduce_scatter_unused_params(True)
    return model


@contextmanager
def no_sync(model: nn.Module) -> Iterator[None]:
    """Accumulate gradients locally, without communication (all micro-batches but the last)."""
    if not is_sharded(model):
        with model.no_sync():
            yield
        return
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


class UsedParams:
    """The names of the trainable parameters that received a gradient on this rank since `clear`.

    Under FSDP every parameter gets a (reduced) gradient, zeros where no rank used it; one process
    and DDP leave those None, so AdamW skips them (no step counted, moments untouched). Zeros are no
    test: a parameter can be used and still get exact zeros (behind a router head that starts at
    zero). So each unit's gathered parameters report autograd's accumulation into them.
    """

    def __init__(self, model: nn.Module) -> None:
        self.names: set[str] = set()
        self._hooked: set[int] = set()
        for prefix, module in model.named_modules():
            if is_sharded(module):  # runs after FSDP's own pre-forward hook: the parameters are gathered
                module.register_forward_pre_hook(lambda m, args, prefix=prefix: self._watch(m, prefix))

    def _watch(self, module: nn.Module, prefix: str) -> None:
        from torch.distributed.tensor import DTensor

        for name, p in module.named_parameters(prefix=prefix):
            if p.requires_grad and not isinstance(p, DTensor) and id(p) not in self._hooked:  # gathered: plain
                self._hooked.add(id(p))  # FSDP keeps one gathered Parameter per parameter for the run
                p.register_post_accumulate_grad_hook(lambda _, name=name: self.names.add(name))


def drop_unused_grads(named: list[tuple[str, nn.Parameter]], used: UsedParams) -> None:
    """After an FSDP backward: take away the (zero) gradient of every parameter no rank used this
    step (all its modules passed over by every router), as one process and DDP have none."""
    import torch.distributed as dist

    with_grad = [(n, p) for n, p in named if p.grad is not None]
    if with_grad:
        flags = torch.tensor(
            [n in used.names for n, _ in with_grad], dtype=torch.int32, device=_local(with_grad[0][1].grad).device
        )
        dist.all_reduce(flags)
        for (_, p), u in zip(with_grad, flags.tolist()):
            if not u:
                p.grad = None
    used.names.clear()


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def full_params(d: Dist, named: list[tuple[str, nn.Parameter]]) -> dict[str, torch.Tensor]:
    """Whole parameters on the CPU, on rank 0 (a collective under FSDP: every rank calls it)."""
    from torch.distributed.tensor import DTensor

    out = {}
    for n, p in named:
        value = p.detach().full_tensor() if isinstance(p, DTensor) else p.detach()
        if d.main:
            out[n] = value.cpu()
    return out


def load_params(named: list[tuple[str, nn.Parameter]], values: dict[str, torch.Tensor]) -> None:
    """Copy whole tensors into (possibly sharded) parameters: each rank keeps its own shard."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = dict(named)
    with torch.no_grad():
        for n, value in values.items():
            p = params[n]
            if isinstance(p, DTensor):  # every rank holds the whole value: no communication
                value = distribute_tensor(value.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
            p.copy_(value)


def _options(**kw: Any):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(**kw)


def full_state_dict(d: Dist, model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with whole tensors (on rank 0's CPU under FSDP; a collective)."""
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options(full_state_dict=True, cpu_offload=True))


def _param_names(model: nn.Module, opt: torch.optim.Optimizer) -> list[str]:
    """The optimizer's parameters by name, in the order of its own state dict's indices."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in opt.param_groups for p in g["params"]]


def full_optim_state(d: Dist, model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """`opt.state_dict()`, with whole tensors under FSDP (on rank 0; a collective): the same format
    (parameters by index) whichever the strategy, so a saved state does not depend on it."""
    if not is_sharded(model):
        return opt.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    sd = get_optimizer_state_dict(model, opt, options=_options(full_state_dict=True, cpu_offload=True))
    if not d.main:  # the other ranks get nothing back
        return {}
    index = {n: i for i, n in enumerate(_param_names(model, opt))}
    return {
        "state": {index[n]: s for n, s in sd["state"].items()},
        "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in sd["param_groups"]],
    }


def load_optim_state(model: nn.Module, opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """The counterpart of `full_optim_state`: each rank keeps its shard of the moments."""
    if not is_sharded(model):
        opt.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    names = _param_names(model, opt)
    sd = {
        "state": {names[i]: s for i, s in state["state"].items()},
        "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]],
    }
    set_optimizer_state_dict(model, opt, sd, options=_options(full_state_dict=True))
