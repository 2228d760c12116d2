"""Everything annotate writes, each file atomically (``atomic.py``: a temporary file in the same
folder, then a rename); only our temporaries, and only where annotate writes, are ever removed as
left over from a killed run (``remove_stale_temporaries``).

Per image: ``masks/<key>.png`` (grayscale PNG of class indices), optional ``scores/<key>.png`` and
``overlays/<key>.jpg``, and last ``records/<key>.json`` (records.py: the mask and its record, and
coco.json from the records). ``read_mask`` reads a mask back (preview, export, records).
"""
from __future__ import annotations

import io
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

# The atomic writes live on the ground floor (atomic.py); annotate's modules take them from here too.
from .atomic import (OutputError, atomic_path, remove_quietly, temporary_target, to_json,  # noqa: F401
                     write_bytes, write_json)
from .errors import UsageError
from .labelset import LabelSet
from .layout import COCO_FILE, MASKS, OVERLAYS, PER_IMAGE, RECORDS, RUN_FILE, RUNS, SCORES  # noqa: F401 - also writers'

IGNORE_COLOR = (224, 224, 192)  # the PASCAL VOC colour of its 255 "void" pixels


class OutputFolderError(UsageError):
    """An output folder that cannot be read back (reviewed, exported); one line naming the file."""


def check_output_folder(out: str | Path) -> None:
    """``out`` is, or can be made as, a folder this process may write in (checked before a
    command writes anything)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a folder")
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"--out {out}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out}: no permission to write in {existing}")


def remove_stale_temporaries(out: str | Path, owned: Callable[[Path], bool] | None = None) -> int:
    """Our temporary files that an interrupted run left where annotate writes: ``coco.json``,
    ``run.json``, ``runs/`` and the per-image folders (the rest of ``out`` may be the user's input
    folder and is not looked at). With ``owned``, only those whose target file it accepts: a shard
    must not delete another shard's files in flight."""
    out = Path(out)
    folders = [(out, False), (out / RUNS, False)] + [(out / sub, True) for sub in PER_IMAGE]
    n = 0
    for top, recursive in folders:
        for folder, dirs, files in os.walk(top):
            if not recursive:
                dirs[:] = []
            for name in files:
                target = temporary_target(name)
                if target is None or (folder == str(out) and target not in (COCO_FILE, RUN_FILE)):
                    continue
                if owned is None or owned(Path(folder) / target):
                    remove_quietly(os.path.join(folder, name))
                    n += 1
    return n


# -- images -------------------------------------------------------------------------------------
def encode_mask_png(mask: np.ndarray) -> bytes:
    """Grayscale PNG, pixel = class index (255 = ignore); 16-bit past 254 classes.

    Not a palette PNG: OpenCV (and so CVAT, FiftyOne and most training code) reads a palette
    PNG as three colour channels, while a grayscale one reads as indices everywhere. Colour
    lives in overlays and previews."""
    img = Image.fromarray(mask if mask.dtype == np.uint8 else mask.astype(np.uint16))
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


