"""WebDataset: tar shards ``shard-000000.tar``, ``shard-000001.tar``, ... that ``webdataset``
(``wds.WebDataset(urls)``) reads, three files per image, one after the other:

- ``<key>.<ext>``: the photo's bytes as they are, under its own extension (lower case; ``jpeg``
  as ``jpg``, ``tiff`` as ``tif``);
- ``<key>.seg.png``: the mask, a grayscale PNG of class indices (255, or 65535 past 254 classes,
  = ignored). Not ``<key>.png``: a PNG photo has that name;
- ``<key>.json``: the image's record (seglabel key, file name, size, confidence, the classes
  present with their names and pixel counts, EXIF orientation).

webdataset splits a member's name at the first dot of its last path part, and other readers at
the first dot of the whole name, so the sample key has no dot and no slash: seglabel's key
(``x/a.b`` for ``x/a.b.jpg``) percent-encoded, ``%`` as ``%25``, ``/`` as ``%2F``, ``.`` as
``%2E`` and every byte that is not a letter, digit, ``_``, ``-`` or ``~`` as ``%XX``: one key per
image, and ``urllib.parse.unquote(sample["__key__"])`` gives seglabel's key back.

Beside the shards: ``id2label.json`` (pixel value -> class name) and ``shards.json`` (the shards,
their image counts and the brace pattern to read them all). Each shard is written whole
(``writers.atomic_path``); a rerun rewrites every shard and removes shards of an earlier export
that this one does not have.
"""
from __future__ import annotations

import io
import os
import re
import tarfile
from pathlib import Path
from typing import Callable
from urllib.parse import quote

from ..images import printable
from ..writers import atomic_path, to_json, write_json
from .run_output import RunOutput
from .shards import Plan, Sample, clear_stale, id2label, read_samples

PREFIX = "shard"
SHARD = re.compile(rf"{PREFIX}-\d{{6}}\.tar")
MASK_FIELD = "seg.png"
MTIME = 946684800  # 2000-01-01: the same labels give the same shards, byte for byte


def sample_key(key: str) -> str:
    raw = key.encode("utf-8", "surrogateescape")  # a file name that is not UTF-8 keeps its bytes
    return quote(raw, safe="").replace(".", "%2E")


def shard_name(index: int) -> str:
    return f"{PREFIX}-{index:06d}.tar"


def write_webdataset(run: RunOutput, dest: Path, plan: Plan,
                     on_image: Callable[[], None] | None = None) -> tuple[int, list[str]]:
    """Writes the shards, then ``id2label.json`` and ``shards.json``; returns the number of images
    written and notes for the user."""
    names, counts, turned = [], [], 0
    for index, samples in enumerate(plan.shards):
        name = shard_name(index)
        with atomic_path(dest / name) as tmp:
            with open(tmp, "wb") as f:
                with tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
                    n = 0
                    for sample, photo, mask in read_samples(run, samples, plan):
                        _add_sample(tar, run, sample, photo, mask)
                        n += 1
                        turned += sample.orientation != 1
                        on_image and on_image()
                f.flush()
                os.fsync(f.fileno())
        names.append(name)
        counts.append(n)
    clear_stale(dest, SHARD, names)
    write_json(dest / "id2label.json", id2label(run))
    pattern = names[0] if len(names) == 1 else f"{PREFIX}-{{000000..{len(names) - 1:06d}}}.tar"
    write_json(dest / "shards.json", {"urls": pattern, "images": sum(counts), "mask": MASK_FIELD,
                                      "ignore_index": run.labelset.ignore_index,
                                      "shards": [{"name": s, "images": c} for s, c in zip(names, counts)]})
    notes = plan.notes()
    if turned:
        notes.append(f"{turned} photos carry an EXIF rotation (their record's exif_orientation); their masks are "
                     "of the photo turned upright: apply PIL.ImageOps.exif_transpose to the decoded photo")
    notes.append(f"read with: webdataset.WebDataset('{dest / pattern}').decode()  (photo: the sample's image "
                 f"extension, mask: '{MASK_FIELD}', record: 'json')")
    return sum(counts), notes


def _add_sample(tar: tarfile.TarFile, run: RunOutput, sample: Sample, photo: bytes, mask: bytes) -> None:
    e, classes = sample.entry, run.labelset.classes
    record = {"key": printable(e.key), "file_name": e.file_name, "width": e.width, "height": e.height,
              "confidence": e.confidence, "exif_orientation": sample.orientation,
              "classes": [{"id": k, "name": classes[k].name, "pixels": a} for k, a in e.areas],
              "ignored_pixels": e.ignored_pixels, "ignore_index": run.labelset.ignore_index}
    key = sample_key(e.key)
    for field, data in ((sample.suffix, photo), (MASK_FIELD, mask), ("json", (to_json(record) + "\n").encode())):
        info = tarfile.TarInfo(f"{key}.{field}")
        info.size, info.mtime, info.mode = len(data), MTIME, 0o644
        tar.addfile(info, io.BytesIO(data))


__all__ = ["MASK_FIELD", "sample_key", "shard_name", "write_webdataset"]
