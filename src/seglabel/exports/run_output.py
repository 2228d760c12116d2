"""Reading what ``seglabel annotate`` wrote: the label set, one entry per image, the masks, and
where the labelled photos are.

Shared by ``seglabel preview`` and ``seglabel export``, so each shows the same images: every entry
is the record for its mask as the mask is now (``records.current_record``: a hand-edited mask is
the truth), and an image is left out, with one line in ``left_out``, when its mask cannot be
shipped: a mask that is missing, unreadable or holds a value that is no class, a mask of another
size than the photo it labelled, or a photo changed since it was labelled. The records are small,
so every entry is kept in memory (100,000 images are tens of MB); masks and photos are read one at
a time.

A run in a bucket (``s3://bucket/labels``) is read the same way (``outputs.BucketOut``); the masks
and photos its readers open as files are copied, one at a time as they are asked for, into a local
staging folder (``stage``: a temporary folder unless the caller keeps one), and photos are found
at the URL prefixes (or in the tar shards) the run recorded in ``input_roots``.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence, TextIO

import numpy as np

from .. import storage
from ..atomic import write_bytes
from ..labelset import LabelSet, LabelSetError, parse_labelset
from ..outputs import FolderOut, Out, Stat, open_out
from ..records import current_record, iter_records, mask_rel, photo_change, read_mask_at, stream_coco
from ..runs import settings_id
from ..storage.tar_shards import index_shard, read_member
from ..writers import MASKS, RECORDS, RUN_FILE, OutputFolderError, read_mask

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
    out: Path | str  # the folder, or the bucket prefix as shown
    labelset: LabelSet
    run: dict[str, Any]
    entries: list[ImageEntry]
    images: "ImageFinder" = field(repr=False)
    left_out: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) of images not shipped
    output: Out | None = field(default=None, repr=False)
    versions: dict[str, Stat] = field(default_factory=dict, repr=False)  # masks/ and records/ as listed

    def mask_path(self, entry: ImageEntry) -> Path:
        """The mask as a local file (in a bucket: copied into the staging folder first)."""
        rel = mask_rel(entry.key)
        if isinstance(self.output, FolderOut) or self.output is None:
            return Path(self.out) / MASKS / f"{entry.key}.png"
        return self.images.stage_object(self.output, rel)

    def read_mask(self, entry: ImageEntry) -> np.ndarray:
        if isinstance(self.output, FolderOut) or self.output is None:
            return read_mask(self.mask_path(entry))
        return read_mask_at(self.output, mask_rel(entry.key))

    def version(self, rel: str) -> int | str | None:
        """A file's version (mtime, or ETag in a bucket) as listed: what a cache of drawings keys on."""
        found = self.versions.get(rel)
        return None if found is None else found.version

    def write_coco(self, f: TextIO) -> int:
        """COCO of the entries (the masks as they are now) to ``f``, as annotate writes coco.json."""
        settings = self.run.get("settings")
        info = {"description": f"seglabel {self.run.get('seglabel_version', '')}: {self.labelset.name}",
                "model": self.run.get("model"), "settings_id": settings_id(settings) if settings else None}
        return stream_coco(f, self.output or self.out, self.labelset, info, left_out=[],
                           keys={e.key for e in self.entries})

    def sorted_worst_first(self) -> list[ImageEntry]:
        """The model's labels least confident first (without a confidence, older outputs, after
        them), then the masks a person corrected, apart, by key."""
        return sorted(self.entries, key=lambda e: (bool(e.corrected), e.confidence is None, e.confidence or 0.0, e.key))


def read_output(out: str | Path | Out, image_roots: Sequence[str | Path] = (), stage: Path | None = None) -> RunOutput:
    """Everything preview and export need from an annotate output (a folder or a bucket prefix).
    ``stage``: where a bucket's masks and photos are copied to be opened as files (default: a
    temporary folder, removed with the process)."""
    output = open_out(out)
    if isinstance(output, FolderOut):
        folder = output.folder
        if not folder.is_dir():
            raise OutputFolderError(f"{folder}: no such folder")
        if not (folder / RUN_FILE).is_file():
            raise OutputFolderError(f"{folder / RUN_FILE}: not found; is {folder} a folder written by seglabel annotate?")
        shown_out: Path | str = folder
    else:
        shown_out = output.shown()
    run_file = output.shown(RUN_FILE)
    try:
        run = json.loads(output.read_bytes(RUN_FILE).decode("utf-8"))
        labelset = parse_labelset(run["labelset"], source=run_file)
    except FileNotFoundError:
        raise OutputFolderError(f"{run_file}: not found; is {shown_out} written by seglabel annotate?") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        if isinstance(e, LabelSetError):
            raise OutputFolderError(f"{run_file}: bad label set ({e})") from None
        raise OutputFolderError(f"{run_file}: unreadable run record ({type(e).__name__}: {e})") from None
    finder = ImageFinder(_candidate_roots(run, image_roots), stage)
    versions = {**output.listing(MASKS), **output.listing(RECORDS)}
    entries, left_out = [], []
    for key, rel in iter_records(output):
        now = current_record(output, key, labelset, _read_json(output, rel), stat=versions.get(mask_rel(key)))
        entry = now.problem is None and _entry(key, output.shown(rel), now.record)
        photo = entry and finder.find(entry.file_name)
        change = photo_change(now.record, photo)[0] if photo else ""
        if now.problem:
            left_out.append(now.problem)
        elif change:
            left_out.append((str(photo), f"{change}: its mask is stale; rerun seglabel annotate to label it again"))
        else:
            entries.append(entry)
    if not entries and not left_out:
        raise OutputFolderError(f"{shown_out}: no labelled images (records/ is empty)")
    return RunOutput(shown_out, labelset, run, entries, finder, left_out, output, versions)


