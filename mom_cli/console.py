"""stderr for people, stdout for results. Logs, warnings and progress bars all go to stderr."""
from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

stderr = Console(stderr=True, highlight=False)
QUIET = False


def log(msg: str) -> None:
    if not QUIET:
        stderr.print(msg)


def warn(msg: str) -> None:
    stderr.print(f"[yellow]warning:[/yellow] {msg}")


def progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TimeRemainingColumn(), console=stderr, disable=QUIET, transient=True,
    )
