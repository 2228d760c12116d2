"""Which file is the truth: the mask PNG (people edit it; training reads it), and the per-image
record that describes it.

A record (``records/<key>.json``) starts with the ``settings_id`` of the run that made it, then
fingerprints of what it describes: ``mask`` (bytes, its version: ``mtime_ns`` in a folder, ``etag``
in a bucket, and the SHA-256 of the decoded pixels), ``photo`` (the labelled photo's width, height,
bytes, version: ``mtime_ns``, or a photo at a URL's ``etag``, and SHA-256 of the file)
and, for a mask a person made, ``corrected`` (``by``, ``tool``, ``when``, and ``source`` for an
import); then what coco.json takes: ``file_name``, ``width``, ``height``, ``confidence`` (None for
a corrected mask) and one COCO RLE annotation per class present.

``current_record`` is the one way to read a record: the stored one while its mask is unchanged
(same size and version; or, after a re-save, the same pixels), else one derived from the mask as it
is now, marked corrected "by a person, edited by hand". Every reader (coco.json, merge, preview,
the exports, eval) goes through it, so all of them show the masks as they are.
``write_labelled`` writes a mask and its record (record last: it marks the image done), for
annotate and for imports of corrections. ``write_coco`` streams coco.json from the records.
Every function takes the output as a folder or a bucket prefix (``outputs.open_out``).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, TextIO

import numpy as np

from . import storage
from .images import ImageError, ImageItem, file_fingerprint, oriented_size, photo_fingerprint, read_photo
from .labelset import LabelSet
from .layout import COCO_FILE, MASKS, RECORDS
from .outputs import FolderOut, Out, Stat, open_out
from .writers import OutputError, OutputFolderError, coco_categories, encode_mask_png, image_record, read_mask, to_json

HEAD_BYTES = 4096  # a record's fingerprints fit in its head (a rerun reads only that)
EDITED_BY_HAND = {"by": "person", "tool": "edited by hand"}


def pixel_digest(mask: np.ndarray) -> str:
    """SHA-256 of a label map's pixels (values, not the PNG bytes: a re-saved mask is the same)."""
    values = np.ascontiguousarray(mask, dtype=np.dtype("<u2") if mask.max(initial=0) > 255 else np.uint8)
    digest = hashlib.sha256(f"{values.shape[0]}x{values.shape[1]}:".encode())
    digest.update(values.tobytes())
    return digest.hexdigest()


def mask_fingerprint(out: Out, stat: Stat, mask: np.ndarray) -> dict[str, Any]:
    return {"bytes": stat.size, out.version_key: stat.version, "sha256": pixel_digest(mask)}


def mask_rel(key: str) -> str:
    return f"{MASKS}/{key}.png"


def record_rel(key: str) -> str:
    return f"{RECORDS}/{key}.json"


