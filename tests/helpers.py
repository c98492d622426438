"""Shared by the tests: decompose a fixture model in-process and compare logits."""
from __future__ import annotations

from pathlib import Path

import torch

from mom_cli.decompose import PlanOptions, decompose


def decomposed(src: Path, out: Path, **plan) -> Path:
    return decompose(str(src), out, PlanOptions(**plan))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def ids(batch: int = 2, seq: int = 24, vocab: int = 320, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g)
