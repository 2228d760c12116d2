"""The input side of annotate: decode and resize images ahead of the model, in worker processes.

Each image becomes a ``Loaded``: the model-ready tensor (or the reason it could not be read).
With ``workers=0`` everything runs in the calling process, one image at a time.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from .images import ImageError, ImageItem, load_image
from .interrupts import leave_signals_to_parent
from .predict import Protocol, prepare_image


@dataclass
class Loaded:
    item: ImageItem
    tensor: torch.Tensor | None = None  # (3, H', W') normalised, resized; None for TTA or on error
    size: tuple[int, int] = (0, 0)  # original (H, W)
    rgb: np.ndarray | None = None  # the decoded image, kept when a writer needs it (overlays, TTA)
    error: str | None = None
    shown_path: str = ""  # the path as an error message prints it (odd bytes escaped)

    def pin_memory(self) -> "Loaded":  # called by DataLoader(pin_memory=True): faster host-to-GPU copies
        if self.tensor is not None:
            self.tensor = self.tensor.pin_memory()
        return self


class _Images(torch.utils.data.Dataset):
    def __init__(self, items: Sequence[ImageItem], protocol: Protocol, mean, std, max_pixels: int,
                 keep_rgb: bool, fits: Callable[[int, int], str | None] | None = None) -> None:
        self.items, self.protocol, self.max_pixels, self.keep_rgb = list(items), protocol, max_pixels, keep_rgb
        self.mean, self.std, self.fits = tuple(mean), tuple(std), fits

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Loaded:
        item = self.items[i]
        try:
            rgb = load_image(item.path, self.max_pixels, self.fits)
        except ImageError as e:
            return Loaded(item, error=e.reason, shown_path=e.path)
        size = (int(rgb.shape[0]), int(rgb.shape[1]))
        if self.protocol.tta:  # multi-scale TTA resizes per scale itself: hand over the pixels
            return Loaded(item, None, size, rgb)
        x = prepare_image(rgb, self.protocol, self.mean, self.std)
        return Loaded(item, x, size, rgb if self.keep_rgb else None)


def default_workers(device: torch.device) -> int:
    """Loader processes: on an accelerator enough to keep it fed. On a CPU none: decoding and
    resizing cost under 1% of a CPU forward pass, and a loader process would take cores from
    the model's threads (oversubscribed OpenMP threads slow every forward pass)."""
    if device.type == "cpu":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cores - 1))


def load_images(items: Sequence[ImageItem], protocol: Protocol, mean, std, max_pixels: int,
                keep_rgb: bool = False, workers: int = 0, pin_memory: bool = False, prefetch: int = 4,
                fits: Callable[[int, int], str | None] | None = None) -> Iterator[Loaded]:
    """Yield a ``Loaded`` per item, in order; with ``workers`` > 0 up to ``workers * prefetch``
    images are decoded ahead. ``fits(width, height)`` may refuse an image from its header
    (``images.load_image``)."""
    dataset = _Images(items, protocol, mean, std, max_pixels, keep_rgb, fits)
    if workers <= 0 or len(dataset) <= 1:
        yield from (dataset[i] for i in range(len(dataset)))
        return
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=None, shuffle=False, num_workers=min(workers, len(dataset)),
        collate_fn=_identity, pin_memory=pin_memory, prefetch_factor=prefetch,
        worker_init_fn=leave_signals_to_parent)
    yield from loader


def _identity(x: Loaded) -> Loaded:
    return x
