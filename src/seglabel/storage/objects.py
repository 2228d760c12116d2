"""Reading, listing and writing objects by URL, each operation retried on transient errors.

The retry rule (documented in docs/runs.md): an operation that fails in a way that may pass (a
dropped or refused connection, a timeout, a 5xx or a "slow down" from the server) is tried again,
up to ``SEGLABEL_STORAGE_TRIES`` times in all (default 4), waiting ``SEGLABEL_STORAGE_BACKOFF``
seconds (default 0.5) before the second try and twice as long before each next one (at most 8 s).
The client library's own retries happen inside each try (botocore: ``AWS_MAX_ATTEMPTS``,
``AWS_RETRY_MODE``). Anything else (not found, access denied, no credentials) fails at once. A
failure is a ``StorageError``: the URL (redacted) and one line.

Writes are whole objects (one PUT, which object stores apply atomically: a reader sees the old
object or the new one, never a part). ``create`` writes only where nothing is (S3's
``If-None-Match: *``), ``replace`` only over the object as it was read (``If-Match`` on its ETag):
the two conditional writes a guard over concurrent runs needs (``lease.py``).
"""
from __future__ import annotations

import logging
import os
import random
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, TypeVar

from ..errors import UsageError
from .filesystems import filesystem, protocol
from .problems import CHANGED, EXISTS, NOT_FOUND, TRANSIENT, StorageError, classify, storage_error
from .urls import join, redact

log = logging.getLogger("seglabel")
T = TypeVar("T")
DEFAULT_TRIES, DEFAULT_BACKOFF, MAX_WAIT = 4, 0.5, 8.0
# stores whose conditional writes are atomic on the server (S3 and S3-compatible stores that
# implement If-None-Match / If-Match; ``check_conditional_writes`` proves it once per prefix)
CONDITIONAL = frozenset({"s3", "s3a"})


def _env_number(name: str, default: float, least: float, kind: type) -> float:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not value >= least or value != value or value == float("inf"):
        raise UsageError(f"environment variable {name}={text!r}: give a {'whole ' if kind is int else ''}number "
                         f"of at least {least}")
    return value


def retry_policy() -> tuple[int, float]:
    """(tries, first wait in seconds) from the environment, else the defaults."""
    return (int(_env_number("SEGLABEL_STORAGE_TRIES", DEFAULT_TRIES, 1, int)),
            _env_number("SEGLABEL_STORAGE_BACKOFF", DEFAULT_BACKOFF, 0.0, float))


def retried(url: str, what: str, op: Callable[[], T]) -> T:
    """``op()``, tried again on transient errors as the module says; ``StorageError`` otherwise."""
    tries, wait = retry_policy()
    for attempt in range(1, tries + 1):
        try:
            return op()
        except StorageError:
            raise
        except Exception as e:  # every filesystem raises its own classes; classify sorts them (and re-raises)
            kind, reason = classify(e, url)
            if kind != TRANSIENT or attempt == tries:
                raise storage_error(e, url, attempt) from e
            pause = min(wait * 2 ** (attempt - 1), MAX_WAIT) * (0.75 + random.random() / 2)  # jitter: shards apart
            log.debug("%s %s: %s; try %d of %d in %.2f s", what, redact(url), reason, attempt + 1, tries, pause)
            time.sleep(pause)
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class Listed:
    url: str  # the object's full URL
    rel: str  # its path relative to the listed prefix (posix)
    size: int
    mtime_ns: int | None  # the store's modification time, where it gives one
    etag: str | None  # the store's version tag (S3's ETag), where it gives one


def _mtime_ns(info: dict[str, Any]) -> int | None:
    value = info.get("LastModified", info.get("mtime", info.get("updated", info.get("last_modified"))))
    if value is None:
        return None
    if hasattr(value, "timestamp"):
        return int(value.timestamp() * 1_000_000_000)
    try:
        return int(float(value) * 1_000_000_000)
    except (TypeError, ValueError):
        return None


def _etag(info: dict[str, Any]) -> str | None:
    value = info.get("ETag", info.get("etag"))
    return str(value) if value else None


