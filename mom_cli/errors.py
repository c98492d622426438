"""The two kinds of error every command can end with, and their exit codes."""

from __future__ import annotations


class MomError(Exception):
    """A failure: the input was fine but the work could not be done (exit 1)."""

    exit_code = 1


class UsageError(MomError):
    """Bad input from the user: a wrong option, path or plan (exit 2)."""

    exit_code = 2


def one_line(error: BaseException | str, limit: int = 300) -> str:
    """A message as one bounded line: library messages span lines and may quote huge inputs."""
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
