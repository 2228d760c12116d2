"""Where a run's outputs live: a local folder or a prefix of an object store (``--out
s3://bucket/labels``), behind one interface, so annotate, merge and every reader of a run work on
either the same way.

Paths are posix paths relative to the output (``masks/x/a.png``). Each kind keeps the guarantees it
can (docs/runs.md says which):

- ``FolderOut``: every file written atomically (``atomic_path``: a temporary beside it, then one
  rename); a file's version is its mtime (ns); runs lock with ``flock`` (``lock``).
- ``BucketOut``: every object written whole (one PUT: a reader sees the old object or the new one,
  never a part); an object's version is its ETag; no temporaries; runs on any machine keep apart
  through leases written with conditional writes (``storage.Lease``), the store being checked once
  to honour them. Every write first checks that this run's lease is still its own.
"""
from __future__ import annotations

import fcntl
import io
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

from . import storage
from .errors import UsageError
from .layout import COCO_FILE, MASKS, OUTPUT_FOLDERS, RECORDS, RUN_FILE, RUNS, foreign_outputs, is_run_folder
from .storage.problems import NOT_FOUND, StorageError
from .writers import OutputError, atomic_path, to_json, write_bytes

LOCK_FILE = ".lock"
HEAD_READERS = 16  # requests in flight when a bucket's records are read (plans, settings checks)


class OutputBusy(UsageError):
    """Another run writes here (``--out`` is busy): refused before anything was written."""


@dataclass(frozen=True)
class Stat:
    size: int
    version: int | str  # mtime_ns in a folder, the ETag in a bucket
    mtime_ns: int | None = field(default=None, compare=False)  # when it was written (a bucket: to the second)


class Out:
    """The interface; ``open_out`` gives the right kind for ``--out``."""

    version_key = "mtime_ns"  # what a record names the version of its mask by
    local = True

    def shown(self, rel: str = "") -> str:  # how messages name the output (or one file of it)
        raise NotImplementedError

    def write_bytes(self, rel: str, data: bytes) -> Stat:
        raise NotImplementedError

    def write_json(self, rel: str, obj: Any, indent: int | None = 2) -> Stat:
        # backslashreplace: a file name that is not UTF-8 (surrogate-escaped) stays readable JSON
        return self.write_bytes(rel, (to_json(obj, indent=indent) + "\n").encode("utf-8", "backslashreplace"))

    @contextmanager
    def write_text(self, rel: str) -> Iterator[io.TextIOBase]:
        """A text file to stream into (coco.json), written whole when the block ends without error."""
        raise NotImplementedError
        yield  # pragma: no cover

    def read_bytes(self, rel: str, start: int | None = None, end: int | None = None) -> bytes:
        """The file's bytes (``FileNotFoundError`` if it is not there, ``OSError`` otherwise)."""
        raise NotImplementedError

    def stat(self, rel: str) -> Stat | None:
        raise NotImplementedError

    def listing(self, sub: str) -> dict[str, Stat]:
        """Every file under ``sub`` (recursively; names starting with a dot left out): rel -> Stat."""
        raise NotImplementedError

    def delete(self, rel: str) -> None:
        raise NotImplementedError

    @contextmanager
    def lock(self, part: str | None) -> Iterator[None]:
        """Hold the output for a whole run (``part`` None) or for one part of a job."""
        raise NotImplementedError
        yield  # pragma: no cover

    def holds(self, sub: str) -> bool:
        """Whether ``sub`` (a file, or a folder holding a file whose name does not start with a dot) is there."""
        raise NotImplementedError

    def read_heads(self, rels: list[str], size: int) -> Iterator[tuple[str, bytes | None]]:
        """The first ``size`` bytes of each of ``rels`` (None where it cannot be read), in order."""
        for rel in rels:
            try:
                yield rel, self.read_bytes(rel, 0, size)
            except OSError:
                yield rel, None

    def is_run_folder(self) -> bool:
        """``layout.is_run_folder``: a run record naming ``seglabel_version``, or a per-image
        record starting with ``settings_id``."""
        candidates = [(RUN_FILE, b'"seglabel_version"')]
        candidates += [(rel, b'"seglabel_version"') for rel in sorted(self.listing(RUNS))
                       if rel.endswith(".json") and rel.count("/") == 1][:4]
        candidates += [(rel, b'"settings_id"') for rel in _first(self.listing(RECORDS))]
        for rel, head in self.read_heads([rel for rel, _ in candidates], 4096):
            if head is not None and dict(candidates)[rel] in head:
                return True
        return False

    def foreign_outputs(self) -> list[str]:
        """``layout.foreign_outputs``: seglabel's output names holding something here although
        seglabel did not write it."""
        if self.is_run_folder():
            return []
        return [name for name in OUTPUT_FOLDERS[:5] + (COCO_FILE, RUN_FILE) if self.holds(name)]


