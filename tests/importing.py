"""Helpers of the `seglabel import` tests: a run written with seglabel's own writers (records with
the mask's and the photo's fingerprints, as annotate writes them), the changes an annotator makes,
and a snapshot of a folder's files to show what an import left alone."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from PIL import Image

from seglabel.images import file_fingerprint
from seglabel.labelset import parse_labelset
from seglabel.records import write_coco, write_labelled
from seglabel.writers import RUN_FILE, write_json

STREET = {"name": "street", "templates": "none",
          "classes": [{"name": "background", "color": [10, 20, 30]}, {"name": "road", "color": [128, 64, 128]},
                      {"name": "person", "color": [220, 20, 60]}]}
SETTINGS_ID = "0123456789abcdef"


def street_masks() -> dict[str, np.ndarray]:
    a = np.zeros((12, 16), np.uint8)
    a[:, 8:] = 1
    a[0, :3] = 255
    b = np.full((10, 14), 2, np.uint8)
    b[5:, :6] = 255
    c = np.ones((9, 11), np.uint8)
    c[3:6, 3:8] = 2
    return {"a": a, "sub/b": b, "c": c}


def make_run(root: Path, masks: dict[str, np.ndarray], labelset: dict = STREET) -> Path:
    """Photos in root/photos, the run in root/labels (run.json, records, masks, coco.json)."""
    ls = parse_labelset(labelset)
    out, photos = root / "labels", root / "photos"
    rng = np.random.default_rng(0)
    for key, mask in masks.items():
        photo = photos / f"{key}.jpg"
        photo.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (*mask.shape, 3), dtype=np.uint8)).save(photo)
        fingerprint = {"width": mask.shape[1], "height": mask.shape[0], **file_fingerprint(photo)}
        write_labelled(out, key, f"{key}.jpg", mask, ls, settings_id=SETTINGS_ID,
                       confidence=np.full(mask.shape, 0.6, np.float32), photo=fingerprint)
    write_json(out / RUN_FILE, {"seglabel_version": "test", "argv": ["seglabel", "annotate"], "model": "maskclip:test",
                                "input_roots": [str(photos)], "labelset": ls.to_dict(), "labelset_source": "x.yaml",
                                "status": "done"})
    write_coco(out, ls)
    return out


def corrected(mask: np.ndarray) -> np.ndarray:
    """What an annotator makes of a mask: a block repainted as person, a row of ignored pixels road."""
    m = mask.copy()
    m[2:5, 1:4] = 2
    m[m == 255] = 1
    return m


def snapshot(folder: Path) -> dict[str, str]:
    """relative path -> SHA-256 of every file under ``folder`` (lock files aside)."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


def read_mask(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img)
