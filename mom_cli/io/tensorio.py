"""Lazy tensor reading and streaming safetensors writing.

Readers open checkpoints memory-mapped and hand out one tensor at a time, so surgery never holds
a whole model. The writer lays out each file's header from the shapes first, then streams every
tensor's bytes as it is produced: peak memory is about one tensor, not one shard. (`safetensors`
itself only saves a dict already held in memory, hence the ~40 lines of format writing here.)
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch
from safetensors import safe_open

from mom_cli.errors import MomError, UsageError, one_line

_ST_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_TORCH_DTYPES = {v: k for k, v in _ST_DTYPES.items()}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}  # safetensors names
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class TensorReader(Protocol):
    def keys(self) -> set[str]: ...
    def get(self, name: str) -> torch.Tensor: ...


class SafetensorsReader:
    """All tensors of a directory's `model.safetensors` (or its sharded index), memory-mapped."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._where: dict[str, Path] = {}
        self._handles: dict[Path, object] = {}
        self._layouts: dict[Path, tuple[int, dict]] = {}
        index = self.directory / INDEX_NAME
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                self._where = {k: self._shard_path(v) for k, v in weight_map.items()}
            except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
                raise MomError(
                    f"corrupt shard index {index}: {one_line(e, 120)}; re-download or re-export the checkpoint"
                ) from e
        else:
            files = sorted(self.directory.glob("*.safetensors"))
            if not files:
                raise UsageError(f"no safetensors weights in {self.directory}")
            for f in files:
                for k in self._open(f).keys():
                    self._where[k] = f

    def _shard_path(self, name: object) -> Path:
        """A shard named by the index: a plain file name inside the checkpoint directory, never a
        path that leads out of it (`../x`, `/etc/x`) or through a link."""
        if not isinstance(name, str) or name != Path(name).name or name in (".", ".."):
            raise ValueError(f"shard {str(name)[:80]!r} is not a file name inside the checkpoint folder")
        path = self.directory / name
        if path.is_symlink():
            raise ValueError(f"shard {name!r} is a symbolic link")
        return path

    def _open(self, path: Path):
        if path not in self._handles:
            if not path.exists():
                raise MomError(f"shard {path} is missing; the checkpoint is incomplete")
            try:
                self._handles[path] = safe_open(str(path), framework="pt")
            except Exception as e:  # safetensors raises its own error types for every kind of damage
                raise MomError(
                    f"cannot read {path}: {one_line(e, 120)} (truncated or corrupt safetensors file; re-download or re-create it)"
                ) from e
        return self._handles[path]

    def keys(self) -> set[str]:
        return set(self._where)

    def get(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise MomError(f"tensor {name!r} is missing from {self.directory}; the checkpoint is incomplete")
        path = self._where[name]
        try:
            return self._read(path, name)
        except MomError:
            raise
        except Exception as e:
            raise MomError(f"cannot read tensor {name!r} from {path}: {one_line(e, 120)} (corrupt file?)") from e

    def _read(self, path: Path, name: str) -> torch.Tensor:
        """Read one tensor with plain file reads into a fresh buffer.

        Not through mmap: mapped pages count as resident until the mapping goes, so mmap plus the
        copy a caller may keep would cost twice the tensor. Here the tensor's bytes are all it costs.
        """
        start, entry = self._layout(path, name)
        dtype = _TORCH_DTYPES.get(entry["dtype"])
        if dtype is None:  # exotic dtypes (fp8, ...): let safetensors decode them
            with safe_open(str(path), framework="pt") as handle:
                return handle.get_tensor(name).clone()
        begin, end = entry["data_offsets"]
        out = torch.empty(entry["shape"], dtype=dtype)
        buffer = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        if len(buffer) != end - begin:
            raise MomError(f"tensor {name!r} in {path}: header size does not match its shape (corrupt file)")
        with open(path, "rb") as f:
            f.seek(start + begin)
            if f.readinto(buffer) != len(buffer):
                raise MomError(f"{path} is truncated at tensor {name!r}; re-download or re-create it")
        return out

    def _layout(self, path: Path, name: str) -> tuple[int, dict]:
        """(offset of the data section, the tensor's header entry); each header parsed once."""
        if path not in self._layouts:
            if not path.exists():
                raise MomError(f"shard {path} is missing; the checkpoint is incomplete")
            # Python's own open() first: a signal that comes while it blocks (a slow or network
            # file) interrupts it at once, where a blocked native open would delay Ctrl-C.
            try:
                with open(path, "rb") as f:
                    (n,) = struct.unpack("<Q", f.read(8))
                    header = json.loads(f.read(n))
            except (ValueError, struct.error):
                header = None
            self._open(path)  # validates the whole file, and names the damage in one line
            if not isinstance(header, dict):
                raise MomError(
                    f"cannot read the header of {path} (corrupt safetensors file; re-download or re-create it)"
                )
            self._layouts[path] = (8 + n, header)
        start, header = self._layouts[path]
        return start, header[name]

    def shape(self, name: str) -> list[int]:
        return list(self._open(self._where[name]).get_slice(name).get_shape())

    def dtype_name(self, name: str) -> str:
        """The dtype the header records, by its safetensors name (F32, I64, ...)."""
        return self._open(self._where[name]).get_slice(name).get_dtype()

    def dtype(self, name: str) -> torch.dtype:
        stored = self._open(self._where[name]).get_slice(name).get_dtype()
        return {v: k for k, v in _ST_DTYPES.items()}.get(stored, torch.float32)

    def metadata(self) -> dict[str, str]:
        first = next(iter(self._where.values()))
        return self._open(first).metadata() or {}


class DictReader:
    """Tensors already in memory (a dequantised GGUF file)."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def keys(self) -> set[str]:
        return set(self.tensors)

    def get(self, name: str) -> torch.Tensor:
        if name not in self.tensors:
            raise MomError(f"tensor {name!r} is missing from the source")
        return self.tensors[name]

    def shape(self, name: str) -> list[int]:
        return list(self.get(name).shape)

    def dtype(self, name: str) -> torch.dtype:
        return self.get(name).dtype


@dataclass
class PlannedTensor:
    """One output tensor: its name, shape and dtype are known before anything is computed."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    produce: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()


def parse_size(text: str) -> int:
    """'2GB', '500MB', '1.5GiB', '1000' -> bytes."""
    units = {
        "": 1,
        "B": 1,
        "KB": 10**3,
        "MB": 10**6,
        "GB": 10**9,
        "TB": 10**12,
        "KIB": 2**10,
        "MIB": 2**20,
        "GIB": 2**30,
        "TIB": 2**40,
    }
    t = text.strip().upper()
    num = t.rstrip("KMGTIB")
    unit = t[len(num) :]
    try:
        value = float(num)
    except ValueError:
        value = -1
    if unit not in units or value <= 0:
        raise UsageError(f"bad size {text!r}: use a number with a unit, e.g. 2GB or 500MB")
    return int(value * units[unit])


def _shards(tensors: list[PlannedTensor], max_bytes: int) -> list[list[PlannedTensor]]:
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def write_file(path: Path, tensors: list[PlannedTensor], metadata: dict[str, str], on_tensor=lambda t: None) -> None:
    """One safetensors file at `path`, header first, then each tensor streamed as it is produced."""
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for t in tensors:
        header[t.name] = {
            "dtype": _ST_DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format aligns the data section to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for t in tensors:
            value = t.produce()
            if t.dtype.is_floating_point and not (value.dtype.is_floating_point or value.dtype.is_complex):
                raise MomError(
                    f"tensor {t.name} is a weight but was stored as {str(value.dtype).removeprefix('torch.')}: "
                    "the source file's header does not tell the truth about its dtype"
                )
            if tuple(value.shape) != t.shape:
                raise MomError(
                    f"tensor {t.name}: got shape {tuple(value.shape)}, expected {t.shape}; the source does not match its config"
                )
            value = value.detach().to(device="cpu", dtype=t.dtype).contiguous()
            f.write(memoryview(value.reshape(-1).view(torch.uint8).numpy()))  # no extra copy
            on_tensor(t)
        f.flush()
        os.fsync(f.fileno())


def write_safetensors(
    directory: Path,
    tensors: list[PlannedTensor],
    max_shard_bytes: int,
    metadata: dict[str, str] | None = None,
    on_tensor: Callable[[PlannedTensor], None] = lambda t: None,
) -> list[Path]:
    """Write `tensors` as `model.safetensors`, or shards plus an index above `max_shard_bytes`."""
    meta = {"format": "pt", **(metadata or {})}
    shards = _shards(tensors, max_shard_bytes)
    if len(shards) == 1:
        path = directory / SINGLE_NAME
        write_file(path, shards[0], meta, on_tensor)
        return [path]
    paths, weight_map = [], {}
    for i, shard in enumerate(shards, 1):
        path = directory / f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        write_file(path, shard, meta, on_tensor)
        paths.append(path)
        weight_map.update({t.name: path.name for t in shard})
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors)}, "weight_map": weight_map}
    (directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return paths
