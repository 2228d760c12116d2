"""A lock over an object-store prefix, for runs on different machines: a lease object written with
conditional writes and renewed while the run lasts.

Object stores have no ``flock``. What S3 (and MinIO, and other S3-compatible stores that implement
it) does guarantee is a conditional PUT: ``If-None-Match: *`` writes only where no object is, and
``If-Match: ETAG`` only over the object as it was read, each decided atomically by the server. So:

- **take**: create the lease object (JSON: who holds it, a random token) where none is. If one is,
  it is held, unless it is stale: not renewed for ``ttl`` seconds (the store's clock, corrected by
  the offset measured when the store was checked), or written by a process of this machine that no
  longer exists (a run killed here is taken over at once). A stale lease is replaced with
  ``If-Match`` on the ETag read, so of two runs taking it over at once, one wins.
- **renew**: a thread rewrites it every ``ttl / 4`` with ``If-Match`` on our last ETag. If that
  fails because another run replaced it (we were stopped for longer than ``ttl``), the lease is
  lost: ``check`` raises, and the run stops before its next write.
- **release**: delete it at the end (a killed run leaves it; it goes stale after ``ttl``).

``check_conditional_writes`` proves once per prefix that the store honours both conditions (an
S3-compatible store that ignored them would let two runs write at once), and measures how far the
store's clock is from ours.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from ..errors import SeglabelError, UsageError
from .objects import create, delete, info, read_bytes, replace
from .problems import NOT_FOUND, StorageError
from .urls import join, redact

log = logging.getLogger("seglabel")
DEFAULT_TTL = 60.0


class LeaseHeld(UsageError):
    """Another live run holds the lease: refused before anything was written."""


class LeaseLost(SeglabelError):
    """This run's lease was taken over (it could not renew it for ``ttl`` seconds)."""


def lease_ttl() -> float:
    text = os.environ.get("SEGLABEL_LEASE_SECONDS", "").strip()
    if not text:
        return DEFAULT_TTL
    try:
        ttl = float(text)
    except ValueError:
        ttl = 0.0
    if not 1.0 <= ttl < float("inf"):
        raise UsageError(f"environment variable SEGLABEL_LEASE_SECONDS={text!r}: give a number of seconds, at least 1")
    return ttl


def machine_id() -> str:
    """This machine and PID namespace: a PID means the same process only under the same id."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return ""  # no way to tell: a lease of ours is never taken for dead by its PID
    return f"{socket.gethostname()}/{boot}/{namespace}"


def check_conditional_writes(prefix: str) -> float:
    """Refuse (``UsageError``, one line) a store under ``prefix`` that does not honour conditional
    writes; return the store's clock minus ours, in seconds (from the time of an object written)."""
    probe = join(prefix, f".seglabel-probe-{uuid.uuid4().hex}")
    before = time.time()
    try:
        if create(probe, b"1") is None:
            raise UsageError(f"{redact(prefix)}: the store refused to create a new object")
        after = time.time()
        written = info(probe)
        if create(probe, b"2") is not None or replace(probe, b"3", '"00000000000000000000000000000000"') is not None:
            raise UsageError(f"{redact(prefix)}: this store ignores conditional writes (If-None-Match, If-Match), so "
                             "seglabel cannot keep two runs from writing here at once; write to S3 or a store that "
                             "implements them, or to a local folder")
    finally:
        try:
            delete(probe)
        except StorageError:
            pass
    if written.mtime_ns is None:
        return 0.0
    return written.mtime_ns / 1e9 - (before + after) / 2


@dataclass
class Holder:
    token: str
    what: str
    host: str
    pid: int
    machine: str
    renewed_age: float | None  # seconds since the store last saw it renewed


