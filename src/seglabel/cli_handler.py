"""The one error handler of every ``seglabel`` command: an error -> one line and its exit code.

``guarded`` wraps each command: library errors print ``seglabel: error: <message>`` and exit
with their ``exit_code`` (``errors.py``), Ctrl-C exits 130 and SIGTERM 143 (after the command
finished what was in flight), anything else prints its type and message on one line and exits 1.
``usage_line`` does the same for what the argument parser refuses (cli.py's ``main``).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import typer

from . import exitcodes
from .errors import SeglabelError, interrupt_exit_code, one_line
from .interrupts import terminate_like_ctrl_c

# Help panels: what a user looks for first comes first.
INPUTS, MODEL, PROTOCOL, OUTPUTS, RUN = "Inputs", "Model", "Protocol", "Outputs", "Run"
TEACHER, STUDENT, TRAINING = "Teacher", "Student", "Training"


def option(default: Any, *names: str, help: str, panel: str | None = None, metavar: str | None = None,
           **limits: Any) -> Any:
    return typer.Option(default, *names, help=help, rich_help_panel=panel, metavar=metavar, **limits)


def flag(*names: str, help: str, panel: str | None = None, default: bool | None = False) -> Any:
    """An on/off switch (or an ``--x/--no-x`` pair): shown without a value type, and refused with
    one (``--overlay true``)."""
    return typer.Option(default, *names, help=help, rich_help_panel=panel, metavar="", show_default=False)


def say(message: str, level: str = "error") -> None:
    typer.echo(f"seglabel: {level}: {one_line(message)}", err=True)


def exit_code_of(e: BaseException) -> int:
    """Report ``e`` on one line; returns the exit code it means."""
    if isinstance(e, KeyboardInterrupt):
        code = interrupt_exit_code(e)
        say(("terminated (SIGTERM)" if code == exitcodes.TERMINATED else "interrupted")
            + "; run the same command to resume")
        return code
    if isinstance(e, SeglabelError):
        say(str(e))
        return e.exit_code
    if isinstance(e, (ValueError, FileNotFoundError)):
        say(str(e))  # checks of modules that raise the built-in types: refusals before any work
        return exitcodes.USAGE
    say(f"{type(e).__name__}: {e}")
    return exitcodes.ERROR


def guarded(command: Callable[..., int | None]) -> Callable[..., None]:
    """A command whose errors end as one line and the documented exit code (its return value is
    the exit code; None is 0). SIGTERM is handled like Ctrl-C while it runs."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> None:
        terminate_like_ctrl_c()
        try:
            code = command(*args, **kwargs)
        except (typer.Exit, SystemExit):
            raise
        except BaseException as e:  # noqa: BLE001 - the last line of defence: one line
            code = exit_code_of(e)
        raise typer.Exit(code or exitcodes.OK)

    return run


def usage_line(e: Exception, args: Sequence[str]) -> str:
    """A parser error (bad option value, unknown option, missing argument) as one line, naming
    the option and the value given, e.g. ``--iters 0: input should be ...``."""
    param = getattr(e, "param", None)
    opts = [o for o in getattr(param, "opts", None) or [] if o.startswith("-")]
    ctx = getattr(e, "ctx", None)
    hint = f" (see {ctx.command_path} --help)" if ctx is not None else ""
    if opts and type(e).__name__ == "MissingParameter":
        return f"missing {max(opts, key=len)}{hint}"
    if opts:
        name, value = max(opts, key=len), _given(args, opts)
        message = _sentence(getattr(e, "message", None) or str(e))
        return f"{name} {value}: {message}" if value is not None else f"{name}: {message}"
    return _sentence(e.format_message() if hasattr(e, "format_message") else str(e)) + hint


def _sentence(text: str) -> str:
    """A message as a clause of our line: lower-case start, no final full stop."""
    text = " ".join(text.split())
    return text[:1].lower() + text[1:].rstrip(".")


def _given(args: Sequence[str], opts: Sequence[str]) -> str | None:
    """The value given to an option on the command line (the last one wins, as in click)."""
    value = None
    for i, a in enumerate(args):
        if a in opts and i + 1 < len(args):
            value = args[i + 1]
        for o in opts:
            if o.startswith("--") and a.startswith(o + "="):
                value = a[len(o) + 1:]
    return value

