"""FiftyOne: a dataset by name (when ``fiftyone`` imports in this Python), or what
``dataset.export(DIR, dataset_type=fo.types.ImageSegmentationDirectory, label_field=F)`` writes
(seglabel's own export has the same layout): ``labels/<name>.png`` and the photos in ``data/`` or
a ``data.json`` manifest.

Mask values: a dataset's mask targets for the field (``dataset.mask_targets[F]``, else
``default_mask_targets``) name them, matched to the label set by name (a target named ``ignore``
means ignored pixels); without mask targets (an export folder keeps none) they are the run's class
indices, 255 (65535 past 254 classes) ignored, as seglabel exported them. A sample without a mask
in the field was not annotated: left as it was.
"""
from __future__ import annotations

import json
import posixpath
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from ..labelset import LabelSet
from .source import Item, ItemProblem, Source, SourceError

TOOL = "fiftyone"
MASK_SUFFIXES = (".png", ".tif", ".tiff")


def read_fiftyone_dir(path: str | Path, labelset: LabelSet) -> Source:
    path = Path(path)
    labels_dir = path / "labels"
    if not labels_dir.is_dir():
        raise SourceError(f"{path}: not a FiftyOne ImageSegmentationDirectory export (no labels/ folder); export "
                          "with dataset.export(DIR, dataset_type=fo.types.ImageSegmentationDirectory, label_field=...)")
    manifest = _manifest(path / "data.json")
    data = {p.relative_to(path / "data").with_suffix("").as_posix(): p for p in sorted((path / "data").rglob("*"))
            if p.is_file()} if (path / "data").is_dir() else {}
    source = Source(TOOL, str(path.resolve()), dict(enumerate(labelset.names)), [],
                    ignored=frozenset({labelset.ignore_index}))
    for mask in sorted(labels_dir.rglob("*")):
        if not mask.is_file() or mask.suffix.lower() not in MASK_SUFFIXES:
            continue
        uuid = mask.relative_to(labels_dir).with_suffix("").as_posix()
        names = [uuid] + [p for p in (manifest.get(uuid), str(data[uuid]) if uuid in data else None) if p]
        source.items.append(Item(uuid, tuple(names), None, _file_reader(mask)))
    for uuid in sorted(set(manifest) | set(data)):
        if not any((labels_dir / f"{uuid}{suffix}").is_file() for suffix in MASK_SUFFIXES):
            source.skipped.append((manifest.get(uuid) or uuid, "no mask in the export (not annotated)"))
    return source


def _manifest(path: Path) -> dict[str, str]:
    """uuid (the name without extension) -> photo path, from a data.json manifest."""
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SourceError(f"{path}: unreadable manifest ({e})") from None
    if not isinstance(raw, dict):
        raise SourceError(f"{path}: unreadable manifest (not a JSON object)")
    return {posixpath.splitext(str(k))[0]: str(v) for k, v in raw.items()}


def _file_reader(path: Path) -> Callable[[], np.ndarray]:
    def read() -> np.ndarray:
        try:
            with Image.open(path) as img:
                return _ids(np.asarray(img), path.name)
        except (OSError, ValueError) as e:
            raise ItemProblem(f"{path}: unreadable mask ({e})") from None

    return read


def _ids(mask: np.ndarray, what: str) -> np.ndarray:
    if mask.ndim != 2:
        raise ItemProblem(f"{what}: a colour mask (shape {mask.shape}); FiftyOne's RGB mask targets are not read: "
                          "give the field integer mask targets")
    if mask.dtype.kind not in "ui" and mask.dtype != bool:
        raise ItemProblem(f"{what}: a mask of {mask.dtype}, not integer labels")
    return mask.astype(np.int32)


# -- a dataset by name ------------------------------------------------------------------------------
def fiftyone_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("fiftyone") is not None


def read_fiftyone_dataset(name: str, labelset: LabelSet, field: str | None = None) -> Source:
    try:
        import fiftyone as fo
    except ImportError as e:
        raise SourceError(f"{name}: not a file or folder, and fiftyone cannot be imported here to read a dataset "
                          f"of that name ({e}); export the dataset with dataset.export(DIR, "
                          "dataset_type=fo.types.ImageSegmentationDirectory, label_field=...) and import DIR") from None
    if name not in fo.list_datasets():
        raise SourceError(f"{name}: no such file, folder or FiftyOne dataset (datasets: "
                          f"{', '.join(fo.list_datasets()[:8]) or 'none'})")
    dataset = fo.load_dataset(name)
    fields = sorted(dataset.get_field_schema(embedded_doc_type=fo.Segmentation))
    if field is None:
        if len(fields) != 1:
            raise SourceError(f"fiftyone:{name}: {len(fields)} segmentation fields ({', '.join(fields) or 'none'}); "
                              "give --field")
        field = fields[0]
    elif field not in fields:
        raise SourceError(f"fiftyone:{name}: --field {field} is not one of its segmentation fields "
                          f"({', '.join(fields) or 'none'})")
    targets = dataset.mask_targets.get(field) or dataset.default_mask_targets or {}
    if targets and not all(isinstance(k, int) for k in targets):
        raise SourceError(f"fiftyone:{name}: the mask targets of {field} are RGB colours; give it integer mask targets")
    labels = {int(k): str(v) for k, v in targets.items()} or dict(enumerate(labelset.names))
    source = Source(TOOL, f"fiftyone:{name}", labels, [],
                    ignored=frozenset() if targets else frozenset({labelset.ignore_index}))
    for sample in dataset.select_fields([field, "metadata"]):
        label = sample[field]
        if label is None:
            source.skipped.append((sample.filepath, f"no mask in the field {field} (not annotated)"))
            continue
        meta = sample.metadata
        size = (meta.width, meta.height) if meta is not None and meta.width and meta.height else None
        source.items.append(Item(sample.filepath, (sample.filepath,), size, _sample_reader(dataset, sample.id, field),
                                 _when(sample)))
    return source


def _sample_reader(dataset: Any, sample_id: str, field: str) -> Callable[[], np.ndarray]:
    def read() -> np.ndarray:
        label = dataset[sample_id][field]  # read again each time: masks are not all held in memory
        try:
            mask = label.get_mask()
        except Exception as e:  # noqa: BLE001 - FiftyOne's own failures to read its mask
            raise ItemProblem(f"its mask cannot be read ({type(e).__name__}: {e})") from None
        if mask is None:
            raise ItemProblem(f"its {field} has no mask")
        return _ids(np.asarray(mask), field)

    return read


def _when(sample: Any) -> str | None:
    try:
        when = sample.last_modified_at
    except (AttributeError, KeyError):
        return None
    return when.isoformat(timespec="seconds") if isinstance(when, datetime) else None
