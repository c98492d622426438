"""stderr for people, stdout for results. Logs, warnings and progress bars all go to stderr."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

stderr = Console(stderr=True, highlight=False)
QUIET = False


def log(msg: str) -> None:
    # soft_wrap: a log line is one line whatever the terminal's width (paths stay greppable);
    # markup off: a path or value with brackets is text, not rich markup.
    if not QUIET:
        stderr.print(msg, soft_wrap=True, markup=False)


def warn(msg: str) -> None:
    from rich.markup import escape

    stderr.print(f"[yellow]warning:[/yellow] {escape(msg)}", soft_wrap=True)


def progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeRemainingColumn(),
        console=stderr,
        disable=QUIET,
        transient=True,
    )


def status(msg: str):
    """A spinner on stderr for a step with no count to show (loading a model); silent with --quiet."""
    from contextlib import nullcontext

    return nullcontext() if QUIET or not stderr.is_terminal else stderr.status(msg, spinner="dots")


def hush():
    """--quiet for other libraries' own progress bars (tqdm in lm-eval and transformers' GGUF
    reader), which have no switch: what they write to sys.stderr is dropped. Errors still raise."""
    import contextlib
    import io

    return contextlib.redirect_stderr(io.StringIO()) if QUIET else contextlib.nullcontext()
