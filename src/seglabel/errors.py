"""The one error hierarchy of seglabel (ground floor: imports nothing of seglabel but exit codes).

Every error the library means for the user is a ``SeglabelError`` whose message is one line and
whose ``exit_code`` is the documented one; the command line prints ``seglabel: error: <message>``
and exits with it. ``UsageError`` (exit 2): the command was refused and changed nothing on disk.
``Terminated`` is how SIGTERM arrives: a ``KeyboardInterrupt``, so every path that finishes the
work in flight on Ctrl-C does the same on SIGTERM.
"""
from __future__ import annotations

import unicodedata

from . import exitcodes


class SeglabelError(Exception):
    """An error with a one-line message for the user; exit 1 unless a subclass says otherwise."""

    exit_code = exitcodes.ERROR


class UsageError(SeglabelError, ValueError):
    """Bad flags, label set, model spec, weights, inputs or output folder: nothing was done."""

    exit_code = exitcodes.USAGE


class Terminated(KeyboardInterrupt):
    """SIGTERM (Slurm preemption, ``docker stop``, Kubernetes, systemd), handled like Ctrl-C."""

    exit_code = exitcodes.TERMINATED


def interrupt_exit_code(e: BaseException) -> int:
    return getattr(e, "exit_code", exitcodes.INTERRUPTED)


def one_line(text: str) -> str:
    """``text`` safe to print as one line: line breaks and other control characters escaped
    (``\\n``, ``\\x1b``...), and bytes that are not UTF-8 (lone surrogates) as ``\\xNN``."""
    if text.isprintable():
        return text
    shown = "".join(c.encode("unicode_escape").decode("ascii") if unicodedata.category(c) in _BREAKING else c
                    for c in text)
    try:
        return shown.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that is no escaped byte
        return shown.encode("utf-8", "backslashreplace").decode("utf-8")


_BREAKING = ("Cc", "Zl", "Zp")  # control characters (newline, tab, escape...), line and paragraph separators
