"""Model families: how a source architecture's tensors map to and from MoM modules.

Each family is one small file defining a `Family`. Adding a family is adding a file and one line
in `FAMILIES`. A family answers four questions:
  - which source configs it takes (`model_types`) and the `MomConfig` sizes they imply;
  - which source tensors make the MHA module and the FFN module of source layer i;
  - which make the embeddings, final norm and head;
  - the way back, for `mom export --format hf` (a MoM that is still a plain stack of layers).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch

from mom_cli.errors import UsageError

Transform = Callable[[list[torch.Tensor]], torch.Tensor]


@dataclass(frozen=True)
class Derived:
    """A tensor derived from named tensors of another checkpoint (read lazily, on demand)."""

    keys: tuple[str, ...]
    fn: Transform | None = None  # None: the single key's tensor as it is

    def build(self, get: Callable[[str], torch.Tensor]) -> torch.Tensor:
        tensors = [get(k) for k in self.keys]
        return tensors[0] if self.fn is None else self.fn(tensors)


def same(key: str) -> Derived:
    return Derived((key,))


class Family(Protocol):
    name: str
    model_types: tuple[str, ...]
    hf_norms: tuple[str, str, str, str]  # layers, attention pre-norm, FFN pre-norm, final norm (module paths)

    def mom_kwargs(self, cfg: Any, keys: set[str]) -> dict[str, Any]: ...
    def num_layers(self, cfg: Any) -> int: ...
    def mha_from_source(self, i: int, keys: set[str]) -> dict[str, Derived]: ...
    def ffn_from_source(self, i: int, keys: set[str]) -> dict[str, Derived]: ...
    def globals_from_source(self, keys: set[str], tied: bool) -> dict[str, Derived]: ...
    def layer_to_source(self, i: int, mha: str, ffn: str, mom_cfg: Any) -> dict[str, Derived]: ...
    def globals_to_source(self, mom_cfg: Any) -> dict[str, Derived]: ...
    def source_config(self, mom_cfg: Any, n_layers: int) -> dict[str, Any]: ...


def _registry() -> dict[str, Family]:
    from .gpt2 import GPT2
    from mom_cli.families.llama import LLAMA

    return {f.name: f for f in (GPT2, LLAMA)}


def supported_model_types() -> list[str]:
    return sorted(t for f in _registry().values() for t in f.model_types)


def family_for(model_type: str) -> Family:
    for fam in _registry().values():
        if model_type in fam.model_types:
            return fam
    raise UsageError(
        f"unsupported model family {model_type!r}: mom supports {', '.join(supported_model_types())}"
    )


def family_named(name: str) -> Family:
    return _registry()[name]
