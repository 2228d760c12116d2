"""The input side of annotate: decode and resize images ahead of the model, in worker processes.

Each image becomes a ``Loaded``: the model-ready tensor (or the reason it could not be read).
With ``workers=0`` everything runs in the calling process, one image at a time.

With ``decode_on`` a device (the GPU), plain JPEGs are not decoded in the workers: they only read
the file and its header, and the calling process decodes a window of them in one batched call on
the device and resizes them there (decode.py). Every other image is decoded in the workers as
before, which is also the fallback for any JPEG the device decoder refuses.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from .decode import decode_jpegs, device_decoding_available, device_jpeg
from .errors import UsageError
from .images import ImageError, ImageItem, file_fingerprint, load_image, photo_fingerprint, read_photo
from .interrupts import leave_signals_to_parent
from .predict import Protocol, prepare_image, prepare_pixels

DECODE_CHOICES = ("auto", "cpu", "device")
REMOTE_CPU_WORKERS = 4  # loader processes for photos read from a store, on a CPU


@dataclass
class Loaded:
    item: ImageItem
    tensor: torch.Tensor | None = None  # (3, H', W') normalised, resized; None for TTA or on error
    size: tuple[int, int] = (0, 0)  # original (H, W)
    rgb: np.ndarray | None = None  # the decoded image, kept when a writer needs it (overlays, TTA)
    error: str | None = None
    shown_path: str = ""  # the path as an error message prints it (odd bytes escaped)
    jpeg: torch.Tensor | None = None  # the file's bytes, while it waits to be decoded on the device
    photo: dict | None = None  # the file's fingerprint (images.file_fingerprint), kept in its record

    def pin_memory(self) -> "Loaded":  # called by DataLoader(pin_memory=True): faster host-to-GPU copies
        if self.tensor is not None:
            self.tensor = self.tensor.pin_memory()
        return self


class _Images(torch.utils.data.Dataset):
    def __init__(self, items: Sequence[ImageItem], protocol: Protocol, mean, std, max_pixels: int,
                 keep_rgb: bool, encoded: bool = False,
                 fits: Callable[[int, int], str | None] | None = None) -> None:
        self.items, self.protocol, self.max_pixels, self.keep_rgb = list(items), protocol, max_pixels, keep_rgb
        self.mean, self.std, self.fits = tuple(mean), tuple(std), fits
        self.encoded = encoded  # plain JPEGs stay encoded, for the device to decode

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Loaded:
        item = self.items[i]
        data = None
        if item.remote:  # a URL or a photo in a tar shard: its bytes, fetched here (retried), once
            try:
                data = read_photo(item)
            except ImageError as e:
                return Loaded(item, error=e.reason, shown_path=e.path)
            photo = photo_fingerprint(item, data)
        else:
            try:  # read here, beside the decoding: a rerun knows the photo again by it (records.py)
                photo = file_fingerprint(item.path)
            except OSError:
                photo = None  # the decoding reports what is wrong with the file
        if self.encoded:
            found = device_jpeg(item.path, self.max_pixels, data)
            if found is not None and (self.fits is None or self.fits(found[1][1], found[1][0]) is None):
                return Loaded(item, size=found[1], jpeg=found[0], photo=photo)  # else the CPU path reports it
        loaded = self.decode(item, data)
        loaded.photo = photo
        return loaded

    def decode(self, item: ImageItem, data: bytes | None = None) -> Loaded:
        """The CPU path: PIL decodes, the tensor is resized here."""
        try:
            if data is None and item.remote:
                data = read_photo(item)
            rgb = load_image(item.path, self.max_pixels, self.fits, data)
        except ImageError as e:
            return Loaded(item, error=e.reason, shown_path=e.path)
        size = (int(rgb.shape[0]), int(rgb.shape[1]))
        if self.protocol.tta:  # multi-scale TTA resizes per scale itself: hand over the pixels
            return Loaded(item, None, size, rgb)
        x = prepare_image(rgb, self.protocol, self.mean, self.std)
        return Loaded(item, x, size, rgb if self.keep_rgb else None)


def default_workers(device: torch.device, remote: bool = False) -> int:
    """Loader processes: on an accelerator enough to keep it fed. On a CPU none: decoding and
    resizing cost under 1% of a CPU forward pass, and a loader process would take cores from
    the model's threads (oversubscribed OpenMP threads slow every forward pass); but photos read
    from a store (``remote``) get 4, which mostly wait on the network, so reads overlap."""
    if device.type == "cpu":
        return REMOTE_CPU_WORKERS if remote else 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cores - 1), REMOTE_CPU_WORKERS if remote else 1)


def decode_device(choice: str, device: torch.device) -> torch.device | None:
    """Where JPEGs are decoded for a model on ``device``: None for the loader's CPU path, else the
    device. ``auto``: the GPU when it can (CUDA with nvjpeg), else the CPU; ``cpu``: always the
    CPU; ``device``: the model's device whatever it is (on a CPU, torchvision's decoder)."""
    if choice not in DECODE_CHOICES:
        raise UsageError(f"--decode {choice}: choose one of {', '.join(DECODE_CHOICES)}")
    if choice == "cpu" or (choice == "auto" and not device_decoding_available(device)):
        return None
    if device.type == "cuda" and not device_decoding_available(device):
        raise UsageError("--decode device: this torchvision cannot decode JPEGs on the GPU (built without nvjpeg)")
    return device


def load_images(items: Sequence[ImageItem], protocol: Protocol, mean, std, max_pixels: int,
                keep_rgb: bool = False, workers: int = 0, pin_memory: bool = False,
                prefetch: int = 4, decode_on: torch.device | None = None, decode_batch: int = 32,
                fits: Callable[[int, int], str | None] | None = None) -> Iterator[Loaded]:
    """Yield a ``Loaded`` per item, in order; with ``workers`` > 0 up to ``workers * prefetch``
    images are decoded ahead. With ``decode_on``, plain JPEGs are decoded there, ``decode_batch``
    at a time, and their tensors are on that device (not with the TTA protocol, which takes pixels).
    ``fits(width, height)`` may refuse an image from its header (``images.load_image``)."""
    encoded = decode_on is not None and not protocol.tta
    dataset = _Images(items, protocol, mean, std, max_pixels, keep_rgb, encoded, fits)
    if workers <= 0 or len(dataset) <= 1:
        loaded: Iterator[Loaded] = (dataset[i] for i in range(len(dataset)))
    else:
        with warnings.catch_warnings():  # more loaders than cores is meant for photos that wait on the network
            warnings.filterwarnings("ignore", message="This DataLoader will create")
            loaded = iter(torch.utils.data.DataLoader(
                dataset, batch_size=None, shuffle=False, num_workers=min(workers, len(dataset)),
                collate_fn=_identity, pin_memory=pin_memory, prefetch_factor=prefetch,
                worker_init_fn=leave_signals_to_parent))
    if not encoded:
        yield from loaded
        return
    norm = (torch.tensor(dataset.mean, device=decode_on).view(3, 1, 1),
            torch.tensor(dataset.std, device=decode_on).view(3, 1, 1))
    window: list[Loaded] = []  # at most decode_batch images of any kind: bounded memory
    for ld in loaded:
        window.append(ld)
        if len(window) >= decode_batch:
            yield from _decode_window(window, dataset, decode_on, norm)
            window = []
    yield from _decode_window(window, dataset, decode_on, norm)


def _decode_window(window: list[Loaded], dataset: _Images, device: torch.device,
                   norm: tuple[torch.Tensor, torch.Tensor]) -> list[Loaded]:
    """The window's encoded JPEGs decoded in one call on ``device`` and prepared there; a JPEG the
    device decoder refuses takes the CPU path here. Order kept."""
    waiting = [i for i, ld in enumerate(window) if ld.jpeg is not None]
    pixels = decode_jpegs([window[i].jpeg for i in waiting], device)
    mean, std = norm
    for i, px in zip(waiting, pixels):
        ld = window[i]
        if px is None or tuple(px.shape[1:]) != ld.size:
            window[i] = dataset.decode(ld.item)
            window[i].photo = ld.photo
            continue
        ld.jpeg = None
        ld.tensor = prepare_pixels(px, dataset.protocol, mean, std)
        if dataset.keep_rgb:  # overlays are drawn on the CPU
            ld.rgb = px.permute(1, 2, 0).cpu().numpy()
    return window


def _identity(x: Loaded) -> Loaded:
    return x
