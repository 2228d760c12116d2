"""CVAT's "Segmentation mask 1.1" (Export task dataset > Segmentation mask 1.1; also what Datumaro
writes as ``voc_segmentation``): a zip, or its folder, with ``labelmap.txt`` (``name:R,G,B:parts:
actions`` per label), ``ImageSets/Segmentation/*.txt`` (the images) and ``SegmentationClass/<name>.png``.

A colour mask (CVAT and Datumaro write them so) is read through labelmap.txt's colours; a
single-channel one (seglabel's export) as label ids, the line index in labelmap.txt. A colour that
labelmap.txt lacks is a label the run lacks too (the import is refused). ``background`` (CVAT adds it,
black, for the pixels no label covers) and seglabel's ``ignore`` label mean ignored pixels unless
the label set has a class of that name. An image listed in ImageSets without a mask was not
annotated: left as it was.
"""
from __future__ import annotations

import io
import posixpath
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from .source import Item, ItemProblem, Source, SourceError

TOOL = "cvat"
LABELMAP, SETS, MASKS = "labelmap.txt", "ImageSets/Segmentation/", "SegmentationClass/"


def read_cvat(path: str | Path) -> Source:
    path = Path(path)
    files = _Files(path)
    if LABELMAP not in files.names:
        raise SourceError(f"{path}: not a Segmentation mask 1.1 export (no {LABELMAP}); export the CVAT task "
                          "as 'Segmentation mask 1.1'")
    try:
        labels, colors = _labelmap(files.read(LABELMAP).decode("utf-8", "replace"), path)
    except ItemProblem as e:
        raise SourceError(f"{path}: {e}") from None
    source = Source(TOOL, str(path.resolve()), dict(enumerate(labels)), [])
    masks = {posixpath.splitext(n[len(MASKS):])[0]: n for n in sorted(files.names)
             if n.startswith(MASKS) and n.lower().endswith(".png")}
    listed = [line.strip() for n in sorted(files.names) if n.startswith(SETS) and n.endswith(".txt")
              for line in files.read(n).decode("utf-8", "replace").splitlines() if line.strip()]
    for name in dict.fromkeys(listed):
        if name not in masks:
            source.skipped.append((name, "no mask in the export (not annotated)"))
    by_color = {c: i for i, c in reversed(list(enumerate(colors)))}  # the first label of a colour
    for name, member in masks.items():
        source.items.append(Item(name, (name,), None, _reader(files, member, by_color, source)))
    return source


def _labelmap(text: str, path: Path) -> tuple[list[str], list[tuple[int, int, int]]]:
    labels, colors = [], []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split(":")
        try:
            rgb = tuple(int(v) for v in fields[1].split(",")) if len(fields) > 1 and fields[1] else ()
        except ValueError:
            rgb = ()
        if len(rgb) != 3:
            raise SourceError(f"{path}: {LABELMAP} line {n}: {line[:80]!r} is not 'name:R,G,B:parts:actions'")
        labels.append(fields[0])
        colors.append(rgb)
    if not labels:
        raise SourceError(f"{path}: {LABELMAP} names no label")
    return labels, colors


def _reader(files: "_Files", member: str, by_color: dict, source: Source) -> Callable[[], np.ndarray]:
    def read() -> np.ndarray:
        try:
            with Image.open(io.BytesIO(files.read(member))) as img:
                img.load()
                if img.mode in ("L", "I;16", "I", "1"):
                    return np.asarray(img).astype(np.int32)
                rgb = np.asarray(img.convert("RGB"))
        except (OSError, ValueError) as e:
            raise ItemProblem(f"{member}: unreadable mask ({e})") from None
        packed = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]
        colours, inverse = np.unique(packed, return_inverse=True)
        table = np.empty(len(colours), np.int32)
        for i, c in enumerate(colours.tolist()):
            rgb_c = (c >> 16, (c >> 8) & 255, c & 255)
            if rgb_c not in by_color:  # a colour no label has: an id of its own, reported as such
                by_color[rgb_c] = len(source.labels) + len(source.unknown)
                source.unknown[by_color[rgb_c]] = f"colour {rgb_c} (no label of {LABELMAP})"
            table[i] = by_color[rgb_c]
        return table[inverse.reshape(-1)].reshape(rgb.shape[:2])

    return read


class _Files:
    """The members of a zip, or the files of a folder, by their posix path inside it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        if path.is_dir():
            self.zip = None
            self.names = [p.relative_to(path).as_posix() for p in sorted(path.rglob("*")) if p.is_file()]
        else:
            try:
                self.zip = zipfile.ZipFile(path)
                self.names = [i.filename for i in self.zip.infolist() if not i.is_dir()]
            except (OSError, zipfile.BadZipFile) as e:
                raise SourceError(f"{path}: not a Segmentation mask 1.1 export (a zip or its folder): {e}") from None

    def read(self, name: str) -> bytes:
        try:
            return self.zip.read(name) if self.zip is not None else (self.path / name).read_bytes()
        except (OSError, KeyError, zipfile.BadZipFile) as e:
            raise ItemProblem(f"{name}: cannot be read ({e})") from None
