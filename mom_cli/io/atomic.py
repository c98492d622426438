"""Output directories that appear whole or not at all, one writer at a time.

Every command writes into a hidden temporary directory beside the target and renames it into
place when it has finished; a failure or an interrupt removes the temporary directory. An existing
output is only replaced with `force`, and then only after the new one is complete, by one atomic
exchange (`renameat2(RENAME_EXCHANGE)` on Linux): at every moment the target is the whole old
output or the whole new one. Where the OS has no exchange, two renames go through `.NAME.old-*`,
and the next run on that path puts the old output back if a kill came between them.

A writer holds an exclusive lock (`flock` on `.NAME.lock` beside the target) from its first check
to its commit; a second writer of the same path is refused. The lock holder also removes the
leftovers (`.NAME.tmp-*`, `.NAME.old-*`) of runs that were killed (SIGKILL cannot be caught).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import shutil
import signal
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from mom_cli.errors import MomError, UsageError

T = TypeVar("T")


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


# Paths this process has locked: lock file descriptor by resolved target. A command checks its
# output early (before minutes of work) and again when it writes: the lock is taken once.
_HELD: dict[Path, int] = {}
COMMITTED: list[Path] = []  # outputs this process has put in place (for the interrupt message)


def lock(path: Path, what: str = "output") -> None:
    """Take the exclusive lock of `path` for this process, or refuse: another mom writes it."""
    import fcntl

    key = Path(os.path.abspath(path))
    if key in _HELD or os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 holds it for the job
        return
    lock_path = key.parent / f".{key.name}.lock"
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise MomError(
                f"another mom command is writing the {what} {path} (it holds {lock_path}); "
                "wait for it to finish or choose another -o"
            ) from None
        try:  # the previous holder may have removed the file between our open and our lock: retry
            same = os.stat(lock_path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            _HELD[key] = fd
            break
        os.close(fd)
    clean_leftovers(key)


def unlock(path: Path) -> None:
    key = Path(os.path.abspath(path))
    fd = _HELD.pop(key, None)
    if fd is None:
        return
    try:
        os.unlink(key.parent / f".{key.name}.lock")  # still ours: we hold the lock
    except FileNotFoundError:
        pass
    os.close(fd)


def clean_leftovers(path: Path) -> None:
    """Remove what killed runs left beside `path`; put an old output back if a kill came between
    the two renames of a replacement (only where the OS has no atomic exchange)."""
    from mom_cli.console import warn

    parent = path.parent
    for old in sorted(parent.glob(f".{glob_escape(path.name)}.old-*")):
        kept = old / "x"
        if (kept.exists() or kept.is_symlink()) and not (path.exists() or path.is_symlink()):
            os.replace(kept, path)
            warn(f"restored {path} from {old.name}, left by a run that was killed while replacing it")
        _remove(old)
        warn(f"removed {old}, left by a mom run that was killed")
    for tmp in sorted(parent.glob(f".{glob_escape(path.name)}.tmp-*")):
        _remove(tmp)
        warn(f"removed {tmp}, left by a mom run that was killed")


def glob_escape(name: str) -> str:
    import glob

    return glob.escape(name)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _commit(tmp: Path, path: Path) -> None:
    """Put the finished `tmp` at `path`, replacing what is there in one step where the OS can."""
    with _signals_held():  # a signal cannot split the replacement from its bookkeeping
        if not (path.exists() or path.is_symlink()):
            os.replace(tmp, path)
        elif _exchange(tmp, path):
            _remove(tmp)  # tmp now holds the old output
        else:
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / "x")
            try:
                os.replace(tmp, path)
            except BaseException:  # put the previous output back rather than lose both
                os.replace(old / "x", path)
                old.rmdir()
                raise
            shutil.rmtree(old, ignore_errors=True)
        COMMITTED.append(path)


def check_output(path: Path, force: bool) -> None:
    """Refuse an output path that cannot be written or replaced, then take its lock."""
    path = Path(path)
    _check_replaceable(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.exists():
        raise UsageError(f"output folder {parent} does not exist; create it first")
    if not parent.is_dir():
        raise UsageError(f"output folder {parent} is not a directory; choose another -o")
    if not os.access(parent, os.W_OK):
        raise MomError(f"cannot write to {parent}: permission denied; choose a writable -o")
    held = Path(os.path.abspath(path)) in _HELD
    lock(path)  # also restores an old output a killed replacement left aside: check existence after it
    if path.exists() and not force:
        if not held:
            unlock(path)
        raise UsageError(f"output {path} already exists; pass --force to replace it or choose another -o")


def releases_locks(fn: Callable[..., T]) -> Callable[..., T]:
    """A library command that fails gives back the output locks it took (the CLI gives back all of
    them when a command ends; a program calling the library goes on living)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        before = set(_HELD)
        try:
            return fn(*args, **kwargs)
        except BaseException:
            for key in set(_HELD) - before:
                unlock(key)
            raise

    return wrapper


def release_all() -> None:
    """Drop every lock this process holds (the command is over, whatever its outcome)."""
    for key in list(_HELD):
        unlock(key)


def _check_replaceable(path: Path) -> None:
    """An output is a new name: never the current folder or one above it, which replacing would pull
    out from under the command (and everything else running there)."""
    resolved = Path(os.path.abspath(path))
    here = Path(os.path.abspath("."))
    if path.name in ("", ".", "..") or resolved == here or resolved in here.parents:
        raise UsageError(
            f"output {str(path)!r} is the current folder or one above it; name a new folder or file for -o"
        )


@contextmanager
def atomic_dir(path: Path, force: bool) -> Iterator[Path]:
    """Yield a temporary directory that becomes `path` when the block completes."""
    path = Path(path)
    check_output(path, force)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        _as_if_created(tmp, 0o777)
        yield tmp
        _commit(tmp, path)
    except BaseException:
        _discard(lambda: shutil.rmtree(tmp, ignore_errors=True))
        raise
    finally:
        unlock(path)


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
        _commit(tmp, path)
    except BaseException:
        _discard(lambda: tmp.unlink(missing_ok=True))
        raise
    finally:
        unlock(path)
