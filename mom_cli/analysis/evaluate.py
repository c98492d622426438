"""`mom eval`: perplexity of any model on text, the same way for the source and the result."""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch

from mom_cli.console import progress
from mom_cli.io.text import blocks, token_stream


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
def perplexity(model, batches: torch.Tensor, batch_size: int, device: str) -> tuple[float, int]:
    """Mean next-token loss over (n, seq_len) blocks, and the number of tokens predicted."""
    total, count = 0.0, 0
    with progress() as bar:
        task = bar.add_task("evaluating", total=batches.shape[0])
        for i in range(0, batches.shape[0], batch_size):
            x = batches[i : i + batch_size].to(device)
            logits = model(input_ids=x, use_cache=False).logits.float()
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"
            )
            total += loss.item()
            count += x[:, 1:].numel()
            bar.advance(task, x.shape[0])
    return total / count, count


def evaluate(model, tokenizer, ref: str, data: str, seq_len: int, max_tokens: int | None, batch_size: int, device: str) -> EvalResult:
    from mom_cli.errors import UsageError

    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if limit is not None and seq_len > limit:
        raise UsageError(f"--seq-len {seq_len} is longer than the model's {limit} positions; use --seq-len {limit} or less")
    stream = token_stream(data, tokenizer, max_tokens)
    batches = blocks(stream, seq_len)
    start = time.perf_counter()
    loss, count = perplexity(model, batches, batch_size, device)
    seconds = time.perf_counter() - start
    return EvalResult(ref, data, math.exp(loss), loss, count, seconds, count / seconds if seconds else float("inf"))