def write_labelled(out: str | Path | Out, key: str, file_name: str, mask: np.ndarray, labelset: LabelSet, *,
                   settings_id: str | None, confidence: np.ndarray | float | None = None,
                   photo: dict[str, Any] | None = None, corrected: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``masks/<key>.png`` and then ``records/<key>.json`` (each atomically, or each a whole
    object; the record, written last, marks the image done); returns the record. ``photo``: the
    labelled photo's fingerprint (``images.file_fingerprint`` plus ``width`` and ``height``);
    ``corrected``: who made the mask (``{"by": "person", "tool": "label-studio", "source": FILE,
    "when": ISO}``)."""
    out = open_out(out)
    written = out.write_bytes(mask_rel(key), encode_mask_png(mask))
    record: dict[str, Any] = {} if settings_id is None else {"settings_id": settings_id}  # first: runs.py reads it
    record["mask"] = mask_fingerprint(out, written, mask)
    if photo is not None:
        record["photo"] = photo
    if corrected is not None:
        record["corrected"] = corrected
    record.update(image_record(file_name, mask, confidence, labelset))
    out.write_json(record_rel(key), record)
    return record


def read_mask_at(out: Out, rel: str) -> np.ndarray:
    """``writers.read_mask`` of an output's mask (``MaskError`` naming it)."""
    path = getattr(out, "path", None)
    if path is not None:
        return read_mask(path(rel))
    try:
        data = out.read_bytes(rel)
    except OSError as e:
        raise OutputFolderError(f"{out.shown(rel)}: cannot be read ({e})") from None
    return read_mask(out.shown(rel), data)


@dataclass
class Current:
    """A record as its mask now is. ``edited``: derived from a mask changed since (to store);
    ``refresh``: the stored record with its mask's fingerprint brought up to date (a re-saved or
    touched mask, the same pixels); ``problem``: (path, reason) when the mask cannot be used."""
    record: dict[str, Any]
    edited: bool = False
    refresh: dict[str, Any] | None = None
    problem: tuple[str, str] | None = None


def current_record(out: str | Path | Out, key: str, labelset: LabelSet, stored: dict[str, Any] | None = None,
                   stat: Stat | None = None) -> Current:
    """The record for ``masks/<key>.png`` as the mask is now (see the module's doc); ``stat``: the
    mask's, when a listing gave it already."""
    out = open_out(out)
    record_file, path = record_rel(key), mask_rel(key)
    record = stored if stored is not None else read_record(out, record_file)
    st = stat if stat is not None else out.stat(path)
    if st is None:
        return Current(record, problem=(out.shown(path), f"missing, though {out.shown(record_file)} says the image "
                                                         "was labelled; delete the record and rerun seglabel annotate "
                                                         "to label it again"))
    known = record.get("mask") or {}
    if known.get("bytes") == st.size and known.get(out.version_key) == st.version:
        return Current(record)
    try:
        mask = read_mask_at(out, path)
    except OutputFolderError as e:
        return Current(record, problem=(out.shown(path), str(e).removeprefix(f"{out.shown(path)}: ")))
    fingerprint = mask_fingerprint(out, st, mask)
    if known.get("sha256") == fingerprint["sha256"]:
        return Current(record, refresh={**record, "mask": fingerprint})
    problem = _mask_problem(mask, labelset, record)
    if problem:
        return Current(record, problem=(out.shown(path), problem))
    derived = image_record(record.get("file_name", f"{key}.png"), mask, None, labelset)
    if not known and _same_labels(derived, record):  # a record older than fingerprints: the same labels
        return Current(record, refresh={**_head(record), "mask": fingerprint, **_body(record)})
    when = datetime.fromtimestamp(st.mtime_ns / 1e9, timezone.utc) if st.mtime_ns else datetime.now(timezone.utc)
    edited = {**_head(record), "mask": fingerprint,
              "corrected": {**EDITED_BY_HAND, "when": when.isoformat(timespec="seconds")}, **derived}
    return Current(edited, edited=True)


def _head(record: dict[str, Any]) -> dict[str, Any]:
    return {k: record[k] for k in ("settings_id", "photo") if k in record}


def _body(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k not in ("settings_id", "mask", "photo")}


def _same_labels(derived: dict[str, Any], record: dict[str, Any]) -> bool:
    keys = ("width", "height", "annotations")
    return all(derived[k] == record.get(k) for k in keys)


def _mask_problem(mask: np.ndarray, labelset: LabelSet, record: dict[str, Any]) -> str | None:
    """Why an edited mask cannot stand for its image: a value that is no class, or another size."""
    values = np.unique(mask)
    foreign = [int(v) for v in values if v >= len(labelset) and v != labelset.ignore_index]
    if foreign:
        shown = ", ".join(map(str, foreign[:5])) + (" ..." if len(foreign) > 5 else "")
        return (f"holds {shown}, not a class of the label set (0 to {len(labelset) - 1}, {labelset.ignore_index} = "
                "ignored); fix the mask")
    photo = record.get("photo") or record
    size = (photo.get("width"), photo.get("height"))
    if (mask.shape[1], mask.shape[0]) != size:
        return (f"is {mask.shape[1]}x{mask.shape[0]}, but its photo was labelled at {size[0]}x{size[1]}; fix the "
                "mask, or delete it and its record and rerun seglabel annotate to label it again")
    return None


def photo_change(record: dict[str, Any], photo: str | Path | ImageItem) -> tuple[str, dict[str, Any] | None]:
    """Whether the photo (a path, a URL, or an input's item) is still the one ``record`` labelled,
    by the documented rule: the same size and version (mtime; an object's ETag; a tar member's
    mtime): the same; else the SHA-256 of its content decides. Returns (change, photo): change ""
    when it is the same (``photo``: its fingerprint brought up to date when it was only touched,
    else None), else why it differs (one clause). Records older than the photo's fingerprint: a
    photo of another size differs; otherwise it cannot be told apart."""
    item = photo if isinstance(photo, ImageItem) else None
    path = item.path if item is not None else photo
    if item is None and isinstance(path, str) and storage.is_url(path):
        local = storage.local_path(path)
        item = ImageItem(path, os.path.basename(path)) if local is None else None
        path = local if local is not None else path
    if item is not None and item.remote:
        return _remote_photo_change(record, item)
    known = record.get("photo")
    if not known:
        try:
            size = oriented_size(path)
        except ImageError as e:
            return e.reason, None
        labelled = (record.get("width"), record.get("height"))
        return ("" if size == labelled else _other_size(size, labelled)), None
    try:
        st = os.stat(path)
        if st.st_size == known.get("bytes") and st.st_mtime_ns == known.get("mtime_ns"):
            return "", None
        now = file_fingerprint(path)
    except OSError as e:
        return f"cannot be read ({e.strerror or type(e).__name__})", None
    if now["sha256"] == known.get("sha256"):
        return "", {**known, **now}
    try:
        size = oriented_size(path)
    except ImageError as e:
        return e.reason, None
    labelled = (known.get("width"), known.get("height"))
    return (_other_size(size, labelled) if size != labelled else "changed since it was labelled (other content)"), None


def _remote_photo_change(record: dict[str, Any], item: ImageItem) -> tuple[str, dict[str, Any] | None]:
    """``photo_change`` of a photo read through the storage layer: its size and version from the
    listing (or the tar's index, or one HEAD request) first; its bytes only when those differ."""
    known = record.get("photo") or {}
    if known:
        if item.member is not None:
            version = ("mtime_ns", item.member.size, item.member.mtime * 1_000_000_000)
        elif item.listed is not None:
            version = ("etag", item.listed[0], item.listed[1])
        else:
            try:
                found = storage.info(str(item.path))
            except storage.StorageError as e:
                return f"cannot be read ({e.reason})", None
            version = ("etag", found.size, found.etag)
        if version[1] == known.get("bytes") and version[2] and version[2] == known.get(version[0]):
            return "", None
    try:
        data = read_photo(item)
        now = photo_fingerprint(item, data)
        if known and now["sha256"] == known.get("sha256"):
            return "", {**known, **now}
        size = oriented_size(item.path, data)
    except ImageError as e:
        return e.reason, None
    labelled = (known.get("width"), known.get("height")) if known else (record.get("width"), record.get("height"))
    if size != labelled:
        return _other_size(size, labelled), None
    return ("changed since it was labelled (other content)" if known else ""), None


def _other_size(size: tuple[int, int], labelled: tuple) -> str:
    return f"changed since it was labelled (now {size[0]}x{size[1]}, labelled at {labelled[0]}x{labelled[1]})"


# -- reading records ---------------------------------------------------------------------------------
def read_record(out: str | Path | Out, rel: str | None = None) -> dict[str, Any]:
    """The record ``rel`` of the output ``out``; or, ``rel`` None, the record file ``out`` itself."""
    out, rel = _split(out, rel)
    try:
        record = json.loads(out.read_bytes(rel).decode("utf-8"))
    except (OSError, ValueError) as e:
        record, why = None, str(e)
    else:
        why = "not a JSON object"
    if not isinstance(record, dict):
        raise OutputError(f"{out.shown(rel)}: unreadable record ({why}); delete it and rerun to relabel that image")
    return record


def _split(out: str | Path | Out, rel: str | None) -> tuple[Out, str]:
    if rel is None:  # a record file's path
        path = Path(out)
        return FolderOut(path.parent), path.name
    return open_out(out), rel


def read_record_head(out: str | Path | Out, rel: str | None = None) -> dict[str, Any]:
    """The fingerprints of a record (``mask``, ``photo``, ``corrected``) from its first
    ``HEAD_BYTES``, where ``write_labelled`` puts them; the whole record when they are not there
    (records older than the fingerprints, or without a photo). ``OutputError`` if it cannot be read.
    ``rel`` None: ``out`` is the record file."""
    out, rel = _split(out, rel)
    try:
        head = out.read_bytes(rel, 0, HEAD_BYTES)
    except OSError as e:
        raise OutputError(f"{out.shown(rel)}: unreadable record ({getattr(e, 'strerror', None) or e})") from None
    found = parse_record_head(head)
    return found if found is not None else read_record(out, rel)


def parse_record_head(head: bytes) -> dict[str, Any] | None:
    """``read_record_head`` of a record's first ``HEAD_BYTES`` read already; None when the whole
    record is needed (records older than the fingerprints, or without a photo)."""
    text = head.decode("utf-8", "replace")
    found: dict[str, Any] = {}
    decoder = json.JSONDecoder()
    for name in ("mask", "photo", "corrected"):
        at = text.find(f'\n  "{name}": ')
        if at >= 0:
            try:
                found[name], _ = decoder.raw_decode(text, at + len(name) + 7)
            except ValueError:
                return None
    if "mask" not in found or "photo" not in found:
        return None
    return found


def iter_records(out: str | Path | Out) -> Iterator[tuple[str, str]]:
    """(key, rel) of every per-image record under ``out/records``, in sorted key order."""
    out = open_out(out)
    lead = len(RECORDS) + 1
    found = [(rel[lead:-5], rel) for rel in out.listing(RECORDS) if rel.endswith(".json")]
    return iter(sorted(found))


# -- coco.json ----------------------------------------------------------------------------------------
def write_coco(out: str | Path | Out, labelset: LabelSet, info: dict[str, Any] | None = None,
               left_out: list[tuple[str, str]] | None = None, exclude: set[str] | frozenset = frozenset()) -> int:
    """Assemble ``coco.json`` from the records as their masks now are (``stream_coco``), atomically
    (a whole object in a bucket); ``exclude``: keys left out (corrected masks whose photo changed since)."""
    out = open_out(out)
    with out.write_text(COCO_FILE) as f:
        return stream_coco(f, out, labelset, info, left_out, exclude=exclude)


def stream_coco(f: TextIO, out: str | Path | Out, labelset: LabelSet, info: dict[str, Any] | None = None,
                left_out: list[tuple[str, str]] | None = None, keys: set[str] | None = None,
                exclude: set[str] | frozenset = frozenset()) -> int:
    """Write COCO of the records under ``out`` as their masks now are to ``f``, streaming (memory
    does not grow with the number of images); returns the number of images (those of ``keys``
    only, if given). An image whose mask cannot be used is left out and added to ``left_out`` as
    (path, reason); without ``left_out`` it is refused (``OutputFolderError``).

    Image ids follow the sorted relative paths; annotation ids count up in that order."""
    out = open_out(out)
    kept, derived = [], {}  # names only (each record is read when written); derived: edited masks
    masks = out.listing(MASKS)  # one listing, not a request per mask in a bucket
    for key, record_file in iter_records(out):
        if (keys is not None and key not in keys) or key in exclude:
            continue
        st = masks.get(mask_rel(key))
        now = current_record(out, key, labelset, stat=st) if st is not None else current_record(out, key, labelset)
        if now.problem:
            if left_out is None:
                raise OutputFolderError(f"{now.problem[0]}: {now.problem[1]}")
            left_out.append(now.problem)
            continue
        kept.append((key, record_file))
        if now.edited:
            derived[key] = now.record
    f.write('{\n"info": ' + to_json(info or {}))
    f.write(',\n"categories": ' + to_json(coco_categories(labelset)))
    f.write(',\n"images": [')
    for image_id, (key, record_file) in enumerate(kept, start=1):
        rec = derived.get(key) or read_record(out, record_file)
        entry = {"id": image_id, "file_name": rec["file_name"], "width": rec["width"],
                 "height": rec["height"], "confidence": rec.get("confidence")}
        f.write(("\n" if image_id == 1 else ",\n") + to_json(entry))
    f.write('\n],\n"annotations": [')
    ann_id = 0
    for image_id, (key, record_file) in enumerate(kept, start=1):
        for ann in (derived.get(key) or read_record(out, record_file))["annotations"]:
            ann_id += 1
            f.write(("\n" if ann_id == 1 else ",\n") + to_json({"id": ann_id, "image_id": image_id, **ann}))
    f.write("\n]\n}\n")
    return len(kept)