def _parts_lock(part: str) -> str:
    return f"{RUNS}/.{part}.lock"


class FolderOut(Out):
    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    def path(self, rel: str = "") -> Path:
        return self.folder / rel if rel else self.folder

    def shown(self, rel: str = "") -> str:
        return str(self.path(rel))

    def write_bytes(self, rel: str, data: bytes) -> Stat:
        path = self.path(rel)
        write_bytes(path, data)
        st = os.stat(path)
        return Stat(st.st_size, st.st_mtime_ns, st.st_mtime_ns)

    @contextmanager
    def write_text(self, rel: str) -> Iterator[io.TextIOBase]:
        with atomic_path(self.path(rel)) as tmp, open(tmp, "w", encoding="utf-8", errors="backslashreplace") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())

    def read_bytes(self, rel: str, start: int | None = None, end: int | None = None) -> bytes:
        with open(self.path(rel), "rb") as f:
            if start:
                f.seek(start)
            return f.read() if end is None else f.read(end - (start or 0))

    def stat(self, rel: str) -> Stat | None:
        try:
            st = os.stat(self.path(rel))
        except OSError:
            return None
        return Stat(st.st_size, st.st_mtime_ns, st.st_mtime_ns)

    def listing(self, sub: str) -> dict[str, Stat]:
        found, top = {}, self.path(sub)
        for folder, dirs, files in os.walk(top):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            for name in files:
                if name.startswith("."):
                    continue
                path = os.path.join(folder, name)
                try:
                    st = os.stat(path)
                except OSError:
                    continue
                found[PurePosixPath(os.path.relpath(path, self.folder)).as_posix()] = Stat(st.st_size, st.st_mtime_ns,
                                                                                     st.st_mtime_ns)
        return found

    def delete(self, rel: str) -> None:
        try:
            os.unlink(self.path(rel))
        except FileNotFoundError:
            pass

    def holds(self, sub: str) -> bool:
        path = self.path(sub)
        if not os.path.isdir(path):
            return os.path.lexists(path)
        return any(not name.startswith(".") for _, _, files in os.walk(path) for name in files)

    def is_run_folder(self) -> bool:
        return is_run_folder(self.folder)

    def foreign_outputs(self) -> list[str]:
        return foreign_outputs(self.folder)

    @contextmanager
    def lock(self, part: str | None) -> Iterator[None]:
        """``flock``: a whole run holds ``.lock`` exclusively; a part holds it shared and its own
        ``runs/.<part>.lock`` exclusively, so shards run side by side but never twice, and never
        beside a whole run."""
        self.folder.mkdir(parents=True, exist_ok=True)
        held = []
        try:
            held.append(_flock(self.path(LOCK_FILE), exclusive=part is None, what=str(self.folder)))
            if part is not None:
                (self.folder / RUNS).mkdir(exist_ok=True)
                held.append(_flock(self.path(_parts_lock(part)), exclusive=True, what=f"{self.folder} ({part})"))
            yield
        finally:
            for fd in reversed(held):
                os.close(fd)  # closing releases the lock; the empty lock files stay, harmlessly


def _flock(path: Path, exclusive: bool, what: str) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise OutputBusy(f"{what}: another seglabel run is writing here; wait for it, or use another --out") from None
    return fd


