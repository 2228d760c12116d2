"""Loading weight files without running code hidden in them.

``torch.load`` unpickles, and a pickle can call anything. Every file seglabel reads goes through
``load_weights``: safetensors as they are, everything else with ``weights_only=True`` (plain
tensors, containers and numbers only) and memory-mapped where the format allows.
"""
from __future__ import annotations

import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch


class CheckpointError(ValueError):
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
        except Exception as e:  # safetensors raises its own error types
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
