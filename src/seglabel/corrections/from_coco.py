"""COCO instances JSON (``images``, ``annotations``, ``categories``): a file, or a zip holding
``annotations/*.json`` (CVAT's "COCO 1.0" export, seglabel's ``coco_1.0.zip``).

Each annotation's segmentation (polygons, or RLE compressed or not) is decoded with pycocotools
and painted with its category, in the order of the file, a later annotation over an earlier one;
pixels no annotation covers are ignored pixels. Categories are matched to the label set by name.
An image without annotations was not annotated: left as it was.
"""
from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .source import NO_LABEL, Item, ItemProblem, Source, SourceError

TOOL = "coco"


def read_coco(path: str | Path) -> Source:
    path = Path(path)
    coco = _load(path)
    try:
        labels = {int(c["id"]): str(c["name"]) for c in coco["categories"]}
        images = {int(i["id"]): i for i in coco["images"]}
        by_image: dict[int, list[dict[str, Any]]] = {}
        for a in coco["annotations"]:
            by_image.setdefault(int(a["image_id"]), []).append(a)
    except (KeyError, TypeError, ValueError) as e:
        raise SourceError(f"{path}: not a COCO instances file ({type(e).__name__}: {e})") from None
    source = Source(TOOL, str(path.resolve()), labels, [])
    for a in coco["annotations"]:
        if isinstance(a, dict) and a.get("category_id") not in labels and isinstance(a.get("category_id"), int):
            source.unknown[a["category_id"]] = f"category_id {a['category_id']} (no category of the file)"
    for image_id, image in images.items():
        name = str(image.get("file_name") or image_id)
        annotations = by_image.get(image_id)
        if not annotations:
            source.skipped.append((name, "no annotation"))
            continue
        try:
            size = (int(image["width"]), int(image["height"]))
        except (KeyError, TypeError, ValueError):
            source.problems.append((name, "the image has no width and height"))
            continue
        source.items.append(Item(name, (name,), size, _painter(annotations, size)))
    unknown_images = sorted(set(by_image) - set(images))
    if unknown_images:
        source.problems.append((f"image_id {unknown_images[0]}", f"{len(unknown_images)} image ids of annotations "
                                "are no image of the file; those annotations are not imported"))
    return source


def _load(path: Path) -> dict[str, Any]:
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                members = sorted(n for n in z.namelist() if n.startswith("annotations/") and n.endswith(".json"))
                if len(members) != 1:
                    raise SourceError(f"{path}: a COCO zip holds one annotations/*.json, this one {len(members)}")
                coco = json.loads(z.read(members[0]))
        else:
            coco = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise SourceError(f"{path}: not a COCO file ({type(e).__name__}: {e})") from None
    if not isinstance(coco, dict) or not {"images", "annotations", "categories"} <= set(coco):
        raise SourceError(f"{path}: not a COCO instances file (needs images, annotations and categories)")
    return coco


def _painter(annotations: list[dict[str, Any]], size: tuple[int, int]) -> Callable[[], np.ndarray]:
    def paint() -> np.ndarray:
        from pycocotools import mask as mask_util

        w, h = size
        ids = np.full((h, w), NO_LABEL, np.int32)
        for a in annotations:
            seg, category = a.get("segmentation"), a.get("category_id")
            if not isinstance(category, int):
                raise ItemProblem(f"annotation {a.get('id')}: category_id {category!r}")
            try:
                if isinstance(seg, list):  # polygons
                    rle = mask_util.merge(mask_util.frPyObjects([[float(v) for v in p] for p in seg], h, w))
                elif isinstance(seg, dict) and isinstance(seg.get("counts"), list):  # uncompressed RLE
                    rle = mask_util.frPyObjects(seg, *seg["size"])
                elif isinstance(seg, dict) and isinstance(seg.get("counts"), str):
                    rle = {"size": seg["size"], "counts": seg["counts"].encode("ascii")}
                else:
                    raise ItemProblem(f"annotation {a.get('id')}: its segmentation is neither polygons nor RLE")
                if list(rle["size"]) != [h, w]:
                    raise ItemProblem(f"annotation {a.get('id')}: an RLE of {rle['size'][1]}x{rle['size'][0]}, "
                                      f"its image is {w}x{h}")
                ids[mask_util.decode(rle).astype(bool)] = category
            except ItemProblem:
                raise
            except Exception as e:  # noqa: BLE001 - pycocotools' own errors for a malformed segmentation
                raise ItemProblem(f"annotation {a.get('id')}: its segmentation cannot be decoded "
                                  f"({type(e).__name__}: {e})") from None
        return ids

    return paint
