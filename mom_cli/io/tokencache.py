"""Training text, tokenised once and kept as memory-mapped token blocks.

The first run over a data set tokenises it with the shared loader (`data.iter_texts`: end-of-text
between documents) and writes the token ids as raw int32 to a cache file; every later run, and
every rank of a distributed run, maps that file and reads its blocks without tokenising again.

Where the cache lives: beside the data (`DATA_DIR/.mom-tokens/`), or in the user cache dir
(`$XDG_CACHE_HOME/mom/tokens`, default `~/.cache/mom/tokens`) when the data's folder is not
writable and for `hf:` data sets. The file name holds a key of the data's identity (each file's
path, size and modification time, or the `hf:` spec and token cap) and of the tokenizer (a hash of
its full definition), so an edited file or another tokenizer gets a fresh cache. The whole stream
is cached, not blocks of one length: `--seq-len` only changes how the same file is viewed.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from mom_cli.errors import MomError, UsageError
from mom_cli.io.text import SUFFIXES, iter_texts

DTYPE = np.int32
DIR_NAME = ".mom-tokens"


def data_files(spec: str) -> list[Path]:
    """The files `data.iter_texts` reads for a local spec, in the same order."""
    path = Path(spec).expanduser()
    if not path.exists():
        raise UsageError(
            f"data {spec} does not exist; pass a .txt, .jsonl or .parquet file, a folder of them, or hf:NAME"
        )
    return sorted(p for p in path.rglob("*") if p.suffix in SUFFIXES) if path.is_dir() else [path]


def tokenizer_id(tokenizer: Any) -> str:
    """A hash of what decides the token ids: the fast tokenizer's full definition when it has one."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = (
        backend.to_str()
        if backend is not None
        else f"{type(tokenizer).__name__}:{tokenizer.name_or_path}:{len(tokenizer)}"
    )
    text += f"|eos={tokenizer.eos_token_id}"
    return hashlib.sha256(text.encode()).hexdigest()


def cache_key(spec: str, tokenizer: Any, max_tokens: int | None) -> str:
    if spec.startswith("hf:"):
        ident: Any = {"hf": spec, "max_tokens": max_tokens}
    else:
        ident = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in data_files(spec)]
    raw = json.dumps({"data": ident, "tokenizer": tokenizer_id(tokenizer), "format": 1})
    return hashlib.sha256(raw.encode()).hexdigest()[:20]


def user_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mom" / "tokens"


def cache_path(spec: str, tokenizer: Any, max_tokens: int | None = None) -> Path:
    """Where this data's tokens are (or will be) cached; beside the data when that folder is writable."""
    key = cache_key(spec, tokenizer, max_tokens)
    if spec.startswith("hf:"):
        name = spec[3:].replace("/", "_").replace(":", "_")
        return user_cache_dir() / f"{name}.{key}.tokens"
    path = Path(spec).expanduser().resolve()
    folder = (path if path.is_dir() else path.parent) / DIR_NAME
    target = folder / f"{path.name}.{key}.tokens"
    if target.exists() or _writable(folder):
        return target
    return user_cache_dir() / f"{path.name}.{key}.tokens"


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK)


def build(spec: str, tokenizer: Any, target: Path, max_tokens: int | None = None) -> Path:
    """Tokenise `spec` into `target` (written to a temporary file, then renamed: never half a cache)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    eos = tokenizer.eos_token_id
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    total = 0
    try:
        with os.fdopen(fd, "wb") as f:
            for text in iter_texts(spec):
                ids = tokenizer(text, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
                if max_tokens is not None:
                    ids = ids[: max_tokens - total]
                f.write(np.asarray(ids, dtype=DTYPE).tobytes())
                total += len(ids)
                if max_tokens is not None and total >= max_tokens:
                    break
        if total == 0:
            raise UsageError(f"data {spec} holds no text")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's file is private; a cache is as readable as the data
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def ensure(spec: str, tokenizer: Any, max_tokens: int | None = None) -> Path:
    """The cache file for `spec`, tokenising the data first if it is not cached yet.

    `max_tokens` caps `hf:` data sets (which may be endless); local files are always cached whole.
    """
    cap = max_tokens if spec.startswith("hf:") else None
    target = cache_path(spec, tokenizer, cap)
    return target if target.exists() else build(spec, tokenizer, target, cap)


def open_blocks(path: Path, seq_len: int, vocab: int | None = None) -> np.ndarray:
    """(n_blocks, seq_len) read-only memory-mapped view of a cache file; the short tail is dropped.
    A damaged cache (a size that is no whole number of ids, ids outside the vocabulary) is refused
    in one line that names it, so it can be deleted."""
    hint = f"the token cache {path} is damaged ({{}}); delete it (or the whole {DIR_NAME}/ folder) and run again"
    size = path.stat().st_size
    if size == 0 or size % np.dtype(DTYPE).itemsize:
        raise MomError(hint.format(f"{size} bytes, not a whole number of token ids"))
    stream = np.memmap(path, dtype=DTYPE, mode="r")
    if vocab is not None:
        low, high = int(stream.min()), int(stream.max())
        if low < 0 or high >= vocab:
            raise MomError(hint.format(f"token id {low if low < 0 else high} is outside the vocabulary of {vocab}"))
    n = stream.shape[0] // seq_len
    return stream[: n * seq_len].reshape(n, seq_len)