class BucketOut(Out):
    version_key = "etag"
    local = False

    def __init__(self, url: str) -> None:
        self.url = storage.check_url(url.rstrip("/"), "--out")
        self._leases: list[storage.Lease] = []
        self._offset: float | None = None

    def object_url(self, rel: str) -> str:
        return storage.join(self.url, rel)

    def shown(self, rel: str = "") -> str:
        return storage.redact(self.object_url(rel) if rel else self.url)

    def _check_lease(self) -> None:
        for lease in self._leases:
            lease.check()

    def write_bytes(self, rel: str, data: bytes) -> Stat:
        self._check_lease()
        url = self.object_url(rel)
        try:
            fs, path = storage.filesystem(url)
            reply = storage.objects.retried(url, "write", lambda: fs.pipe_file(path, data))
        except StorageError as e:
            raise OutputError(f"{self.shown(rel)}: cannot write ({e.reason})") from None
        etag = reply.get("ETag") if isinstance(reply, dict) else None
        if not etag:
            found = self.stat(rel)
            etag = found.version if found else ""
        return Stat(len(data), str(etag), None)

    @contextmanager
    def write_text(self, rel: str) -> Iterator[io.TextIOBase]:
        """Streamed into a local temporary file, then uploaded whole (coco.json can be larger than
        memory should hold; a large object goes up in parts, and appears only when all arrived)."""
        import tempfile

        with tempfile.TemporaryDirectory(prefix="seglabel-") as folder:
            local = os.path.join(folder, PurePosixPath(rel).name)
            with open(local, "w", encoding="utf-8", errors="backslashreplace") as f:
                yield f
            self._check_lease()
            url = self.object_url(rel)
            try:
                fs, path = storage.filesystem(url)
                storage.objects.retried(url, "write", lambda: fs.put_file(local, path))
            except StorageError as e:
                raise OutputError(f"{self.shown(rel)}: cannot write ({e.reason})") from None

    def read_bytes(self, rel: str, start: int | None = None, end: int | None = None) -> bytes:
        try:
            return storage.read_bytes(self.object_url(rel), start, end)
        except StorageError as e:
            if e.kind == NOT_FOUND:
                raise FileNotFoundError(2, "not found", self.shown(rel)) from None
            raise OutputError(f"{self.shown(rel)}: cannot read ({e.reason})") from None

    def stat(self, rel: str) -> Stat | None:
        try:
            found = storage.info(self.object_url(rel))
        except StorageError as e:
            if e.kind == NOT_FOUND:
                return None
            raise OutputError(f"{self.shown(rel)}: cannot read ({e.reason})") from None
        return Stat(found.size, found.etag or "", found.mtime_ns)

    def listing(self, sub: str) -> dict[str, Stat]:
        try:
            listed = storage.list_files(self.object_url(sub) if sub else self.url)
        except StorageError as e:
            raise OutputError(f"{self.shown(sub)}: cannot list ({e.reason})") from None
        prefix = f"{sub.strip('/')}/" if sub else ""
        return {prefix + item.rel: Stat(item.size, item.etag or "", item.mtime_ns) for item in listed
                if not any(part.startswith(".") for part in item.rel.split("/"))}

    def delete(self, rel: str) -> None:
        self._check_lease()
        try:
            storage.delete(self.object_url(rel))
        except StorageError as e:
            raise OutputError(f"{self.shown(rel)}: cannot delete ({e.reason})") from None

    def holds(self, sub: str) -> bool:
        if self.stat(sub) is not None:
            return True
        try:
            names = storage.objects.first_under(self.object_url(sub), 64)
        except StorageError as e:
            raise OutputError(f"{self.shown(sub)}: cannot list ({e.reason})") from None
        return any(not part.startswith(".") for name in names for part in name.split("/")[-1:])

    def is_run_folder(self) -> bool:
        """As ``Out.is_run_folder``, looking at a few objects only (one request each)."""
        candidates = [(RUN_FILE, b'"seglabel_version"')]
        try:
            parts = storage.objects.first_under(self.object_url(RUNS), 16)
            records = storage.objects.first_under(self.object_url(RECORDS), 16)
        except StorageError as e:
            raise OutputError(f"{self.shown()}: cannot list ({e.reason})") from None
        candidates += [(f"{RUNS}/{n}", b'"seglabel_version"') for n in parts if n.endswith(".json") and "/" not in n
                       and not n.startswith(".")][:4]
        candidates += [(f"{RECORDS}/{n}", b'"settings_id"') for n in records
                       if n.endswith(".json") and not n.split("/")[-1].startswith(".")][:1]
        for rel, head in self.read_heads([rel for rel, _ in candidates], 4096):
            if head is not None and dict(candidates)[rel] in head:
                return True
        return False

    def read_heads(self, rels: list[str], size: int) -> Iterator[tuple[str, bytes | None]]:
        """In parallel: a request each, overlapped."""
        from concurrent.futures import ThreadPoolExecutor

        def head(rel: str) -> bytes | None:
            try:
                return self.read_bytes(rel, 0, size)
            except OSError:
                return None

        with ThreadPoolExecutor(HEAD_READERS) as pool:
            yield from zip(rels, pool.map(head, rels))

    def check_store(self) -> None:
        """Refuse (one line, ``UsageError``: nothing was written) a bucket that is not there, or
        that these credentials may not write in, or that cannot keep runs apart; learn its clock.
        Once: a probe object written and deleted."""
        if self._offset is None:
            try:
                self._offset = storage.check_conditional_writes(self.url)
            except StorageError as e:
                raise UsageError(f"--out {self.shown()}: {e.reason}") from None
            except UsageError as e:  # named the probe object: name --out instead
                raise UsageError(f"--out {self.shown()}: {str(e).split(': ', 1)[-1]}") from None

    @contextmanager
    def lock(self, part: str | None) -> Iterator[None]:
        """Leases instead of ``flock``: a whole run holds ``.lock``; a part holds
        ``runs/.<part>.lock``. Each takes its own, then looks for the other kind (a whole run for
        any live part, a part for a live whole run) and gives up if it finds one; since S3 reads
        what was written before (strong consistency), of a whole run and a part starting at once
        at least one sees the other."""
        self.check_store()
        own_url = self.object_url(LOCK_FILE if part is None else _parts_lock(part))
        what = "annotate" if part is None else part
        lease = storage.Lease(own_url, what, clock_offset=self._offset or 0.0)
        try:
            lease.take()
        except storage.LeaseHeld as e:
            raise OutputBusy(f"{self.shown()}: {str(e).split(': ', 1)[1]}") from None
        try:
            other = self._live_other(part, lease)
            if other:
                raise OutputBusy(f"{self.shown()}: another seglabel run is writing here ({other}); wait for it, "
                                 "or use another --out")
            self._leases.append(lease)
            yield
        finally:
            if lease in self._leases:
                self._leases.remove(lease)
            lease.release()

    def _live_other(self, part: str | None, mine: storage.Lease) -> str | None:
        if part is None:
            urls = [self.object_url(rel) for rel in _hidden_locks(self)]
        else:
            urls = [self.object_url(LOCK_FILE)]
        for url in urls:
            other = storage.Lease(url, "", ttl=mine.ttl, clock_offset=mine.offset)
            found = other.holder()
            if found is not None and other._stale(found[0]) is None:
                return f"{found[0].what}, {found[0].host} pid {found[0].pid}"
        return None


