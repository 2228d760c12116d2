"""Reading what ``seglabel annotate`` wrote: the label set, one entry per image, the masks, and
where the labelled photos are.

Shared by ``seglabel preview`` and ``seglabel export``, so each shows the same images: every entry
is the record for its mask as the mask is now (``records.current_record``: a hand-edited mask is
the truth), and an image is left out, with one line in ``left_out``, when its mask cannot be
shipped: a mask that is missing, unreadable or holds a value that is no class, a mask of another
size than the photo it labelled, or a photo changed since it was labelled. The records are small,
so every entry is kept in memory (100,000 images are tens of MB); masks and photos are read one at
a time.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence, TextIO

import numpy as np

from ..labelset import LabelSet, LabelSetError, parse_labelset
from ..records import current_record, iter_records, photo_change, stream_coco
from ..runs import settings_id
from ..writers import MASKS, RUN_FILE, OutputFolderError, read_mask

__all__ = ["ImageEntry", "ImageFinder", "OutputFolderError", "RunOutput", "load_rgb", "read_mask", "read_output"]


@dataclass(frozen=True)
class ImageEntry:
    key: str  # relative output path without suffix: masks/<key>.png
    file_name: str  # the photo's path relative to the folder it was labelled from
    width: int
    height: int
    confidence: float | None  # mean top-class probability; None for a corrected mask (and older outputs)
    areas: tuple[tuple[int, int], ...]  # (class index, pixels) of each class present
    corrected: dict[str, Any] | None = None  # who corrected the mask (records.py), None for a model's

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
    left_out: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) of images not shipped

    def mask_path(self, entry: ImageEntry) -> Path:
        return self.out / MASKS / f"{entry.key}.png"

    def read_mask(self, entry: ImageEntry) -> np.ndarray:
        return read_mask(self.mask_path(entry))

    def write_coco(self, f: TextIO) -> int:
        """COCO of the entries (the masks as they are now) to ``f``, as annotate writes coco.json."""
        settings = self.run.get("settings")
        info = {"description": f"seglabel {self.run.get('seglabel_version', '')}: {self.labelset.name}",
                "model": self.run.get("model"), "settings_id": settings_id(settings) if settings else None}
        return stream_coco(f, self.out, self.labelset, info, left_out=[], keys={e.key for e in self.entries})

    def sorted_worst_first(self) -> list[ImageEntry]:
        """The model's labels least confident first (without a confidence, older outputs, after
        them), then the masks a person corrected, apart, by key."""
        return sorted(self.entries, key=lambda e: (bool(e.corrected), e.confidence is None, e.confidence or 0.0, e.key))


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
    finder = ImageFinder(_candidate_roots(run, image_roots))
    entries, left_out = [], []
    for key, path in iter_records(out):
        now = current_record(out, key, labelset, _read_json(path))
        entry = now.problem is None and _entry(key, path, now.record)
        photo = entry and finder.find(entry.file_name)
        change = photo_change(now.record, photo)[0] if photo else ""
        if now.problem:
            left_out.append(now.problem)
        elif change:
            left_out.append((str(photo), f"{change}: its mask is stale; rerun seglabel annotate to label it again"))
        else:
            entries.append(entry)
    if not entries and not left_out:
        raise OutputFolderError(f"{out}: no labelled images (records/ is empty)")
    return RunOutput(out, labelset, run, entries, finder, left_out)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise OutputFolderError(f"{path}: unreadable record ({type(e).__name__}: {e})") from None
    if not isinstance(record, dict):
        raise OutputFolderError(f"{path}: unreadable record (not a JSON object)")
    return record


def _entry(key: str, path: Path, rec: dict[str, Any]) -> ImageEntry:
    try:
        areas = tuple(sorted((int(a["category_id"]) - 1, int(a["area"])) for a in rec.get("annotations", [])))
        conf = rec.get("confidence")
        return ImageEntry(key, str(rec["file_name"]), int(rec["width"]), int(rec["height"]),
                          None if conf is None else float(conf), areas, rec.get("corrected"))
    except (ValueError, KeyError, TypeError) as e:
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
