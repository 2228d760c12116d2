"""Loading weight files without running code hidden in them.

``torch.load`` unpickles, and a pickle can call anything. Every file seglabel reads goes through
``load_weights``: safetensors as they are, everything else with ``weights_only=True`` (plain
tensors, containers and numbers only) and memory-mapped where the format allows.
"""
from __future__ import annotations

import pickle
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
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    mmap = zipfile.is_zipfile(path)  # only the zip format of torch.save can be memory-mapped
    try:
        with torch.serialization.safe_globals(extra_safe_globals or []):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "unsupported content"
        raise CheckpointError(
            f"{path}: refused: the file holds more than plain tensors and could run code when "
            f"loaded ({first}); re-save its state_dict with torch.save or safetensors"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable PyTorch weight file ({msg})") from None


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
