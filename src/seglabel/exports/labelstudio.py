"""Label Studio: ``label_config.xml`` and ``tasks.json`` with the labels as predictions.

One task per image; its ``predictions`` hold one ``brushlabels`` result per class present (the
class's pixels in Label Studio's brush RLE, see ``brush_rle``), and ``score`` = the image's
confidence, so Label Studio's prediction-score ordering puts the least confident first.
Images are referenced through Label Studio's local-files serving
(``/data/local-files/?d=PATH``, PATH relative to ``LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT``), so
the photos must be found (run.json or ``--images``). The document root is by default the parent
of the folder the photos were labelled from (``d=photos/x/a.jpg``), or ``document_root``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Mapping
from urllib.parse import quote
from xml.sax.saxutils import quoteattr

import numpy as np

from ..writers import atomic_path, write_bytes
from .brush_rle import encode_mask
from .run_output import ImageEntry, OutputFolderError, RunOutput

CONFIG, TASKS = "label_config.xml", "tasks.json"
FROM_NAME, TO_NAME, REVIEW = "label", "image", "review"
REVIEW_CHOICES = ("ok", "fix", "discard")


def label_config(run: RunOutput) -> str:
    labels = "\n".join(f"    <Label value={quoteattr(c.name)} background={quoteattr('#%02x%02x%02x' % c.color)}/>"
                       for c in run.labelset.classes if not c.ignore)
    choices = "\n".join(f"    <Choice value={quoteattr(v)}/>" for v in REVIEW_CHOICES)
    return f"""<View>
  <Image name="{TO_NAME}" value="$image" zoom="true" zoomControl="true"/>
  <BrushLabels name="{FROM_NAME}" toName="{TO_NAME}">
{labels}
  </BrushLabels>
  <Header value="Review"/>
  <Choices name="{REVIEW}" toName="{TO_NAME}" choice="single" showInline="true">
{choices}
  </Choices>
</View>
"""


def write_labelstudio(run: RunOutput, dest: Path, document_root: Path | None = None,
                      on_image: Callable[[], None] | None = None) -> list[str]:
    paths, root, storage = _image_paths(run, document_root)
    write_bytes(dest / CONFIG, label_config(run).encode())
    version = f"seglabel {run.run.get('model') or ''}".strip()
    with atomic_path(dest / TASKS) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write("[")
        for n, entry in enumerate(run.entries):
            task = task_of(run, entry, paths[entry.key], version, n)
            f.write(("\n" if n == 0 else ",\n") + json.dumps(task, ensure_ascii=False, separators=(",", ":")))
            on_image and on_image()
        f.write("\n]\n")
    return [f"start Label Studio with LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true "
            f"LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT={root}; in a project with {CONFIG} as the labeling "
            f"interface, add a Local files storage with the path {storage} (no sync needed), then import {TASKS}"]


def task_of(run: RunOutput, entry: ImageEntry, image_path: str, model_version: str, index: int) -> dict:
    mask = run.read_mask(entry)
    names = {k: run.labelset.classes[k].name for k, _ in entry.areas if not run.labelset.classes[k].ignore}
    prediction = {"model_version": model_version, "result": brush_results(mask, names, prefix=f"i{index}")}
    if entry.confidence is not None:
        prediction["score"] = entry.confidence
    return {"data": {"image": "/data/local-files/?d=" + quote(image_path, safe="/"),
                     "seglabel_key": entry.key, "confidence": entry.confidence},
            "predictions": [prediction]}


def brush_results(mask: np.ndarray, names: Mapping[int, str], from_name: str = FROM_NAME, to_name: str = TO_NAME,
                  prefix: str = "") -> list[dict]:
    """One ``brushlabels`` result per class of ``names`` (class index -> label) present in
    ``mask``, in class order: the class's pixels in Label Studio's brush RLE. Shared by the export
    and the ML backend (``seglabel serve``)."""
    h, w = mask.shape
    present = np.flatnonzero(np.bincount(mask.reshape(-1), minlength=1)) if mask.size else []
    results = []
    for k in present:
        if int(k) not in names:
            continue
        results.append({
            "id": f"{prefix}c{k}", "from_name": from_name, "to_name": to_name, "type": "brushlabels",
            "original_width": w, "original_height": h, "image_rotation": 0,
            "value": {"format": "rle", "rle": encode_mask(mask == k), "brushlabels": [names[int(k)]]},
        })
    return results


def _image_paths(run: RunOutput, document_root: Path | None) -> tuple[dict[str, str], str, str]:
    """Each image's path relative to the document root; the document root; the storage folder.

    Label Studio serves a file only from a Local files storage, and refuses a storage at the
    document root itself: so by default the root is the parent of the photos' folder, and the
    storage is that folder."""
    photos, missing = {}, []
    for e in run.entries:
        photo = run.images.find(e.file_name)
        if photo is None:
            missing.append(e.file_name)
        else:
            photos[e.key] = os.path.abspath(photo)
    if missing:
        raise OutputFolderError(f"{run.out}: {len(missing)} photos not found (first: {missing[0]}); "
                                "pass --images DIR, the folder they were labelled from")
    roots = set()
    for e in run.entries:  # the folder each file_name is relative to
        roots.add(os.path.dirname(photos[e.key][: len(photos[e.key]) - len(e.file_name)]) or os.sep)
    storage = os.path.commonpath(sorted(roots))
    root = os.path.abspath(document_root) if document_root else os.path.dirname(storage)
    paths = {}
    for key, photo in photos.items():
        rel = os.path.relpath(photo, root)
        if rel.startswith(".."):
            raise OutputFolderError(f"{photo}: not inside --document-root {document_root}")
        paths[key] = rel.replace(os.sep, "/")
    if os.path.relpath(storage, root).startswith(".."):
        storage = root
    return paths, root, storage
