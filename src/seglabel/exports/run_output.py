"""Reading what ``seglabel annotate`` wrote: the label set, one entry per image, the masks, and
where the labelled photos are.

Shared by ``seglabel preview`` and ``seglabel export``. The records are small, so every entry is
kept in memory (100,000 images are tens of MB); masks and photos are read one at a time.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from ..labelset import LabelSet, LabelSetError, parse_labelset
from ..writers import MASKS, RUN_FILE, OutputFolderError, iter_records, read_mask

__all__ = ["ImageEntry", "ImageFinder", "OutputFolderError", "RunOutput", "load_rgb", "read_mask", "read_output"]


@dataclass(frozen=True)
class ImageEntry:
    key: str  # relative output path without suffix: masks/<key>.png
    file_name: str  # the photo's path relative to the folder it was labelled from
    width: int
    height: int
    confidence: float | None  # mean top-class probability; None in outputs older than it
    areas: tuple[tuple[int, int], ...]  # (class index, pixels) of each class present

    @property
    def pixels(self) -> int:
        return self.width * self.height

    @property
    def ignored_pixels(self) -> int:
        return max(0, self.pixels - sum(a for _, a in self.areas))


@dataclass
class RunOutput:
    out: Path
    labelset: LabelSet
    run: dict[str, Any]
    entries: list[ImageEntry]
    images: "ImageFinder" = field(repr=False)

    def mask_path(self, entry: ImageEntry) -> Path:
        return self.out / MASKS / f"{entry.key}.png"

    def read_mask(self, entry: ImageEntry) -> np.ndarray:
        return read_mask(self.mask_path(entry))

    def sorted_worst_first(self) -> list[ImageEntry]:
        """Least confident first; images without a confidence (older outputs) last."""
        return sorted(self.entries, key=lambda e: (e.confidence is None, e.confidence or 0.0, e.key))


def read_output(out: str | Path, image_roots: Sequence[str | Path] = ()) -> RunOutput:
    """Everything preview and export need from an annotate output folder."""
    out = Path(out)
    run_file = out / RUN_FILE
    if not out.is_dir():
        raise OutputFolderError(f"{out}: no such folder")
    if not run_file.is_file():
        raise OutputFolderError(f"{run_file}: not found; is {out} a folder written by seglabel annotate?")
    try:
        run = json.loads(run_file.read_text(encoding="utf-8"))
        labelset = parse_labelset(run["labelset"], source=str(run_file))
    except (OSError, ValueError, KeyError, TypeError) as e:
        if isinstance(e, LabelSetError):
            raise OutputFolderError(f"{run_file}: bad label set ({e})") from None
        raise OutputFolderError(f"{run_file}: unreadable run record ({type(e).__name__}: {e})") from None
    entries = [_read_entry(key, path) for key, path in iter_records(out)]
    if not entries:
        raise OutputFolderError(f"{out}: no labelled images (records/ is empty)")
    return RunOutput(out, labelset, run, entries, ImageFinder(_candidate_roots(run, image_roots)))


def _read_entry(key: str, path: Path) -> ImageEntry:
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
        areas = tuple(sorted((int(a["category_id"]) - 1, int(a["area"])) for a in rec.get("annotations", [])))
        conf = rec.get("confidence")
        return ImageEntry(key, str(rec["file_name"]), int(rec["width"]), int(rec["height"]),
                          None if conf is None else float(conf), areas)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise OutputFolderError(f"{path}: unreadable record ({type(e).__name__}: {e})") from None


# -- where the photos are ---------------------------------------------------------------------------
class ImageFinder:
    """Finds the photo of a record: ``root / file_name`` for the first root where it exists.

    Roots, in order: ``--images`` folders, then the ``input_roots`` annotate recorded in run.json
    (the folders the records' file names are relative to). Outputs older than that record need
    ``--images``."""

    def __init__(self, roots: Iterable[Path]) -> None:
        self.roots = list(dict.fromkeys(Path(os.path.abspath(r)) for r in roots))

    def find(self, file_name: str) -> Path | None:
        for root in self.roots:
            path = root / file_name
            if path.is_file():
                return path
        return None


def _candidate_roots(run: dict[str, Any], explicit: Sequence[str | Path]) -> list[Path]:
    for r in explicit:
        if not Path(r).is_dir():
            raise OutputFolderError(f"{r}: --images is not a folder")
    roots = [Path(r) for r in explicit]
    recorded = run.get("input_roots")
    if isinstance(recorded, list):
        roots += [Path(r) for r in recorded if isinstance(r, str)]
    return roots


def load_rgb(path: Path) -> np.ndarray | None:
    """The photo as RGB uint8 the way annotate saw it (EXIF orientation applied), or None."""
    from ..images import ImageError, load_image

    try:
        return load_image(path)
    except (ImageError, OSError):
        return None
