"""The one way seglabel writes a file: a temporary file beside the target, then one rename.

A reader never sees half a file, and a kill leaves the old file or the new one. Temporaries are
named ``.<name>.seglabel-XXXXXXXX.tmp`` (``temporary_target`` recognises them; only such files are
ever removed as left over from a killed run) and created with mode 0666 less the umask, like any
other tool's files. Ground floor: run outputs (writers.py), the text-embedding cache (text.py),
the weights' content ids (checkpoints.py) and distill's checkpoints all write through here.
"""
from __future__ import annotations

import json
import os
import re
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .errors import SeglabelError


class OutputError(SeglabelError, OSError):
    """A file that could not be written; one line naming the path."""


_TEMPORARY = re.compile(r"^\.(?P<target>.+)\.seglabel-[0-9a-f]{8}\.tmp$")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename. Any
    failure removes the temporary; an ``OSError`` becomes an ``OutputError`` naming ``path``."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _create_temporary(path)
    except OSError as e:
        raise OutputError(f"{path}: cannot write ({e.strerror or e})") from None
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except OSError as e:
        remove_quietly(tmp)
        raise OutputError(f"{path}: cannot write ({e.strerror or e})") from None
    except BaseException:
        remove_quietly(tmp)
        raise


def write_bytes(path: str | Path, data: bytes) -> None:
    """``data`` as the whole of ``path``, flushed to the disk before the rename."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def to_json(obj: Any, indent: int | None = None) -> str:
    """Strict JSON: NaN and infinities are refused (``ValueError``), not written as invalid JSON."""
    return json.dumps(obj, indent=indent, ensure_ascii=False, allow_nan=False)


def write_json(path: str | Path, obj: Any, indent: int | None = 2) -> None:
    # backslashreplace: a file name that is not UTF-8 (surrogate-escaped) stays readable JSON
    write_bytes(path, (to_json(obj, indent=indent) + "\n").encode("utf-8", "backslashreplace"))


def temporary_target(name: str) -> str | None:
    """The file a temporary of ours stands in for (``.a.png.seglabel-0f3a9c1e.tmp`` -> ``a.png``);
    None for any other name, which is never ours to remove."""
    m = _TEMPORARY.match(name)
    return m["target"] if m else None


def remove_quietly(path: str | Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _create_temporary(path: Path) -> str:
    """An empty new file ``.<name>.seglabel-XXXXXXXX.tmp`` beside ``path``, mode 0666 less the umask
    (``mkstemp`` would make it 0600, and the rename would keep that)."""
    while True:
        tmp = path.parent / f".{path.name}.seglabel-{secrets.token_hex(4)}.tmp"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return str(tmp)
        except FileExistsError:
            continue
