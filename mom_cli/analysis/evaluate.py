"""`mom eval`: perplexity of any model on text, the same way for the source and the result."""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass
from typing import Callable, ContextManager

import numpy as np
import torch
import torch.nn.functional as F

from mom_cli.console import progress
from mom_cli.errors import UsageError
from mom_cli.io.text import blocks, check_seq_len, token_stream


@dataclass
class EvalResult:
    model: str
    data: str
    perplexity: float
    loss: float
    tokens: int
    seconds: float
    tokens_per_second: float

    def as_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def heldout_loss(
    model,
    batches: torch.Tensor | np.ndarray,
    batch_size: int,
    device: str,
    autocast: Callable[[], ContextManager] = contextlib.nullcontext,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[float, int]:
    """Mean next-token cross-entropy over (n, seq_len) token blocks, and the number of tokens predicted.

    The one held-out loss loop: `mom eval`, prune's measurements and train's held-out evaluation.
    Logits are taken in float32 for the loss whatever the model computes in (`autocast`).
    """
    total, count = 0.0, 0
    for i in range(0, batches.shape[0], batch_size):
        b = batches[i : i + batch_size]
        x = (b if isinstance(b, torch.Tensor) else torch.from_numpy(b.astype(np.int64))).to(device)
        with autocast():
            logits = model(input_ids=x, use_cache=False).logits
        total += F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), x[:, 1:].flatten(), reduction="sum").item()
        count += x[:, 1:].numel()
        if on_batch is not None:
            on_batch(x.shape[0])
    return total / count, count


def perplexity(model, batches: torch.Tensor, batch_size: int, device: str) -> tuple[float, int]:
    """`heldout_loss` with a progress bar."""
    with progress() as bar:
        task = bar.add_task("evaluating", total=batches.shape[0])
        return heldout_loss(model, batches, batch_size, device, on_batch=lambda n: bar.advance(task, n))


def check_eval_options(seq_len: int, batch_size: int, max_tokens: int | None = None) -> None:
    if seq_len < 2 or batch_size < 1:
        raise UsageError("--seq-len must be >= 2 and --batch-size >= 1")
    if max_tokens is not None and max_tokens < seq_len:
        raise UsageError(
            f"--max-tokens {max_tokens} caps the tokens evaluated below one sequence of --seq-len {seq_len}; "
            f"give --max-tokens {seq_len} or more"
        )


def evaluate(
    model, tokenizer, ref: str, data: str, seq_len: int, max_tokens: int | None, batch_size: int, device: str
) -> EvalResult:
    check_eval_options(seq_len, batch_size, max_tokens)
    check_seq_len(
        seq_len, getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    )
    stream = token_stream(data, tokenizer, max_tokens)
    batches = blocks(stream, seq_len)
    start = time.perf_counter()
    loss, count = perplexity(model, batches, batch_size, device)
    seconds = time.perf_counter() - start
    return EvalResult(ref, data, math.exp(loss), loss, count, seconds, count / seconds if seconds else float("inf"))
