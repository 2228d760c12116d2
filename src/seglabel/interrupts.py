"""SIGTERM handled like Ctrl-C, and signals held back while a pipeline reaches a safe point.

``terminate_like_ctrl_c()`` (the command line installs it) makes SIGTERM raise ``Terminated``, a
``KeyboardInterrupt``: annotate then finishes the images in flight and writes its records,
distill saves ``last.pt``, and the command exits 143. Within ``held()`` a SIGINT or SIGTERM only
sets a flag that the pipeline checks between images (``raise_if_stopped``), so the stop never
lands between writing a record and counting it; a second Ctrl-C stops at once.
"""
from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager
from typing import Iterator

from .errors import Terminated


def _raise_terminated(signum, frame) -> None:
    if os.getpid() == _installed_by[0]:
        raise Terminated()
    # A forked child (a data loader process) inherits this handler: it ignores the signal and is
    # shut down by its parent, which is stopping in order.


_installed_by = [0]


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def terminate_like_ctrl_c() -> None:
    """SIGTERM raises ``Terminated`` in the main thread (where the default would kill the process)."""
    if _main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        _installed_by[0] = os.getpid()
        signal.signal(signal.SIGTERM, _raise_terminated)


def leave_signals_to_parent(worker_id: int | None = None) -> None:
    """For a data loader process (a ``worker_init_fn``): Ctrl-C sent to the whole process group
    (a terminal) is for the parent, which finishes in order and then shuts its loaders down; on
    SIGTERM (Slurm signals every process of a job) the loader ends quietly, with status 0.
    PyTorch's own SIGTERM handler would end it "killed by signal", and its parent would fail
    with that error, at any point of its own orderly stop, instead of stopping."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_quietly)


def _exit_quietly(signum, frame) -> None:
    os._exit(0)


class _Stop:
    def __init__(self) -> None:
        self.pending: BaseException | None = None

    def on_signal(self, signum, frame) -> None:
        if self.pending is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt()  # Ctrl-C twice: stop now
        if self.pending is None:
            self.pending = KeyboardInterrupt() if signum == signal.SIGINT else Terminated()

    def raise_if_stopped(self) -> None:
        if self.pending is not None:
            raise self.pending


class _NeverStopped:
    def raise_if_stopped(self) -> None:
        pass


@contextmanager
def held() -> Iterator[_Stop | _NeverStopped]:
    """SIGINT and SIGTERM (if SIGTERM is handled like Ctrl-C) are held until ``raise_if_stopped``;
    one that arrived unchecked is raised on leaving. Outside the main thread (e.g. a Ray actor's
    worker thread) signals cannot be handled, and nothing changes."""
    if not _main_thread():
        yield _NeverStopped()
        return
    stop = _Stop()
    # Only signals that would raise: an ignored SIGINT (a job started with nohup) stays ignored.
    signums = [s for s, raising in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, _raise_terminated))
               if signal.getsignal(s) is raising]
    previous = {s: signal.signal(s, stop.on_signal) for s in signums}
    try:
        yield stop
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    stop.raise_if_stopped()
