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
from PIL import Image

from ..labelset import LabelSet, LabelSetError, parse_labelset
from ..writers import MASKS, RUN_FILE, iter_records


class OutputFolderError(ValueError):
    """An output folder that cannot be reviewed or exported; one line naming the file."""


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


def read_mask(path: Path) -> np.ndarray:
    """Class indices (H, W): uint8 with 255 = ignore, or uint16 with 65535 = ignore.

    Palette and grayscale PNGs both give indices through PIL (unlike OpenCV)."""
    try:
        with Image.open(path) as img:
            mask = np.asarray(img)
    except (OSError, ValueError) as e:
        raise OutputFolderError(f"{path}: unreadable mask ({e})") from None
    if mask.ndim != 2:
        raise OutputFolderError(f"{path}: not a single-channel mask (shape {mask.shape})")
    return mask.astype(np.uint16) if mask.dtype not in (np.uint8, np.uint16) else mask


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
    return RunOutput(out, labelset, run, entries, ImageFinder(_candidate_roots(out, run, image_roots)))


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
# annotate's flags that take no value: every other option is followed by its value.
_ANNOTATE_FLAGS = {"--tta", "--key-smoothing", "--no-key-smoothing", "--prompt-denoising",
                   "--no-prompt-denoising", "--overlay", "--save-scores", "--overwrite", "--dry-run",
                   "--json", "--quiet", "-q"}


class ImageFinder:
    """Finds the photo of a record: ``root / file_name`` for the first root where it exists.

    Roots, in order: ``--images`` folders; ``input_roots`` of run.json (if recorded); the inputs
    of the annotate command line in run.json's ``argv`` (a folder is a root; a file's folder is
    its root; a ``--from-list`` file gives its entries' common folder), relative paths resolved
    against run.json's ``cwd`` when recorded, else the current folder."""

    def __init__(self, roots: Iterable[Path]) -> None:
        self.roots = list(dict.fromkeys(Path(os.path.abspath(r)) for r in roots))

    def find(self, file_name: str) -> Path | None:
        for root in self.roots:
            path = root / file_name
            if path.is_file():
                return path
        return None


def _candidate_roots(out: Path, run: dict[str, Any], explicit: Sequence[str | Path]) -> list[Path]:
    for r in explicit:
        if not Path(r).is_dir():
            raise OutputFolderError(f"{r}: --images is not a folder")
    roots = [Path(r) for r in explicit]
    roots += [Path(r) for r in run.get("input_roots") or [] if isinstance(r, str)]
    base = Path(run["cwd"]) if isinstance(run.get("cwd"), str) else Path.cwd()
    roots += _roots_from_argv(run.get("argv") or [], base, out)
    return roots


def _roots_from_argv(argv: list[Any], base: Path, out: Path) -> list[Path]:
    args = [str(a) for a in argv]
    if "annotate" not in args:
        return []
    args = args[args.index("annotate") + 1:]
    inputs, listed = [], None
    i = 0
    while i < len(args):
        a = args[i]
        if a.startswith("-") and a != "-":
            name, has_value = a.split("=", 1)[0], "=" in a
            value = a.split("=", 1)[1] if has_value else (args[i + 1] if i + 1 < len(args) else None)
            if name == "--from-list":
                listed = value
            i += 1 if has_value or name in _ANNOTATE_FLAGS else 2
            continue
        inputs.append(a)
        i += 1
    roots = []
    for a in inputs:
        p = a if os.path.isabs(a) else base / a
        if os.path.isdir(p) and os.path.realpath(p) != os.path.realpath(out):
            roots.append(Path(p))
        elif os.path.isfile(p):
            roots.append(Path(p).parent)
    if listed and listed != "-":
        roots += _list_root(listed if os.path.isabs(listed) else base / listed, base)
    return roots


def _list_root(list_file: str | Path, base: Path) -> list[Path]:
    """The common folder of a --from-list file's entries (what their relative paths start from)."""
    try:
        lines = [s.strip() for s in Path(list_file).read_text(encoding="utf-8").splitlines() if s.strip()]
    except (OSError, UnicodeDecodeError):
        return []
    paths = [os.path.abspath(p if os.path.isabs(p) else base / p) for p in lines]
    paths = [p for p in paths if os.path.isfile(p)]
    return [Path(os.path.commonpath([os.path.dirname(p) for p in paths]))] if paths else []


def load_rgb(path: Path) -> np.ndarray | None:
    """The photo as RGB uint8 the way annotate saw it (EXIF orientation applied), or None."""
    from ..images import ImageError, load_image

    try:
        return load_image(path)
    except (ImageError, OSError):
        return None


def encode_index_png(mask: np.ndarray) -> bytes:
    """A grayscale PNG of class indices (8-bit, or 16-bit for uint16 masks). Not a palette PNG:
    OpenCV, and so CVAT and FiftyOne, read a palette PNG as three colour channels."""
    import io

    img = Image.fromarray(mask if mask.dtype == np.uint8 else mask.astype(np.uint16))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
