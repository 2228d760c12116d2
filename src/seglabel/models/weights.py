"""Where the weights of a second model (DINO, SAM, ...) come from: a local file, else the caches
their own packages fill (torch hub's checkpoints folder, the Hugging Face cache), else a download
when there is network. When none works, ``WeightsUnavailable`` (the same error as for CLIP weights)
says in one line how to supply them. Files are read later by ``checkpoints.load_weights``.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from ..checkpoints import CheckpointError
from .clip import WeightsUnavailable, _first_line, _hf_cached, _hub_reachable


@dataclass(frozen=True)
class WeightSource:
    hub_file: str | None = None  # the file name torch.hub gives it in $TORCH_HOME/hub/checkpoints
    url: str | None = None  # the official download
    hf_repo: str | None = None  # a Hugging Face repository holding it ...
    hf_file: str | None = None  # ... under this name
    download: str = ""  # a command that fills a cache, for the error message


def resolve_weights(name: str, source: WeightSource, file: str | None, flag: str, cache_dir: str | None = None) -> str:
    """The path of ``name``'s weights: ``file`` when given, else a cached copy, else a download."""
    if file:
        if not Path(file).is_file():
            raise CheckpointError(f"{file}: no such file")
        return str(file)
    hub = _torch_hub_checkpoint(source.hub_file)
    if hub:
        return hub
    if source.hf_repo and source.hf_file:
        cached = _hf_cached(source.hf_repo, [source.hf_file], cache_dir)
        if cached:
            return cached
    how = (f"download them once where there is network ({source.download}) and copy the cache "
           f"({_hub_dir()} or the Hugging Face cache), or pass {flag} FILE"
           + (f" (e.g. {source.hub_file})" if source.hub_file else ""))
    offline = bool(os.environ.get("HF_HUB_OFFLINE"))
    if not offline and source.hf_repo and _hub_reachable():
        try:
            from huggingface_hub import hf_hub_download

            return hf_hub_download(source.hf_repo, source.hf_file, cache_dir=cache_dir)
        except Exception as e:  # noqa: BLE001 - hub errors come in many types
            raise WeightsUnavailable(f"could not download {name} weights ({_first_line(e)}): {how}") from None
    if not offline and source.url and _host_reachable(source.url):
        import torch

        target = Path(_hub_dir()) / (source.hub_file or Path(urlparse(source.url).path).name)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(source.url, str(target), progress=False)
            return str(target)
        except Exception as e:  # noqa: BLE001 - network errors come in many types
            raise WeightsUnavailable(f"could not download {name} weights ({_first_line(e)}): {how}") from None
    raise WeightsUnavailable(f"{name} weights are not cached and cannot be downloaded here: {how}")


def file_identity(path: str | os.PathLike | None) -> Any:
    """A weight file as the settings check knows it: its name and size (not its folder, so a copy
    of the same file elsewhere is the same weights; hashing gigabytes would take too long)."""
    if not path:
        return None
    p = Path(path)
    return [p.name, p.stat().st_size] if p.is_file() else str(path)


def _hub_dir() -> str:
    import torch

    return os.path.join(torch.hub.get_dir(), "checkpoints")


def _torch_hub_checkpoint(filename: str | None) -> str | None:
    if not filename:
        return None
    path = Path(_hub_dir()) / filename
    return str(path) if path.is_file() else None


def _host_reachable(url: str, timeout: float = 3.0) -> bool:
    host = urlparse(url).hostname
    if not host:
        return False
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False