class MaskError(OutputFolderError):
    """A mask that cannot be read as class indices; ``reason`` is what is wrong with it."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"{path}: mask {reason}")
        self.path, self.reason = str(path), reason


MASK_MODES = ("P", "L", "I;16", "I;16L", "I;16B", "I")  # PIL modes of single-channel class indices


def read_mask(path: str | Path, data: bytes | None = None) -> np.ndarray:
    """Class indices (H, W) of a mask PNG: uint8 (255 = ignore) or uint16 (65535 = ignore); the one
    reader of masks (records, preview, exports, eval, distill). ``data``: the file's bytes, read
    already (a mask in a bucket); ``path`` then only names it.

    Palette and grayscale PNGs both give indices through PIL (unlike OpenCV); a colour, float or
    1-bit image is refused (``MaskError``), as is a 32-bit one with values outside 0..65535."""
    mode = mask = None
    try:
        with Image.open(path if data is None else io.BytesIO(data)) as img:
            mode = img.mode
            if mode in MASK_MODES:
                mask = np.asarray(img)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:  # not a PNG, truncated
        raise MaskError(path, f"cannot be read ({e})") from None
    if mask is None:
        raise MaskError(path, f"is a {mode} image; expected single-channel class ids (palette, 8-bit or 16-bit "
                              "grayscale)")
    if mask.dtype == np.uint8 or mask.dtype == np.uint16:
        return mask
    if mask.size and (mask.min() < 0 or mask.max() > 65535):
        raise MaskError(path, "has values outside 0..65535")
    return mask.astype(np.uint16)  # also makes big-endian I;16B native


def encode_scores_png(confidence: np.ndarray) -> bytes:
    """Per-pixel confidence as a 16-bit grey PNG: value / 65535 = probability of the chosen class."""
    buf = io.BytesIO()
    Image.fromarray(np.round(np.clip(confidence, 0, 1) * 65535).astype(np.uint16)).save(buf, format="PNG")
    return buf.getvalue()


def encode_overlay_jpg(rgb: np.ndarray, mask: np.ndarray, labelset: LabelSet, alpha: float = 0.5) -> bytes:
    colors = np.zeros((max(labelset.ignore_index, len(labelset)) + 1, 3), dtype=np.float32)
    colors[: len(labelset)] = labelset.palette
    colors[labelset.ignore_index] = IGNORE_COLOR
    blended = (1 - alpha) * rgb.astype(np.float32) + alpha * colors[mask]
    buf = io.BytesIO()
    Image.fromarray(np.clip(blended, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


# -- COCO ---------------------------------------------------------------------------------------
def image_record(rel: str, mask: np.ndarray, confidence: np.ndarray | float | None,
                 labelset: LabelSet) -> dict[str, Any]:
    """What coco.json needs of one image: one RLE annotation per class present (ignore excluded).
    ``confidence``: per pixel (its mean is kept), the mean itself, or None (a mask made by hand)."""
    from pycocotools import mask as mask_util

    height, width = mask.shape
    classes, counts = class_run_lengths(mask, labelset.ignore_index)
    annotations = []
    if classes:
        rles = mask_util.frPyObjects([{"size": [height, width], "counts": c} for c in counts], height, width)
        for k, rle, area, box in zip(classes, rles, mask_util.area(rles), mask_util.toBbox(rles)):
            annotations.append({
                "category_id": k + 1,
                "segmentation": {"size": [height, width], "counts": rle["counts"].decode("ascii")},
                "area": int(area),
                "bbox": [float(v) for v in box],
                "iscrowd": 0,
            })
    mean = None if confidence is None else round(float(np.mean(confidence)), 6)
    return {"file_name": rel, "width": width, "height": height, "confidence": mean, "annotations": annotations}


def class_run_lengths(mask: np.ndarray, ignore_index: int) -> tuple[list[int], list[np.ndarray]]:
    """The classes in ``mask`` (ascending, ``ignore_index`` left out) and, for each, the
    uncompressed COCO run lengths of its binary mask: column-major order, alternating runs of
    0 and 1 starting with 0, as ``pycocotools.mask.encode(mask == k)`` counts them.

    One pass over the label map finds every run of equal labels; each class's runs, with the
    gaps between them, are its binary mask's runs. The per-class cost is then the number of
    its runs, not the number of pixels, so many classes cost about as much as one."""
    height, width = mask.shape
    n = height * width
    if n == 0:
        return [], []
    index = np.int32 if n < 2**31 else np.int64  # half the memory traffic of int64 on noisy maps
    flat = np.ascontiguousarray(mask.T).reshape(-1)  # column-major, the order COCO counts in
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    starts = np.concatenate((np.zeros(1, dtype=index), changes.astype(index)))  # of every run
    lengths = np.diff(starts, append=index(n))
    values = flat[starts]
    order = np.argsort(values, kind="stable")  # runs grouped by class, in image order within each
    values, starts, lengths = values[order], starts[order], lengths[order]
    first = np.flatnonzero(np.concatenate(([True], values[1:] != values[:-1])))  # each class's first run
    last = np.append(first[1:], len(values)) - 1
    ends = starts + lengths
    gaps = np.empty_like(starts)  # zeros before each run: since the class's previous run ...
    gaps[1:] = starts[1:] - ends[:-1]
    gaps[first] = starts[first]  # ... or since the first pixel
    runs = np.empty(2 * len(starts), dtype=np.uint32)
    runs[0::2] = gaps
    runs[1::2] = lengths
    classes, counts = [], []
    for k, a, b in zip(values[first].tolist(), first.tolist(), last.tolist()):
        if k == ignore_index:
            continue
        c = runs[2 * a:2 * b + 2]
        tail = n - int(ends[b])
        classes.append(int(k))
        counts.append(np.append(c, np.uint32(tail)) if tail else c)  # zeros after its last run
    return classes, counts


def coco_categories(labelset: LabelSet) -> list[dict[str, Any]]:
    return [{"id": i + 1, "name": c.name, "supercategory": "catch_all" if c.catch_all else "class"}
            for i, c in enumerate(labelset.classes) if not c.ignore]


class BackgroundWriter:
    """Runs write jobs on a few threads so the model does not wait for PNG/RLE encoding or the
    disk. At most ``limit`` jobs wait (bounded memory); results come back in submission order,
    and a job's error (e.g. a full disk) is raised in the caller at the next ``submit``/``drain``."""

    def __init__(self, threads: int = 2, limit: int = 16) -> None:
        self.pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="seglabel-write")
        self.limit = max(1, limit)
        self.pending: deque[tuple[Future, Any]] = deque()

    def submit(self, tag: Any, fn: Callable[..., Any], *args: Any) -> list[Any]:
        """Queue ``fn(*args)``; returns the tags of jobs finished so far (oldest first)."""
        done = self._collect(block_until=self.limit - 1)
        self.pending.append((self.pool.submit(fn, *args), tag))
        return done

    def drain(self) -> list[Any]:
        """Wait for every queued job; returns their tags."""
        return self._collect(block_until=0)

    def close(self) -> None:
        """Finish queued jobs, ignoring their errors (used while another error propagates)."""
        for future, _ in self.pending:
            future.exception()
        self.pending.clear()
        self.pool.shutdown(wait=True)

    def _collect(self, block_until: int) -> list[Any]:
        done = []
        while self.pending and (len(self.pending) > block_until or self.pending[0][0].done()):
            future, tag = self.pending.popleft()
            future.result()  # re-raises the job's error here
            done.append(tag)
        return done
