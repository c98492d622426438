"""Weights on demand: a model skeleton on the meta device, filled one submodule at a time from a
lazy tensor reader and emptied again after use (as llm-compressor's sequential pipeline does).

A pass that fills each layer just before it runs and empties it after holds about one layer's
weights, whatever the size of the model.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

Getter = Callable[[str], torch.Tensor]


def _meta_buffers(module: nn.Module) -> list[nn.Module]:
    """Submodules with a buffer still on the meta device (non-persistent ones: rotary tables, ...)."""
    return [m for m in module.modules() if any(b is not None and b.is_meta for b in m._buffers.values())]


def fill(
    module: nn.Module,
    prefix: str,
    get: Getter,
    has: Callable[[str], bool],
    init: Callable[[nn.Module], None],
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> None:
    """Give `module` real weights: tensor `prefix + name` for each parameter and stored buffer.

    Buffers a checkpoint does not store are computed by `init` (a PreTrainedModel's `_init_weights`).
    `dtype` casts floating-point tensors; None keeps the stored dtype. A tensor of another shape
    than its parameter raises ValueError.
    """
    for sub in _meta_buffers(module):
        sub.to_empty(device=device, recurse=False)
        init(sub)
    for name, p in list(module.named_parameters()):
        t = get(prefix + name)
        if t.shape != p.shape:
            raise ValueError(f"{prefix + name} is stored as {tuple(t.shape)}, the model expects {tuple(p.shape)}")
        _set(module, name, nn.Parameter(_cast(t, dtype, device), requires_grad=False))
    for name, _ in list(module.named_buffers()):
        if has(prefix + name):
            _set(module, name, _cast(get(prefix + name), dtype, device), buffer=True)


def empty(module: nn.Module) -> None:
    """Drop `module`'s weights (back to shapes only), and give their memory back to the system."""
    module.to("meta")
    _trim()


def _trim() -> None:
    # glibc serves allocations under its (dynamic, up to 32 MB) mmap threshold from the heap and
    # keeps what is freed there: a layer's tensors read one after another would pile up as
    # fragments (1.1 GB on a 1.1B model). malloc_trim returns the free pages.
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _libc() -> Any:
    import ctypes
    import ctypes.util

    try:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return lib if hasattr(lib, "malloc_trim") else None
    except OSError:  # not glibc (macOS, musl): nothing to trim
        return None


_LIBC = _libc()


def is_empty(module: nn.Module) -> bool:
    return any(p.is_meta for p in module.parameters())


def fill_buffers(module: nn.Module, init: Callable[[nn.Module], None], device: str | torch.device = "cpu") -> None:
    """Compute the buffers of a meta skeleton's parameter-free submodules (rotary embeddings)."""
    for sub in _meta_buffers(module):
        if not any(True for _ in sub.parameters(recurse=False)):
            sub.to_empty(device=device, recurse=False)
            init(sub)


def _cast(t: torch.Tensor, dtype: torch.dtype | None, device: str | torch.device) -> torch.Tensor:
    if dtype is not None and t.is_floating_point():
        t = t.to(dtype)
    return t.to(device)


def _set(module: nn.Module, name: str, value: torch.Tensor, buffer: bool = False) -> None:
    path, _, leaf = name.rpartition(".")
    owner = module.get_submodule(path) if path else module
    if buffer:
        owner._buffers[leaf] = value
    else:
        owner._parameters[leaf] = value
