"""Text data for every command that reads it: a text file, `.jsonl` (a `text` field), `.parquet`, a
folder of `.txt`/`.jsonl`/`.parquet` files, or `hf:NAME[:CONFIG[:SPLIT]]` through `datasets`.

Documents are tokenised, joined with the end-of-text token between them, and cut into blocks of
`seq_len` tokens (non-overlapping, in file order: deterministic).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import torch

from mom_cli.errors import MomError, UsageError, one_line

SUFFIXES = (".txt", ".jsonl", ".parquet")


def iter_texts(spec: str) -> Iterator[str]:
    if spec.startswith("hf:"):
        yield from _hf_texts(spec[3:])
        return
    path = Path(spec).expanduser()
    if not path.exists():
        raise UsageError(
            f"data {spec} does not exist; pass a .txt, .jsonl or .parquet file, a folder of them, or hf:NAME"
        )
    files = sorted(p for p in path.rglob("*") if p.suffix in SUFFIXES) if path.is_dir() else [path]
    if not files:
        raise UsageError(f"no .txt, .jsonl or .parquet files in {path}")
    for f in files:
        yield from _file_texts(f)


def _file_texts(path: Path) -> Iterator[str]:
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8", errors="replace") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)["text"]
                except (ValueError, KeyError, TypeError, IndexError) as e:
                    raise UsageError(
                        f'{path}:{n}: each line must be a JSON object with a "text" field ({one_line(e, 80)})'
                    ) from e
                if not isinstance(text, str):
                    raise UsageError(f'{path}:{n}: the "text" field must be a string, got {type(text).__name__}')
                yield text
    elif path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise UsageError("reading .parquet needs pyarrow: pip install pyarrow") from None
        try:
            table = pq.read_table(path, columns=["text"])
            texts = table.column("text").to_pylist()
        except Exception as e:  # pyarrow has its own error types for every kind of damage
            raise UsageError(f'cannot read {path} as parquet with a "text" column: {one_line(e, 120)}') from e
        for n, t in enumerate(texts):
            if t is not None and not isinstance(t, str):
                raise UsageError(f'{path}: row {n} of the "text" column is not a string')
            if t:
                yield t
    else:  # any other single file is plain text (.txt, .md, .rst, ...)
        yield path.read_text(encoding="utf-8", errors="replace")


def _hf_texts(name: str) -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise UsageError("hf: data needs the datasets package: pip install 'mom-cli[data]'") from None
    parts = name.split(":")
    dataset, config, split = (
        parts[0],
        (parts[1] or None) if len(parts) > 1 else None,
        parts[2] if len(parts) > 2 else "train",
    )
    try:
        ds = datasets.load_dataset(dataset, config, split=split, streaming=True)
    except Exception as e:
        raise MomError(f"cannot load dataset {name!r}: {e}") from e
    for row in ds:
        yield row["text"]


def token_stream(spec: str, tokenizer: Any, max_tokens: int | None = None) -> torch.Tensor:
    """All documents as one 1-D tensor of token ids, end-of-text between documents."""
    eos = tokenizer.eos_token_id
    chunks: list[torch.Tensor] = []
    total = 0
    for text in iter_texts(spec):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if eos is not None:
            ids = ids + [eos]
        chunks.append(torch.tensor(ids, dtype=torch.long))
        total += len(ids)
        if max_tokens is not None and total >= max_tokens:
            break
    if not chunks:
        raise UsageError(f"data {spec} holds no text")
    stream = torch.cat(chunks)
    return stream[:max_tokens] if max_tokens is not None else stream


def check_seq_len(seq_len: int, positions: int | None) -> None:
    """--seq-len must fit the model's learned or rotary positions (None: the model has no limit)."""
    if positions is not None and seq_len > positions:
        raise UsageError(
            f"--seq-len {seq_len} is longer than the model's {positions} positions; use --seq-len {positions} or less"
        )


def blocks(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    """(n_blocks, seq_len) non-overlapping windows; the tail shorter than seq_len is dropped."""
    n = stream.numel() // seq_len
    if n == 0:
        raise UsageError(
            f"the text gives {stream.numel()} tokens (after any --max-tokens cap), fewer than one sequence of "
            f"--seq-len {seq_len}; give more text, a larger --max-tokens or a shorter --seq-len"
        )
    return stream[: n * seq_len].view(n, seq_len)


def calibration_split(
    tokenizer: Any,
    data: str | None,
    calib_tokens: int,
    seq_len: int,
    eval_data: str | None = None,
    eval_tokens: int | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(calibration blocks, held-out blocks) for the commands that measure on text (prune,
    convert-peer): the first `calib_tokens` of DATA, then held-out text from `eval_data`, or else
    DATA after the calibration tokens (as many as `eval_tokens`, default `calib_tokens`).

    Either is None when there is no such text (no DATA; nothing beyond the calibration tokens,
    with a warning). A DATA or `eval_data` too short for what was asked is a usage error.
    """
    from mom_cli.console import warn

    n_eval = eval_tokens or calib_tokens
    calib = rest = None
    if data:
        stream = token_stream(data, tokenizer, calib_tokens + (0 if eval_data else n_eval))
        if stream.numel() < calib_tokens:
            raise UsageError(
                f"calibration data {data} has {stream.numel()} tokens, fewer than --calib-tokens "
                f"{calib_tokens}; give more text or a smaller --calib-tokens"
            )
        calib = blocks(stream[:calib_tokens], seq_len)
        rest = None if eval_data else stream[calib_tokens:]
    if eval_data:
        rest = token_stream(eval_data, tokenizer, n_eval)
        if rest.numel() < seq_len:
            raise UsageError(
                f"--eval-data {eval_data} has {rest.numel()} tokens, fewer than one --seq-len "
                f"{seq_len}; give more text or a shorter --seq-len"
            )
    if rest is None or rest.numel() < seq_len:
        warn(
            "no held-out text beyond the calibration tokens: pass --eval-data (or more DATA) to measure the result on unseen text"
        )
        return calib, None
    return calib, blocks(rest, seq_len)
