"""How much memory labelling one image takes, and how much this process may still use.

An image too big for what is left is reported as a per-file problem before anything of it is
allocated (from its header), instead of the run dying in an allocator or inside pycocotools.
"""
from __future__ import annotations

import resource
from dataclasses import dataclass
from pathlib import Path

from .predict import Protocol, resized_size

# Bytes per original pixel, at their peak together: the decoded RGB and its float copy while
# resizing (3 + 12), labels (int64) and confidence (float32) at full size (12), the mask and its
# per-class RLE buffers (pycocotools: a uint8 copy and 4-byte counts per pixel, 1 + 1 + 4), and
# slack for the temporaries numpy makes (the mask of one class, thresholds: 4).
_PER_PIXEL = 3 + 12 + 12 + 6 + 4
_OVERLAY_PER_PIXEL = 3 * 4 * 3  # three float32 RGB images while blending
_SCORES_PER_PIXEL = 4 + 4 + 2


def image_bytes(height: int, width: int, protocol: Protocol, classes: int, stride: int,
                overlay: bool = False, scores: bool = False) -> int:
    """An upper estimate of the memory that labelling an image of this size takes."""
    pixels = height * width
    total = pixels * (_PER_PIXEL + (_OVERLAY_PER_PIXEL if overlay else 0) + (_SCORES_PER_PIXEL if scores else 0))
    if protocol.tta:  # scales up to 910 px long side (tta.py), logits summed at that size
        rh, rw = resized_size(height, width, Protocol(short_side=910, max_long_side=910))
        return total + 8 * classes * rh * rw * 4
    rh, rw = resized_size(height, width, protocol)
    total += rh * rw * 3 * 4 * 3  # the resized input, padded, and its copy on the device
    cells = rh * rw if (protocol.window or protocol.pamr) else -(-rh // stride) * -(-rw // stride)
    total += 3 * classes * cells * 4  # logits (window sums and counts, PAMR's upsampled copy)
    total += classes * -(-rh // max(1, stride)) * width * 4  # logits resized along the rows first
    return total


@dataclass(frozen=True)
class MemoryCheck:
    """Whether images fit in what this process could still allocate when labelling began (plain
    data, so loader processes get it too)."""

    budget: int | None  # None: unknown, nothing is refused
    protocol: Protocol
    classes: int
    stride: int
    overlay: bool = False
    scores: bool = False

    @classmethod
    def now(cls, protocol: Protocol, classes: int, stride: int, overlay: bool = False,
            scores: bool = False) -> "MemoryCheck":
        return cls(available_bytes(), protocol, classes, stride, overlay, scores)

    def need(self, height: int, width: int) -> int:
        return image_bytes(height, width, self.protocol, self.classes, self.stride, self.overlay, self.scores)

    def __call__(self, width: int, height: int) -> str | None:
        """The reason to refuse an image of this size, or None (``images.load_image``'s ``fits``)."""
        need = self.need(height, width)
        if self.budget is not None and need > self.budget:
            return (f"{width}x{height} needs about {gib(need)} of memory to label, more than the "
                    f"{gib(self.budget)} this process can use; label it where there is more memory")
        return None

    def crowded(self, height: int, width: int, in_flight: int) -> bool:
        """Whether ``in_flight`` images of this size at once could exhaust the budget."""
        return self.budget is not None and self.need(height, width) * in_flight > self.budget


def available_bytes() -> int | None:
    """What this process can still allocate: the least of the free memory (MemAvailable), its
    cgroup's limit less its usage, and the address-space and data limits (``ulimit -v``/``-d``)
    less what is mapped. None where none of them can be read."""
    found = []
    meminfo = _fields(Path("/proc/meminfo"))
    if "MemAvailable" in meminfo:
        found.append(meminfo["MemAvailable"])
    for limit_file, usage_file in (("memory.max", "memory.current"),  # cgroup v2, then v1
                                   ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
        limit, usage = _number(Path("/sys/fs/cgroup", limit_file)), _number(Path("/sys/fs/cgroup", usage_file))
        if limit is not None and usage is not None and limit < 1 << 60:
            found.append(max(0, limit - usage))
            break
    status = _fields(Path("/proc/self/status"))
    for rlimit, mapped in ((resource.RLIMIT_AS, "VmSize"), (resource.RLIMIT_DATA, "VmData")):
        soft = resource.getrlimit(rlimit)[0]
        if soft != resource.RLIM_INFINITY and mapped in status:
            found.append(max(0, soft - status[mapped]))
    return min(found) if found else None


def _fields(path: Path) -> dict[str, int]:
    """``Name:  123 kB`` lines as bytes."""
    out = {}
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(":")
            parts = value.split()
            if len(parts) == 2 and parts[1] == "kB" and parts[0].isdigit():
                out[name] = int(parts[0]) * 1024
    except OSError:
        pass
    return out


def _number(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def gib(n: int) -> str:
    return f"{n / (1 << 30):.1f} GiB" if n >= 1 << 30 else f"{max(1, round(n / (1 << 20)))} MiB"