class Lease:
    """The lease object ``url``; ``take()`` or ``LeaseHeld``, ``check()`` before each write,
    ``release()`` at the end. ``what`` says what holds it (``annotate``, ``shard 0 of 4``)."""

    def __init__(self, url: str, what: str, ttl: float | None = None, clock_offset: float = 0.0) -> None:
        self.url, self.what = url, what
        self.ttl = lease_ttl() if ttl is None else ttl
        self.offset = clock_offset  # the store's clock minus ours
        self.token = uuid.uuid4().hex
        self.etag: str | None = None
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self) -> bytes:
        return json.dumps({"seglabel_lease": 1, "token": self.token, "what": self.what, "host": socket.gethostname(),
                           "pid": os.getpid(), "machine": machine_id(), "ttl_s": self.ttl,
                           "renewed": time.time()}).encode()

    def holder(self) -> tuple[Holder, str | None] | None:
        """Who holds it now and its ETag; None if nobody does."""
        try:
            details = info(self.url)
            data = json.loads(read_bytes(self.url))
        except StorageError as e:
            if e.kind == NOT_FOUND:
                return None
            raise
        except ValueError:
            data = {}
        age = None if details.mtime_ns is None else time.time() + self.offset - details.mtime_ns / 1e9
        return Holder(str(data.get("token", "")), str(data.get("what", "?")), str(data.get("host", "?")),
                      int(data.get("pid", 0) or 0), str(data.get("machine", "")), age), details.etag

    def _stale(self, holder: Holder) -> str | None:
        """Why ``holder``'s lease may be taken over, or None while it may be alive."""
        if holder.renewed_age is not None and holder.renewed_age > self.ttl:
            return f"not renewed for {holder.renewed_age:.0f} s"
        here = machine_id()
        if here and holder.machine == here and holder.pid != os.getpid():
            try:
                os.kill(holder.pid, 0)
            except ProcessLookupError:
                return f"its process {holder.pid} on this machine has ended"
            except PermissionError:
                return None
        return None

    def take(self) -> None:
        """Hold the lease, or raise ``LeaseHeld`` naming who does."""
        for _ in range(3):  # the lease may change hands while we look at it
            etag = create(self.url, self._body())
            if etag is not None:
                self.etag = etag
                return self._start()
            found = self.holder()
            if found is None:
                continue
            holder, etag = found
            if holder.token == self.token:  # a retried create whose first reply was lost
                self.etag = etag
                return self._start()
            why = self._stale(holder)
            if why is None:
                age = "" if holder.renewed_age is None else f", renewed {max(holder.renewed_age, 0):.0f} s ago"
                raise LeaseHeld(f"{redact(self.url)}: another seglabel run is writing here ({holder.what}, "
                                f"{holder.host} pid {holder.pid}{age}); a run that was killed lets go after "
                                f"{self.ttl:.0f} s")
            taken = replace(self.url, self._body(), etag) if etag else None
            if taken is not None:
                log.info("%s: took over a stale lease (%s, %s pid %d: %s)", redact(self.url), holder.what,
                         holder.host, holder.pid, why)
                self.etag = taken
                return self._start()
        raise LeaseHeld(f"{redact(self.url)}: the lease kept changing hands; another run is starting here")

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._renew_loop, name="seglabel-lease", daemon=True)
        self._thread.start()

    def renew(self) -> bool:
        """Rewrite the lease over our last version; False (and ``lost`` set) if another run took it."""
        if self.lost or self.etag is None:
            return False
        etag = replace(self.url, self._body(), self.etag)
        if etag is not None:
            self.etag = etag
            return True
        self.lost = f"{redact(self.url)}: another run took over this lease (this one could not renew it for {self.ttl:.0f} s)"
        return False

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                if not self.renew():
                    return
            except SeglabelError as e:  # transient trouble: try again at the next beat, while the lease lasts
                log.debug("%s: could not renew the lease: %s", redact(self.url), e)

    def check(self) -> None:
        """Raise ``LeaseLost`` if the lease is no longer ours (call before each write)."""
        if self.lost:
            raise LeaseLost(self.lost)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.lost or self.etag is None:
            return
        found = self.holder()
        if found is not None and found[0].token == self.token:
            delete(self.url)
        self.etag = None

    def __enter__(self) -> "Lease":
        self.take()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()
