"""``seglabel import``: corrections made by people in a review tool come back into a run folder.

One reader per tool's export (``from_labelstudio``, ``from_cvat``, ``from_fiftyone``,
``from_coco``) gives the images it holds as label maps in the tool's own labels (``source.py``);
``target.py`` finds them in the run (or places them in a new one); ``writer.py`` checks the whole
import, then writes each mask and its record, marked corrected by a person (tool, source, when),
through ``records.write_labelled``. What the rules are: docs/review.md and docs/runs.md.
"""
from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Callable, Sequence

from ..labelset import LabelSet
from .source import Source, SourceError
from .target import open_target
from .writer import ImportRefused, ImportResult, check, write

FORMATS = ("labelstudio", "cvat", "fiftyone", "coco")

__all__ = ["FORMATS", "ImportRefused", "ImportResult", "SourceError", "detect_format", "import_corrections",
           "read_source"]


def import_corrections(source: str | Path, into: str | Path, fmt: str | None = None, *,
                       labels: str | Path | None = None, images: Sequence[str | Path] = (), field: str | None = None,
                       all_reviewed: bool = False, dry_run: bool = False, argv: Sequence[str] | None = None,
                       on_image: Callable[[str], None] | None = None) -> ImportResult:
    """Import the corrected masks of ``source`` (a tool's export, or a FiftyOne dataset's name)
    into the run ``into`` (a new run there when it holds none and ``labels`` is given). Refused
    (``UsageError``, nothing written) for a source, run or label that cannot be used; per-image
    problems are in the result. ``all_reviewed``: images the tool gives back unchanged were
    reviewed too (CVAT, FiftyOne and COCO exports do not say). ``dry_run``: everything checked,
    nothing written."""
    target = open_target(into, labels, images)
    read = read_source(source, fmt, target.labelset, field)
    planned, lookup, result = check(read, target)
    return write(read, target, planned, lookup, result, all_reviewed=all_reviewed, dry_run=dry_run,
                 argv=list(argv) if argv is not None else None, on_image=on_image)


def detect_format(source: str | Path) -> str:
    """The format of ``source`` from what it holds; a name that is no file: a FiftyOne dataset."""
    path = Path(source)
    if path.is_dir():
        if (path / "labelmap.txt").is_file():
            return "cvat"
        if (path / "labels").is_dir():
            return "fiftyone"
        raise SourceError(f"{path}: a folder that is no Segmentation mask 1.1 export (labelmap.txt) or FiftyOne "
                          "export (labels/); give --format")
    if path.is_file():
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
            if "labelmap.txt" in names:
                return "cvat"
            if any(n.startswith("annotations/") and n.endswith(".json") for n in names):
                return "coco"
            raise SourceError(f"{path}: a zip that is no Segmentation mask 1.1 (labelmap.txt) or COCO "
                              "(annotations/*.json) export")
        with open(path, "rb") as f:
            head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
        if head.startswith(b"["):
            return "labelstudio"
        if head.startswith(b"{"):
            return "coco"
        raise SourceError(f"{path}: not a JSON export of Label Studio (a list of tasks) or COCO; give --format")
    if "/" in str(source) or str(source).endswith((".json", ".zip")):
        raise SourceError(f"{source}: no such file or folder")
    return "fiftyone"  # a dataset's name


def read_source(source: str | Path, fmt: str | None, labelset: LabelSet, field: str | None = None) -> Source:
    fmt = fmt or detect_format(source)
    if fmt not in FORMATS:
        raise SourceError(f"--format {fmt}: unknown (known: {', '.join(FORMATS)})")
    if field is not None and fmt != "fiftyone":
        raise SourceError("--field is for FiftyOne datasets only")
    path = Path(source)
    if fmt == "fiftyone":
        from .from_fiftyone import read_fiftyone_dataset, read_fiftyone_dir

        return read_fiftyone_dir(path, labelset) if path.is_dir() else read_fiftyone_dataset(str(source), labelset, field)
    if not path.exists():
        raise SourceError(f"{source}: no such file or folder")
    if fmt == "labelstudio":
        from .from_labelstudio import read_labelstudio

        return read_labelstudio(path)
    if fmt == "cvat":
        from .from_cvat import read_cvat

        return read_cvat(path)
    from .from_coco import read_coco

    return read_coco(path)
