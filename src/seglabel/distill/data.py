"""Training data of ``seglabel distill``: (image, pseudo-mask) pairs matched by relative path and
checked before training starts (dataset.py samples and augments them). seglabel's own output
folders found under the images (an earlier annotate's masks and overlays) are not training photos:
they are left out and listed, by the rule annotate follows (images.find_images).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import UsageError
from ..images import ImageError, find_images
from ..writers import OutputFolderError, read_mask as read_mask_file

log = logging.getLogger("seglabel")


class DataError(UsageError):
    """Training data that cannot be used; one line naming the folder or file and the problem."""


@dataclass
class Pair:
    key: str  # relative path without suffix
    image: Path
    mask: Path | None  # None: labels come from an online teacher
    scores: Path | None = None  # the teacher's confidence per pixel (annotate --save-scores)


@dataclass
class PairScan:
    pairs: list[Pair]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    outputs: list[str] = field(default_factory=list)  # seglabel output folders under the images, left out

    def report(self) -> None:
        """Every skip on its own line (warnings: shown under --quiet too), then the count."""
        for folder in self.outputs:
            log.warning(f"{folder}: a seglabel run's output (masks, overlays...), not training photos: skipped")
        for path, reason in self.skipped:
            log.warning(f"skipped: {path}: {reason}")
        log.info(f"{len(self.pairs)} training images" + (f", {len(self.skipped)} skipped" if self.skipped else "")
                 + (f", {len(self.outputs)} seglabel output folders left out" if self.outputs else ""))


def mask_files(folder: Path) -> dict[str, Path]:
    """PNG masks under ``folder`` keyed by relative path without suffix (hidden entries skipped)."""
    out: dict[str, Path] = {}
    for path in sorted(folder.rglob("*.png")):
        rel = path.relative_to(folder)
        if path.is_file() and not any(part.startswith(".") for part in rel.parts):
            out[rel.with_suffix("").as_posix()] = path
    return out


def image_size(path: Path) -> tuple[int, int]:
    """(H, W) as ``load_image`` will return it: EXIF rotations swap the sides."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            orientation = im.getexif().get(0x0112, 1)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ImageError(path, f"not an image PIL can read ({e})") from None
    return (w, h) if orientation in (5, 6, 7, 8) else (h, w)


def read_mask(path: Path, ignore_index: int) -> np.ndarray:
    """Class ids as int64 (writers.read_mask); 255 of an 8-bit mask is ignore whatever the label set
    (as annotate writes it), as is 65535 of a 16-bit one."""
    raw = read_mask_file(path)
    ids = raw.astype(np.int64)
    ids[raw == (255 if raw.dtype == np.uint8 else 65535)] = ignore_index
    return ids


def read_scores(path: Path) -> np.ndarray:
    """annotate's 16-bit confidence PNG -> float32 probabilities in [0, 1]."""
    with Image.open(path) as im:
        if im.mode not in ("I", "I;16", "I;16L", "I;16B", "L"):
            raise DataError(f"{path}: a {im.mode} image, not a confidence map")
        raw = np.asarray(im)
    return raw.astype(np.float32) / (255.0 if raw.dtype == np.uint8 else 65535.0)


def scan_pairs(images: Path, masks: Path | None, num_classes: int, ignore_index: int,
               scores: Path | None = None, exclude: tuple[Path, ...] = ()) -> PairScan:
    """Match images and masks (and, given ``scores``, confidence maps) by relative path and check
    each mask: readable, the image's size, class ids inside the label set. Problems become
    reported skips; no usable pair is an error. Folders in ``exclude`` (distill's own --out) are
    never entered; seglabel's output folders are left out and listed (images.find_images)."""
    if not images.is_dir():
        raise DataError(f"{images}: no such image folder (--images)")
    found = find_images([images], exclude=exclude)
    items, runs = found.items, found.skipped_outputs
    skipped = [(p.path, p.reason) for p in found.problems]
    if masks is None:
        if not items:
            raise DataError(f"{images}: no training images found" + (" outside seglabel output folders" if runs else ""))
        return PairScan([Pair(i.key, i.path, None) for i in items], skipped, runs)
    if not masks.is_dir():
        raise DataError(f"{masks}: no such mask folder")
    by_key = mask_files(masks)
    score_files = mask_files(scores) if scores is not None else {}
    pairs = []
    for item in items:
        mask = by_key.pop(item.key, None)
        if mask is None:
            skipped.append((str(item.path), f"no mask {item.key}.png in {masks}"))
            continue
        score = score_files.get(item.key)
        if scores is not None and score is None:
            skipped.append((str(mask), f"no confidence map {item.key}.png in {scores}"))
            continue
        try:
            ids = read_mask(mask, ignore_index)
            size = image_size(item.path)
            conf_shape = read_scores(score).shape if score is not None else size
        except OutputFolderError as e:
            skipped.append((str(mask), str(e).split(": ", 1)[-1]))
            continue
        except (OSError, ValueError, ImageError, SyntaxError, Image.DecompressionBombError) as e:
            skipped.append((str(mask), f"cannot be read: {e}"))
            continue
        if ids.shape != size or conf_shape != size:
            bad = mask if ids.shape != size else score
            shape = ids.shape if ids.shape != size else conf_shape
            skipped.append((str(bad), f"size {shape[1]}x{shape[0]} differs from its image {size[1]}x{size[0]}"))
            continue
        bad = ids[((ids >= num_classes) & (ids != ignore_index)) | (ids < 0)]
        if bad.size:
            skipped.append((str(mask), f"class id {int(bad.max())} is outside the label set "
                                       f"(0..{num_classes - 1}, {ignore_index} = ignore)"))
            continue
        pairs.append(Pair(item.key, item.path, mask, score))
    skipped += [(str(p), "mask without an image") for p in by_key.values()]
    if not pairs:
        first = f" (first problem: {skipped[0][0]}: {skipped[0][1]})" if skipped else ""
        raise DataError(f"no usable (image, mask) pair in {images} and {masks}{first}")
    return PairScan(pairs, skipped, runs)