def _read_json(out: Out, rel: str) -> dict[str, Any]:
    try:
        record = json.loads(out.read_bytes(rel).decode("utf-8"))
    except (OSError, ValueError) as e:
        raise OutputFolderError(f"{out.shown(rel)}: unreadable record ({type(e).__name__}: {e})") from None
    if not isinstance(record, dict):
        raise OutputFolderError(f"{out.shown(rel)}: unreadable record (not a JSON object)")
    return record


def _entry(key: str, path: str, rec: dict[str, Any]) -> ImageEntry:
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
    (the folders, URL prefixes or tar shards the records' file names are relative to). Outputs
    older than that record need ``--images``. A photo at a URL or in a tar shard is copied into
    the staging folder and found there."""

    def __init__(self, roots: Iterable[str | Path], stage: Path | None = None) -> None:
        self.roots = list(dict.fromkeys(r if _read_by_storage(r) else Path(os.path.abspath(r)) for r in roots))
        self._stage, self._temporary = stage, None
        self._shards: dict[str, dict[str, Any]] = {}

    def stage(self) -> Path:
        if self._stage is None:
            self._temporary = tempfile.TemporaryDirectory(prefix="seglabel-stage-")
            self._stage = Path(self._temporary.name)
        return self._stage

    def _staged(self, source: str, name: str, data: bytes) -> Path:
        path = self.stage() / hashlib.sha256(source.encode("utf-8", "surrogateescape")).hexdigest()[:20] / name
        write_bytes(path, data)
        return path

    def stage_object(self, out: Out, rel: str) -> Path:
        """An output's file copied into the staging folder (``FileNotFoundError`` if it is not there)."""
        return self._staged(out.shown(rel), os.path.basename(rel), out.read_bytes(rel))

    def find(self, file_name: str) -> Path | None:
        for root in self.roots:
            if isinstance(root, Path):
                path = root / file_name
                if path.is_file():
                    return path
                continue
            found = self._remote(root, file_name)
            if found is not None:
                return found
        return None

    def _remote(self, root: str, file_name: str) -> Path | None:
        bare = root.split("?", 1)[0]
        try:
            if bare.lower().endswith(".tar"):
                members = self._shards.get(root)
                if members is None:
                    from ..images import IMAGE_SUFFIXES

                    members = self._shards[root] = {m.rel: m for m in index_shard(root, IMAGE_SUFFIXES).members}
                member = members.get(file_name)
                return None if member is None else self._staged(member.source, os.path.basename(file_name),
                                                                read_member(member))
            if not storage.is_url(root):
                return None
            url = storage.join(root, file_name)
            return self._staged(url, os.path.basename(file_name), storage.read_bytes(url))
        except (storage.StorageError, OSError):
            return None


def _candidate_roots(run: dict[str, Any], explicit: Sequence[str | Path]) -> list[str | Path]:
    for r in explicit:
        if not storage.is_url(str(r)) and not Path(r).is_dir():
            raise OutputFolderError(f"{r}: --images is not a folder")
    roots: list[str | Path] = [str(r) if storage.is_url(str(r)) else Path(r) for r in explicit]
    recorded = run.get("input_roots")
    if isinstance(recorded, list):
        roots += [r if _read_by_storage(r) else Path(r) for r in recorded if isinstance(r, str)]
    return roots


def _read_by_storage(root: str | Path) -> str | None:
    """A root the storage layer reads (a URL, or a tar shard: its photos are members), as text."""
    text = str(root)
    return text if storage.is_url(text) or text.split("?", 1)[0].lower().endswith(".tar") else None


def load_rgb(path: Path) -> np.ndarray | None:
    """The photo as RGB uint8 the way annotate saw it (EXIF orientation applied), or None."""
    from ..images import ImageError, load_image

    try:
        return load_image(path)
    except (ImageError, OSError):
        return None
