"""The one error handler of every ``seglabel`` command: an error -> one line and its exit code.

``guarded`` wraps each command: seglabel's errors print ``seglabel: error: <message>`` and exit
with their ``exit_code`` (``errors.py``), Ctrl-C exits 130 and SIGTERM 143 (after the command
finished what was in flight); anything else is unexpected: its type and message on one line with
a hint, exit 1. ``SEGLABEL_DEBUG=1`` prints the traceback of any error before its line.
``usage_line`` does the same for what the argument parser refuses (cli.py's ``main``).
"""
from __future__ import annotations

import functools
import logging
import os
import sys
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import typer

from . import exitcodes
from .errors import SeglabelError, interrupt_exit_code, one_line
from .interrupts import terminate_like_ctrl_c

# Help panels: what a user looks for first comes first.
INPUTS, MODEL, PROTOCOL, OUTPUTS, RUN = "Inputs", "Model", "Protocol", "Outputs", "Run"
TEACHER, STUDENT, TRAINING = "Teacher", "Student", "Training"


def option(default: Any, *names: str, help: str,  # noqa: A002 - typer's name for it
           panel: str | None = None, metavar: str | None = None, **limits: Any) -> Any:
    return typer.Option(default, *names, help=help, rich_help_panel=panel, metavar=metavar, **limits)


def flag(*names: str, help: str,  # noqa: A002 - typer's name for it
         panel: str | None = None, default: bool | None = False) -> Any:
    """An on/off switch (or an ``--x/--no-x`` pair): shown without a value type, and refused with
    one (``--overlay true``)."""
    return typer.Option(default, *names, help=help, rich_help_panel=panel, metavar="", show_default=False)


def say(message: str, level: str = "error") -> None:
    typer.echo(f"seglabel: {level}: {one_line(message)}", err=True)


def exit_code_of(e: BaseException) -> int:
    """Report ``e`` on one line; returns the exit code it means. Only seglabel's own errors have
    exit codes of their own; anything else is unexpected (a bug, or a failure seglabel did not
    foresee): exit 1, with a hint. ``SEGLABEL_DEBUG=1`` prints the traceback first, for any error."""
    if isinstance(e, KeyboardInterrupt):
        code = interrupt_exit_code(e)
        say(("terminated (SIGTERM)" if code == exitcodes.TERMINATED else "interrupted")
            + "; run the same command to resume")
        return code
    debug = _debugging()
    if debug:
        traceback.print_exception(type(e), e, e.__traceback__, file=sys.stderr)
    if isinstance(e, SeglabelError):
        say(str(e))
        return e.exit_code
    hint = "" if debug else f" (unexpected; {DEBUG_VARIABLE}=1 shows the traceback)"
    say(f"{type(e).__name__}: {e}{hint}")
    return exitcodes.ERROR


DEBUG_VARIABLE = "SEGLABEL_DEBUG"


def _debugging() -> bool:
    return os.environ.get(DEBUG_VARIABLE, "").strip().lower() not in ("", "0", "no", "off", "false")


def guarded(command: Callable[..., int | None]) -> Callable[..., None]:
    """A command whose errors end as one line and the documented exit code (its return value is
    the exit code; None is 0). SIGTERM is handled like Ctrl-C while it runs, and the library's
    messages are printed (``printed_messages``; a ``quiet`` flag of the command hides INFO)."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> None:
        terminate_like_ctrl_c()
        with printed_messages(quiet=bool(kwargs.get("quiet"))):
            try:
                code = command(*args, **kwargs)
            except (typer.Exit, SystemExit):
                raise
            except BaseException as e:  # noqa: BLE001 - the last line of defence: one line
                code = exit_code_of(e)
        raise typer.Exit(code or exitcodes.OK)

    return run


class _Lines(logging.Handler):
    """The library's messages as the command line shows them: warnings and errors as
    ``seglabel: warning: <message>``, information as the message alone; one line each."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = one_line(record.getMessage())
            level = record.levelname.lower()
            typer.echo(text if record.levelno < logging.WARNING else f"seglabel: {level}: {text}", err=True)
        except Exception:  # noqa: BLE001 - logging's own rule: a message that cannot be shown is reported there
            self.handleError(record)


@contextmanager
def printed_messages(quiet: bool = False) -> Iterator[None]:
    """While a command runs, what the library logs (``logging.getLogger("seglabel")``) is printed
    on stderr, once (the logger does not pass it on to the root's handlers): warnings always,
    information unless ``quiet``. The logger is left as it was found."""
    logger = logging.getLogger("seglabel")
    saved = logger.level, logger.propagate
    handler = _Lines()
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


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


def local_folder(flag_name: str, text: str, what: str) -> Path:
    """A flag that takes a local path only: its text as a ``Path`` (a ``file://`` URL as its path);
    any other URL refused in one line, before typer's ``Path`` could make ``s3://b/x`` a local
    ``s3:/b/x`` folder."""
    from . import storage
    from .errors import UsageError

    if storage.is_remote(text):
        raise UsageError(f"{flag_name} {storage.redact(text)}: {what} must be a local folder; copy it down first "
                         "(e.g. aws s3 sync URL DIR)")
    return Path(storage.local_path(text) or text)

