"""The `mom` command line as a list of words: options that may stand alone, and running a command.

A leaf module: the CLI (`app`) and the recipe runner (`recipes`) both use it, and it imports
neither, so the runner receives the command group instead of importing the CLI.
"""

from __future__ import annotations

import re
from dataclasses import fields
from typing import Any, TypeVar

from mom_cli.errors import UsageError

T = TypeVar("T")

# Options that may stand alone: `--keep-ffn` means all of them ...
OPTIONAL_VALUE = {"--keep-mha": "all", "--keep-ffn": "all"}
# ... and `--distill` the source model recorded in the provenance; a value is anything but an option.
OPTIONAL_REF = {"--distill": "source"}


def optional_values(args: list[str]) -> list[str]:
    """`--keep-ffn` may stand alone: give it its implicit value when no N or P% follows it."""
    out: list[str] = []
    for i, a in enumerate(args):
        out.append(a)
        nxt = args[i + 1] if i + 1 < len(args) else None
        if a in OPTIONAL_VALUE and (nxt is None or not re.fullmatch(r"\d+(\.\d+)?%?|all", nxt)):
            out.append(OPTIONAL_VALUE[a])
        if a in OPTIONAL_REF and (nxt is None or nxt.startswith("-")):
            out.append(OPTIONAL_REF[a])
    return out


def invoke(command: Any, args: list[str]) -> int:
    """Run `mom ARGS` with the click command group `command` in this process; returns the exit code.

    One mapping of click's outcomes for every caller: an interrupt raises KeyboardInterrupt, a
    click usage error becomes `UsageError` (naming the subcommand's --help), a `MomError` from the
    command propagates. A bare `mom` or `mom GROUP` raises click's NoArgsIsHelpError: the caller
    prints its help.
    """
    from typer import _click as click  # typer vendors its own click
    from typer import exceptions as typer_exc

    try:
        # typer turns KeyboardInterrupt into exit code 130 and returns it (standalone_mode=False)
        code = command.main(args=optional_values(args), prog_name="mom", standalone_mode=False)
    except typer_exc.Exit as e:
        return e.exit_code
    except typer_exc.Abort:
        raise KeyboardInterrupt from None
    except click.exceptions.NoArgsIsHelpError:
        raise
    except click.exceptions.ClickException as e:
        ctx = getattr(e, "ctx", None)  # command_path: `mom plot routing`, not `mom routing`
        raise UsageError(f"{e.format_message()} (see {ctx.command_path if ctx else 'mom'} --help)") from e
    if code == 130:
        raise KeyboardInterrupt
    return code if isinstance(code, int) else 0


def options_from_context(cls: type[T], **derived: Any) -> T:
    """The library's options dataclass `cls` from the running command's parameters: each field takes
    the command-line value of the parameter of the same name, or its entry in `derived` (a value
    the command computes, such as `query_bn=not no_query_bn`); other fields keep their defaults."""
    from typer._click.globals import get_current_context  # typer vendors its own click

    params = get_current_context().params
    names = {f.name for f in fields(cls)}
    unknown = set(derived) - names
    if unknown:
        raise TypeError(f"{cls.__name__} has no field {', '.join(sorted(unknown))}")
    return cls(**{k: v for k, v in params.items() if k in names and k not in derived}, **derived)
