"""Label Studio's JSON export (Export > JSON, or ``GET /api/projects/ID/export?exportType=JSON``):
a list of tasks, each with its ``annotations`` (what people submitted) and ``predictions``.

Each task's annotation is taken (the one marked ground truth, else the latest; cancelled
ones never): its ``brushlabels`` regions (brush RLE, a pixel painted where its alpha is not 0)
and ``polygonlabels`` regions (points in percent of the image, rasterised as COCO polygons),
painted in the order of the result, a later region over an earlier one. Pixels no region covers
are ignored pixels (255). A task is skipped, and its image left as it was, when it has no
annotation (only predictions), only cancelled ones, one without regions, or one whose review
choice is ``discard`` (the choice of seglabel's label config).

The image is found by the task's ``seglabel_key`` (seglabel's export puts it in the data), else
by its image path: ``/data/local-files/?d=PATH``, ``/data/upload/N/xxxxxxxx-NAME`` (the name
Label Studio gave an upload: its 8-character prefix dropped), or any URL's path.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

import numpy as np

from ..exports.brush_rle import BrushError, decode_mask
from .source import NO_LABEL, Item, ItemProblem, Source, SourceError

TOOL = "label-studio"
REGION_TYPES = ("brushlabels", "polygonlabels")
DISCARD = "discard"
_UPLOAD_PREFIX = re.compile(r"^[0-9a-f]{8}-")


def read_labelstudio(path: str | Path) -> Source:
    path = Path(path)
    try:
        tasks = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SourceError(f"{path}: not a Label Studio JSON export ({type(e).__name__}: {e})") from None
    if not isinstance(tasks, list) or not all(isinstance(t, dict) and "data" in t for t in tasks):
        raise SourceError(f"{path}: not a Label Studio JSON export (a list of tasks, each with its 'data'); "
                          "export the project as JSON")
    source = Source(TOOL, str(path.resolve()), {}, [], tells_reviewed=True)
    label_ids: dict[str, int] = {}
    for task in tasks:
        ref, names = _names(task)
        annotation, why = _annotation(task)
        if annotation is None:
            source.skipped.append((ref, why))
            continue
        regions = [r for r in annotation.get("result") or [] if isinstance(r, dict) and r.get("type") in REGION_TYPES]
        if _discarded(annotation):
            source.skipped.append((ref, f"marked {DISCARD!r} in the review"))
            continue
        if not regions:
            source.skipped.append((ref, "its annotation has no brush or polygon regions"))
            continue
        try:
            size = _size(regions)
            painted = [(label_ids.setdefault(_label(r), len(label_ids)), r) for r in regions]
        except ItemProblem as e:
            source.problems.append((ref, str(e)))
            continue
        when = annotation.get("updated_at") or annotation.get("created_at")
        source.items.append(Item(ref, names, size, lambda painted=painted, size=size: _paint(painted, size),
                                 when if isinstance(when, str) else None))
    source.labels = {i: name for name, i in label_ids.items()}
    return source


def _names(task: dict[str, Any]) -> tuple[str, tuple[str, ...]]:
    data = task.get("data") or {}
    names = []
    if isinstance(data.get("seglabel_key"), str):
        names.append(data["seglabel_key"])
    image = data.get("image")
    if not isinstance(image, str):  # another label config: the first value that looks like a file
        image = next((v for v in data.values() if isinstance(v, str) and "/" in v), None)
    if isinstance(image, str):
        names += _image_paths(image)
    ref = (names[-1] if names else None) or f"task {task.get('id', '?')}"
    return ref, tuple(names)


def _image_paths(url: str) -> list[str]:
    parsed = urlparse(url)
    if parsed.path.endswith("/data/local-files/") or parsed.path.endswith("/data/local-files"):
        d = parse_qs(parsed.query).get("d")
        return [d[0]] if d else []
    path = unquote(parsed.path)
    name = path.rsplit("/", 1)[-1]
    if "/data/upload/" in path and _UPLOAD_PREFIX.match(name):
        return [path, _UPLOAD_PREFIX.sub("", name)]
    return [path] if path else []


def _annotation(task: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
    given = [a for a in task.get("annotations") or [] if isinstance(a, dict)]
    if not given:
        return None, "no annotation (only predictions)" if task.get("predictions") else "no annotation"
    live = [a for a in given if not a.get("was_cancelled")]
    if not live:
        return None, "its annotations were cancelled (skipped by the annotator)"
    best = max(live, key=lambda a: (bool(a.get("ground_truth")), str(a.get("updated_at") or a.get("created_at") or ""),
                                     a.get("id") if isinstance(a.get("id"), int) else 0))
    return best, ""


def _discarded(annotation: dict[str, Any]) -> bool:
    for r in annotation.get("result") or []:
        if isinstance(r, dict) and r.get("type") == "choices" and DISCARD in ((r.get("value") or {}).get("choices") or []):
            return True
    return False


def _label(region: dict[str, Any]) -> str:
    labels = (region.get("value") or {}).get(region["type"])
    if not isinstance(labels, list) or len(labels) != 1 or not isinstance(labels[0], str):
        raise ItemProblem(f"a region with labels {labels!r}, not one label; fix it in Label Studio")
    return labels[0]


def _size(regions: list[dict[str, Any]]) -> tuple[int, int]:
    sizes = {(r.get("original_width"), r.get("original_height")) for r in regions}
    if len(sizes) != 1:
        raise ItemProblem(f"regions of different image sizes ({', '.join(f'{w}x{h}' for w, h in sorted(sizes, key=str))})")
    w, h = sizes.pop()
    if not (isinstance(w, int) and isinstance(h, int) and w > 0 and h > 0):
        raise ItemProblem(f"regions without the image's size (original_width {w!r}, original_height {h!r})")
    return w, h


def _paint(painted: list[tuple[int, dict[str, Any]]], size: tuple[int, int]) -> np.ndarray:
    w, h = size
    ids = np.full((h, w), NO_LABEL, np.int32)
    for label_id, region in painted:
        value = region.get("value") or {}
        if region["type"] == "brushlabels":
            if value.get("format", "rle") != "rle" or "rle" not in value:
                raise ItemProblem(f"a brush region of format {value.get('format')!r} without 'rle'")
            try:
                ids[decode_mask(value["rle"], w, h)] = label_id
            except BrushError as e:
                raise ItemProblem(f"a brush region of {value.get('brushlabels')}: {e}") from None
        else:
            ids[_polygon(value.get("points"), w, h)] = label_id
    return ids


def _polygon(points: Any, width: int, height: int) -> np.ndarray:
    """A polygon in percent of the image, as COCO rasterises polygons (pycocotools)."""
    from pycocotools import mask as mask_util

    try:
        flat = [float(c) * scale / 100 for x, y in points for c, scale in ((x, width), (y, height))]
    except (TypeError, ValueError):
        raise ItemProblem(f"a polygon region whose points are not [x, y] pairs: {str(points)[:80]}") from None
    if len(flat) < 6:
        raise ItemProblem("a polygon region with fewer than 3 points")
    rle = mask_util.merge(mask_util.frPyObjects([flat], height, width))
    return mask_util.decode(rle).astype(bool)