def list_files(url: str, suffixes: Iterable[str] | None = None) -> list[Listed]:
    """Every object under the prefix ``url`` (recursively) whose name ends in one of ``suffixes``
    (compared in lower case; all objects without), sorted by relative path. A prefix with nothing
    under it lists nothing; a missing bucket or a denied listing is a ``StorageError``."""
    fs, base = filesystem(url)
    ends = tuple(s.lower() for s in suffixes) if suffixes is not None else None
    fs.invalidate_cache(base)
    found = retried(url, "list", lambda: fs.find(base, detail=True))
    prefix, out = base.rstrip("/") + "/", []
    for path, details in found.items():
        if details.get("type", "file") != "file":
            continue
        if path.startswith(prefix):
            rel, full = path[len(prefix):], join(url, path[len(prefix):])
        else:  # ``url`` names one object
            rel, full = os.path.basename(path), url
        if ends is not None and not rel.lower().endswith(ends):
            continue
        out.append(Listed(full, rel, int(details.get("size") or 0), _mtime_ns(details), _etag(details)))
    return sorted(out, key=lambda item: item.rel)


def first_under(url: str, limit: int = 8) -> list[str]:
    """Up to ``limit`` object names (relative to the prefix ``url``) in key order: a look whether
    a prefix holds anything, one request on S3 however much it holds."""
    fs, base = filesystem(url)
    prefix = base.rstrip("/") + "/"
    if protocol(fs) in ("s3", "s3a"):
        bucket, _, key = prefix.partition("/")
        reply = retried(url, "list", lambda: fs.call_s3("list_objects_v2", Bucket=bucket, Prefix=key, MaxKeys=limit))
        return [item["Key"][len(key):] for item in reply.get("Contents", [])]
    return [item.rel for item in list_files(url)][:limit]


def info(url: str) -> Listed:
    """Size, time and tag of the object ``url``; ``StorageError`` (kind ``not found``...) otherwise."""
    fs, path = filesystem(url)
    fs.invalidate_cache(path)  # another process may have written it since this one listed
    details = retried(url, "stat", lambda: fs.info(path))
    if details.get("type", "file") != "file":
        raise StorageError(url, "a folder (a prefix), not an object", NOT_FOUND)
    return Listed(url, os.path.basename(path), int(details.get("size") or 0), _mtime_ns(details), _etag(details))


def exists(url: str) -> bool:
    try:
        info(url)
        return True
    except StorageError as e:
        if e.kind == NOT_FOUND:
            return False
        raise


def read_bytes(url: str, start: int | None = None, end: int | None = None) -> bytes:
    """The object's bytes (or those from ``start`` to ``end``, a range read)."""
    fs, path = filesystem(url)
    return retried(url, "read", lambda: fs.cat_file(path, start=start, end=end))


def write_bytes(url: str, data: bytes) -> None:
    """The object ``url`` written whole (one PUT: readers see the old object or this one)."""
    fs, path = filesystem(url)
    retried(url, "write", lambda: fs.pipe_file(path, data))


def create(url: str, data: bytes) -> str | None:
    """Write ``url`` only if no object is there (atomic on the server): the new object's ETag, or
    None if one is there. Refused (``UsageError``) on a store whose conditional writes seglabel
    cannot rely on. (A try whose reply was lost may find the object it wrote itself: callers that
    must know write something unique and read it back.)"""
    fs, path = filesystem(url)
    _conditional(fs, url)
    try:
        return _etag_of(retried(url, "create", lambda: fs.pipe_file(path, data, mode="create")), url)
    except StorageError as e:
        if e.kind in (EXISTS, CHANGED):  # S3 answers 412 PreconditionFailed: something is there
            return None
        raise


def replace(url: str, data: bytes, etag: str) -> str | None:
    """Write ``url`` only if it is still the object whose ETag is ``etag``: the new ETag, or None if
    it changed or went."""
    fs, path = filesystem(url)
    _conditional(fs, url)
    try:
        return _etag_of(retried(url, "replace", lambda: fs.pipe_file(path, data, IfMatch=etag)), url)
    except StorageError as e:
        if e.kind in (CHANGED, NOT_FOUND):
            return None
        raise


def _etag_of(response: Any, url: str) -> str:
    """The ETag a PUT answered with (s3fs returns S3's reply), else the object's as it is now."""
    if isinstance(response, dict) and response.get("ETag"):
        return str(response["ETag"])
    return info(url).etag or "?"


def delete(url: str, missing_ok: bool = True) -> None:
    fs, path = filesystem(url)
    try:
        retried(url, "delete", lambda: fs.rm_file(path))
    except StorageError as e:
        if not (missing_ok and e.kind == NOT_FOUND):
            raise


def _conditional(fs: Any, url: str) -> None:
    if protocol(fs) not in CONDITIONAL:
        raise UsageError(f"{redact(url)}: seglabel relies on conditional writes (create only if absent) to keep "
                         f"concurrent runs apart, and knows them on S3 only, not on {protocol(fs)}:// (write into "
                         "a local folder and copy it up, or use an S3-compatible endpoint)")
