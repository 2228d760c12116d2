"""Loading weight files without running code hidden in them.

``torch.load`` unpickles, and a pickle can call anything. Every file seglabel reads goes through
``load_weights``: safetensors as they are, everything else with ``weights_only=True`` (plain
tensors, containers and numbers only) and memory-mapped where the format allows.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from .atomic import OutputError, atomic_path
from .errors import UsageError


class CheckpointError(UsageError):
    """A weight file that cannot be used; one line naming the file and the problem."""


def load_weights(path: str | Path, extra_safe_globals: list[Any] | None = None) -> Any:
    """Read a weight file (``.safetensors``, ``.pt``/``.pth``/``.bin``/``.ckpt``) on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file (0 bytes), not a weight file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    try:
        mmap = zipfile.is_zipfile(path)  # only the zip format of torch.save can be memory-mapped
        with torch.serialization.safe_globals(extra_safe_globals or []), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4": the refusal below says it all
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        names = [n for n in pickle_globals(path) if not n.startswith(_PLAIN_MODULES)]
        detail = f"it names {', '.join(names[:3])}" if names else _unpickling_detail(e)
        raise CheckpointError(
            f"{path}: refused: the file holds more than plain tensors and could run code when "
            f"loaded ({detail}); nothing from it was run. If you trust it, re-save "
            f"its state_dict with torch.save or safetensors"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError, IndexError, MemoryError) as e:
        msg = str(e).strip().splitlines()[0].split(". ")[0] if str(e).strip() else ""
        if not isinstance(e, (RuntimeError, OSError, ValueError)) or not msg:
            msg = f"{type(e).__name__}: {msg}" if msg else type(e).__name__
        raise CheckpointError(f"{path}: not a readable PyTorch weight file ({msg})") from None


_PLAIN_MODULES = ("torch.", "collections.", "builtins.set", "builtins.frozenset", "builtins.bytearray")


def pickle_globals(path: str | Path, limit: int = 256 << 20) -> list[str]:
    """The importable names (``module.qualname``) a pickle or torch.save archive refers to, read
    with ``pickletools``, which lists opcodes without executing any. For messages only."""
    import pickletools

    found: list[str] = []
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                name = next(n for n in z.namelist() if n.endswith("data.pkl"))
                if z.getinfo(name).file_size > limit:
                    return found
                data = z.read(name)
        else:
            with open(path, "rb") as f:
                data = f.read(limit)
        strings: list[str] = []
        for op, arg, _ in pickletools.genops(data):
            if isinstance(arg, str):
                strings.append(arg)
            if op.name in ("GLOBAL", "STACK_GLOBAL", "INST"):
                name = arg.replace(" ", ".") if op.name != "STACK_GLOBAL" else ".".join(strings[-2:])
                if name not in found:
                    found.append(name)
    except Exception:  # noqa: BLE001 - a malformed or legacy file: fewer names, same refusal
        pass
    return found


def _unpickling_detail(e: BaseException) -> str:
    """The line of torch's weights_only error that says what was refused (e.g. "unsupported
    GLOBAL posix.system"), without its advice to load the file unsafely."""
    lines = [" ".join(line.split()) for line in str(e).splitlines()]
    for line in lines:
        found = re.search(r"(unsupported global:?.*|unsupported operand.*|unsupported class.*)", line, re.IGNORECASE)
        if found:
            return found.group(1).rstrip(".")
    useful = [line for line in lines[1:] if line and not line.startswith(("Check the documentation", "Please file"))
              and "weights_only" not in line]
    return useful[0].rstrip(".") if useful else "objects other than tensors and plain data"


def state_dict_of(obj: Any, path: str | Path = "<checkpoint>") -> dict[str, torch.Tensor]:
    """The tensors of a loaded checkpoint: a bare state_dict, or one under 'state_dict' /
    'model', with a DDP 'module.' prefix removed."""
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: no state_dict of tensors found")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


# -- identity -------------------------------------------------------------------------------------
def cache_dir() -> Path | None:
    """seglabel's cache folder: ``$SEGLABEL_CACHE`` (``off`` disables), else
    ``$XDG_CACHE_HOME/seglabel`` (``~/.cache/seglabel``)."""
    env = os.environ.get("SEGLABEL_CACHE")
    if env is not None:
        return None if env.strip().lower() in ("", "off", "0", "none") else Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "seglabel"


def content_id(path: str | Path) -> str:
    """``sha256:<hex>`` of a file's bytes: weights are known by what they hold, not by how their
    path is spelled. Remembered in the cache folder per (real path, size, mtime, ctime, inode), so
    a weight file of gigabytes is read once until it changes."""
    st = os.stat(path)
    stamp = [os.path.realpath(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]
    if tuple(stamp) in _CONTENT_IDS:
        return _CONTENT_IDS[tuple(stamp)]
    _CONTENT_IDS[tuple(stamp)] = found = _content_id(path, stamp)
    return found


_CONTENT_IDS: dict[tuple, str] = {}  # this process's answers (the cache folder may be off or read-only)


def _content_id(path: str | Path, stamp: list) -> str:
    folder = cache_dir()
    entry = None
    if folder is not None:
        entry = folder / "sha256" / hashlib.sha256(json.dumps(stamp).encode()).hexdigest()[:32]
        try:
            known = entry.read_text(encoding="ascii").strip()
            if re.fullmatch(r"sha256:[0-9a-f]{64}", known):
                return known
        except OSError:
            pass
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    found = f"sha256:{digest.hexdigest()}"
    if entry is not None:
        try:  # atomically: shards hashing at once never see half an entry
            with atomic_path(entry) as tmp:
                tmp.write_text(found, encoding="ascii")
        except OutputError:
            pass  # an unwritable cache only costs time
    return found