def _first(listing: dict[str, Stat]) -> list[str]:
    """One ``.json`` file of a listing (in sorted order), as ``layout`` looks at one record."""
    return [rel for rel in sorted(listing) if rel.endswith(".json")][:1]


def _hidden_locks(out: BucketOut) -> list[str]:
    """The part leases under ``runs/`` (hidden names, which ``listing`` leaves out)."""
    try:
        listed = storage.list_files(out.object_url(RUNS))
    except StorageError as e:
        raise OutputError(f"{out.shown(RUNS)}: cannot list ({e.reason})") from None
    return [f"{RUNS}/{item.rel}" for item in listed if item.rel.startswith(".") and item.rel.endswith(".lock")]


def open_out(out: str | Path | Out) -> Out:
    """The output for ``--out``: a bucket prefix for a URL (``file://`` URLs are folders), else a folder."""
    if isinstance(out, Out):
        return out
    text = os.fspath(out)
    if storage.is_url(text):
        local = storage.local_path(text)
        return FolderOut(local) if local is not None else BucketOut(text)
    return FolderOut(text)


def read_json(out: Out, rel: str) -> dict[str, Any]:
    """A JSON object from ``rel``; ``OSError``, ``ValueError`` (not JSON) or ``OutputError`` (not an object) otherwise."""
    data = json.loads(out.read_bytes(rel).decode("utf-8"))
    if not isinstance(data, dict):
        raise OutputError(f"{out.shown(rel)}: not a JSON object")
    return data


def copy_down(out: Out, dest: str | Path, subs: tuple[str, ...] = (RUN_FILE, MASKS, RECORDS, "scores")) -> Path:
    """A local copy of a run's files (``subs``: files and folders) in ``dest``, for readers that
    open a run as a folder (``distill --pseudo s3://...``). Files already there with the same size
    and a time not older than the object's are kept, so a second call copies only what changed;
    each file written atomically."""
    dest = Path(dest)
    for sub in subs:
        whole = out.stat(sub)
        for rel, st in ({sub: whole} if whole is not None else out.listing(sub)).items():
            local = dest / rel
            try:
                have = os.stat(local)
                if have.st_size == st.size and (st.mtime_ns is None or have.st_mtime_ns >= st.mtime_ns):
                    continue
            except OSError:
                pass
            write_bytes(local, out.read_bytes(rel))
    return dest
