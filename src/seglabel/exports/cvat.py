"""CVAT: the "Segmentation mask 1.1" zip, the "COCO 1.0" zip, and the task's labels.

Segmentation mask 1.1 is read by Datumaro's VOC importer:
``labelmap.txt`` (``name:R,G,B:parts:actions``, one line per label, line index = label id),
``ImageSets/Segmentation/default.txt`` (item ids) and ``SegmentationClass/<id>.png``. A
single-channel PNG is taken as label ids as it is (a colour one is mapped back through the
colours), and a pixel whose id has no line is an error: so the masks here are grayscale, one
line per class in pixel-value order, and ignored pixels (255) become one more label,
``ignore`` (VOC's void colour), at the next id. Datumaro reads these masks as 8-bit, so this
zip needs at most 255 classes; the COCO zip has no such limit.

COCO 1.0 is COCO as annotate writes ``coco.json``, made from the masks as they are now (an edited
mask is the truth), as ``annotations/instances_default.json`` beside an empty ``images/`` folder
(Datumaro's COCO importer, CVAT's library, refuses a dataset without it): category ids start at 1
(CVAT drops annotations of category 0), masks as RLE.
"""
from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np

from ..labelset import labelmap_problem
from ..writers import atomic_path, encode_mask_png, write_json
from .run_output import OutputFolderError, RunOutput

MASK_ZIP, COCO_ZIP, LABELS_JSON = "segmentation_mask_1.1.zip", "coco_1.0.zip", "cvat_labels.json"
IGNORE_COLOR = (224, 224, 192)  # PASCAL VOC's "void"


def labelmap(run: RunOutput) -> tuple[list[tuple[str, tuple[int, int, int]]], str]:
    """(name, colour) per label id, and the name given to ignored pixels (the last label)."""
    names = [c.name for c in run.labelset.classes]
    for name in names:
        problem = labelmap_problem(name)
        if problem:
            raise OutputFolderError(f"{run.out}: class name {name!r}: {problem}")
    taken = {n.casefold() for n in names}
    ignore = next(n for n in ("ignore", "ignored", "void", "seglabel_ignore") if n not in taken)
    labels = []
    for i, c in enumerate(run.labelset.classes):
        # Datumaro and CVAT treat a first label "background" as VOC's, whose colour is black
        color = (0, 0, 0) if i == 0 and c.name.casefold() == "background" else c.color
        labels.append((c.name, tuple(int(v) for v in color)))
    return labels + [(ignore, IGNORE_COLOR)], ignore


def write_cvat(run: RunOutput, dest: Path, on_image: Callable[[], None] | None = None) -> list[str]:
    """Writes the zips and the labels into ``dest``; returns notes for the user."""
    labels, _ = labelmap(run)
    write_json(dest / LABELS_JSON, [{"name": n, "color": "#%02x%02x%02x" % c, "type": "mask", "attributes": []}
                                    for n, c in labels])
    notes = []
    if len(labels) <= 256:
        _write_mask_zip(run, dest / MASK_ZIP, labels, on_image)
    else:
        notes.append(f"{MASK_ZIP} not written: CVAT reads those masks as 8-bit, and this label set has "
                     f"{len(run.labelset)} classes; import {COCO_ZIP} instead")
    _write_coco_zip(run, dest / COCO_ZIP)
    notes.append(f"create the CVAT task with the labels of {LABELS_JSON} (Raw label editor), then upload "
                 f"{MASK_ZIP} as 'Segmentation mask 1.1' with 'Convert masks to polygons' off, or {COCO_ZIP} as 'COCO 1.0'")
    return notes


def _write_mask_zip(run: RunOutput, path: Path, labels, on_image) -> None:
    ignore_id = len(labels) - 1
    lines = ["# label:color_rgb:parts:actions"] + [f"{n}:{r},{g},{b}::" for n, (r, g, b) in labels]
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("labelmap.txt", "\n".join(lines) + "\n")
        z.writestr("ImageSets/Segmentation/default.txt", "".join(f"{e.key}\n" for e in run.entries))
        for e in run.entries:
            mask = run.read_mask(e)
            out = mask.astype(np.uint8)  # fewer than 256 labels: ids fit
            out[mask == run.labelset.ignore_index] = ignore_id
            # PNGs are compressed already; stored, not deflated again
            z.writestr(zipfile.ZipInfo(f"SegmentationClass/{e.key}.png", (1980, 1, 1, 0, 0, 0)), encode_mask_png(out))
            on_image and on_image()


def _write_coco_zip(run: RunOutput, path: Path) -> None:
    """COCO of the masks as they are now (not coco.json, which may predate an edit), streamed."""
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
        with z.open("annotations/instances_default.json", "w", force_zip64=True) as member, \
                io.TextIOWrapper(member, encoding="utf-8", errors="backslashreplace") as f:
            run.write_coco(f)
        # an empty images/ folder, as a COCO dataset has: Datumaro's importer refuses one without it
        z.writestr(zipfile.ZipInfo("images/", (1980, 1, 1, 0, 0, 0)), b"")
