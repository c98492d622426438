"""What the routers of a MoM do on real text: the share of tokens each module gets at each step,
and the path single tokens take. `mom plot routing` draws it (plots.py).

Shares are counted by `RoutingRecorder` over DATA; paths record, for every token of a short sample,
the module with the largest routing weight at each step (SKIP included).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from mom_cli.errors import UsageError
from mom_cli.modeling.modeling_mom import RoutingRecorder

KINDS = ("mha", "ffn")


@dataclass
class RoutingPicture:
    """Everything the routing plot draws, as plain arrays."""

    # (block, kind) -> (choices, steps): share of the routing choices at each step; columns sum to 1
    shares: dict[tuple[int, str], np.ndarray]
    # (block, kind) -> slot names, SKIP last ("3 (L5)": slot 3, from source layer 5)
    names: dict[tuple[int, str], list[str]]
    tokens: int  # tokens the shares were measured on
    # (block, kind) -> (steps, sample tokens): the top-weighted choice of each sample token
    paths: dict[tuple[int, str], np.ndarray] = field(default_factory=dict)
    sample: list[str] = field(default_factory=list)  # the sample's tokens as text


class PathRecorder(RoutingRecorder):
    """Also keeps each token's top choice at each step (for a short sample)."""

    def __init__(self) -> None:
        super().__init__()
        self.top: dict[tuple[int, str, int], torch.Tensor] = {}

    def record(self, block: int, kind: str, step: int, r: Any, x_in: torch.Tensor, x_out: torch.Tensor) -> None:
        super().record(block, kind, step, r, x_in, x_out)
        best = r.weight.float().argmax(-1, keepdim=True)
        self.top[(block, kind, step)] = r.idx.gather(-1, best)[:, 0].cpu()


def shares_from_stats(
    stats: dict, config: Any
) -> tuple[dict[tuple[int, str], np.ndarray], dict[tuple[int, str], list[str]]]:
    """Recorder counts -> per (block, kind) a (choices x steps) array of shares, and slot names."""
    shares, names = {}, {}
    for b, spec in enumerate(config.blocks):
        for kind in KINDS:
            steps = [stats[(b, kind, h)][0].numpy() for h in range(spec["steps"]) if (b, kind, h) in stats]
            if not steps:
                continue
            counts = np.stack(steps, axis=1)
            total = counts.sum(axis=0, keepdims=True)
            shares[(b, kind)] = counts / np.where(total > 0, total, 1)
            names[(b, kind)] = [f"{s} (L{o})" if o is not None else f"{s} (pruned)" for s, o in enumerate(spec[kind])]
            names[(b, kind)] += ["SKIP"] * (counts.shape[0] - len(spec[kind]))
    return shares, names


def check_trace_options(max_tokens: int, seq_len: int, batch_size: int, sample_tokens: int) -> None:
    if max_tokens < 2 or seq_len < 2 or batch_size < 1 or sample_tokens < 1:
        raise UsageError("--max-tokens and --seq-len must be >= 2, --batch-size and --sample-tokens >= 1")
    if max_tokens < seq_len:
        raise UsageError(
            f"--max-tokens {max_tokens} caps the tokens measured below one sequence of --seq-len {seq_len}; "
            f"give --max-tokens {seq_len} or more"
        )


@torch.no_grad()
def trace(
    model: Any,
    tokenizer: Any,
    data: str,
    max_tokens: int,
    seq_len: int,
    batch_size: int,
    sample_tokens: int,
    device: str,
) -> RoutingPicture:
    """Shares over up to `max_tokens` tokens of `data`; paths for its first `sample_tokens` tokens."""
    from mom_cli.io.text import blocks, token_stream

    check_trace_options(max_tokens, seq_len, batch_size, sample_tokens)
    config = model.config
    if getattr(config, "model_type", None) != "mom":
        raise UsageError("routing plots need a MoM checkpoint (made by mom decompose), not a plain model")
    if not config.blocks:
        raise UsageError("this MoM has no routed blocks (only plain layers): there is no routing to draw")
    seq_len = min(seq_len, config.max_position_embeddings)
    stream = token_stream(data, tokenizer, max_tokens)
    batches = blocks(stream, seq_len)
    inner = model.model
    inner.recorder = rec = RoutingRecorder()
    try:
        for i in range(0, batches.shape[0], batch_size):
            model(batches[i : i + batch_size].to(device), use_cache=False)
        shares, names = shares_from_stats(rec.stats, config)
        sample = stream[: min(sample_tokens, seq_len)]
        inner.recorder = paths_rec = PathRecorder()
        model(sample[None].to(device), use_cache=False)
    finally:
        inner.recorder = None
    paths = {
        (b, kind): torch.stack([paths_rec.top[(b, kind, h)] for h in range(spec["steps"])]).numpy()
        for b, spec in enumerate(config.blocks)
        for kind in KINDS
    }
    labels = [tokenizer.decode([t]) for t in sample.tolist()]
    return RoutingPicture(shares, names, int(batches.numel()), paths, labels)
