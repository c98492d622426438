"""Output directories that appear whole or not at all.

Every command writes into a hidden temporary directory beside the target and renames it into
place when it has finished; a failure or an interrupt removes the temporary directory. An existing
output is only replaced with `force`, and then only after the new one is complete.
"""
from __future__ import annotations

import os
import shutil
import signal
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from mom_cli.errors import MomError, UsageError


@contextmanager
def _signals_held() -> Iterator[None]:
    """Delay SIGINT/SIGTERM/SIGHUP (to after the block) where the platform allows it."""
    held = {getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n)}
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _discard(remove: Callable[[], None]) -> None:
    """Remove a temporary output; a second Ctrl-C or SIGTERM must not cut this short."""
    with _signals_held():
        try:
            remove()
        except KeyboardInterrupt:  # one that was already pending: finish, then let it through
            remove()
            raise


def _as_if_created(path: Path, mode: int) -> None:
    """mkdtemp/mkstemp make private (0700/0600) entries; give the output the permissions a plain
    mkdir/open would have (mode less the umask), so a checkpoint is as readable as any other file."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, mode & ~mask)


def check_output(path: Path, force: bool) -> None:
    if path.exists() and not force:
        raise UsageError(f"output {path} already exists; pass --force to replace it or choose another -o")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.exists():
        raise UsageError(f"output folder {parent} does not exist; create it first")
    if not parent.is_dir():
        raise UsageError(f"output folder {parent} is not a directory; choose another -o")
    if not os.access(parent, os.W_OK):
        raise MomError(f"cannot write to {parent}: permission denied; choose a writable -o")


@contextmanager
def atomic_dir(path: Path, force: bool) -> Iterator[Path]:
    """Yield a temporary directory that becomes `path` when the block completes."""
    path = Path(path)
    check_output(path, force)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        _as_if_created(tmp, 0o777)
        yield tmp
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / "x")
            try:
                os.replace(tmp, path)
            except BaseException:  # put the previous output back rather than lose both
                os.replace(old / "x", path)
                old.rmdir()
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        _discard(lambda: shutil.rmtree(tmp, ignore_errors=True))
        raise


@contextmanager
def atomic_file(path: Path, force: bool) -> Iterator[Path]:
    """Yield a temporary file path that becomes `path` when the block completes."""
    path = Path(path)
    check_output(path, force)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        _as_if_created(tmp, 0o666)
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        _discard(lambda: tmp.unlink(missing_ok=True))
        raise
