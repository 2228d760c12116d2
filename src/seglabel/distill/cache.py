"""The cached teacher: each training photo labelled once per scale level, before training.

A crop drawn at random scale ``f`` takes the labels of the level nearest to ``f`` (levels a factor
of about sqrt(2) apart, from --scale-min to --scale-max), resized with the photo; the teacher saw
the whole photo at that scale, as annotate labels it. ``OUT/teacher/<level>/<key>.png`` holds the
mask (annotate's encoding), ``<key>.conf.png`` the confidence and ``<key>.margin.png`` the margin
between the two best classes' logits (16-bit, 1/1000 steps up to 65.5: probabilities round to 1
where a CLIP teacher is sure, margins keep ranking), written atomically, the mask last, so a run
killed while labelling goes on where it stopped. ``teacher.json`` says which teacher and
levels made them; a different one starts the folder over.
"""
from __future__ import annotations

import io
import logging
import math
import shutil
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from ..images import ImageError, load_image
from ..writers import encode_mask_png, encode_scores_png, to_json, write_bytes, write_json
from .teacher import Teacher

log = logging.getLogger("seglabel")
FOLDER, RECORD = "teacher", "teacher.json"
LEVEL_RATIO = math.sqrt(2)
MARGIN_STEPS = 1000  # margin PNGs: value / 1000 = logit margin


def scale_levels(scale_min: float, scale_max: float) -> list[float]:
    """Scale factors from ``scale_min`` to ``scale_max``, evenly spaced in log scale, about sqrt(2)
    apart (0.5-2: 0.5, 0.71, 1, 1.41, 2), rounded to 3 decimals."""
    if scale_max <= scale_min:
        return [round(scale_min, 3)]
    n = max(1, round(math.log(scale_max / scale_min) / math.log(LEVEL_RATIO)))
    return [round(scale_min * (scale_max / scale_min) ** (i / n), 3) for i in range(n + 1)]


def nearest_level(factor: float, levels: Sequence[float]) -> int:
    return min(range(len(levels)), key=lambda i: abs(math.log(factor / levels[i])))


class TeacherCache:
    def __init__(self, out: Path, levels: Sequence[float], base_size: int):
        self.folder, self.levels, self.base_size = Path(out) / FOLDER, list(levels), base_size

    def short_side(self, level: int) -> int:
        return max(1, round(self.base_size * self.levels[level]))

    def paths(self, level: int, key: str) -> tuple[Path, Path, Path]:
        """(confidence, margin, mask) files of a photo at a level, in the order they are written."""
        folder = self.folder / f"{self.levels[level]:g}"
        return folder / f"{key}.conf.png", folder / f"{key}.margin.png", folder / f"{key}.png"

    def read(self, level: int, key: str, ignore_index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(class ids int64 with ``ignore_index``, confidence, margin; both float32) at a level."""
        from .data import read_mask, read_scores

        conf_path, margin_path, mask_path = self.paths(level, key)
        with Image.open(margin_path) as im:
            margin = np.asarray(im).astype(np.float32) / MARGIN_STEPS
        return read_mask(mask_path, ignore_index), read_scores(conf_path), margin

    def build(self, teacher: Teacher, items: Sequence[tuple[str, Path]], identity: dict[str, Any],
              rank: int = 0, world: int = 1, batch_size: int = 16, barrier=lambda: None) -> int:
        """Label what is missing (this rank's share, after rank 0 has checked the folder and every
        rank passed ``barrier``); returns how many photos were labelled."""
        if rank == 0:
            self._start({"teacher": identity, "levels": self.levels, "base_size": self.base_size})
        barrier()
        mine = list(items)[rank::world]
        done = 0
        for level in range(len(self.levels)):
            todo = [(key, path) for key, path in mine if not all(p.is_file() for p in self.paths(level, key))]
            if todo:
                log.info(f"teacher: labelling {len(todo)} photos at short side {self.short_side(level)} "
                         f"(scale {self.levels[level]:g}) into {self.folder}")
            for start in range(0, len(todo), batch_size):
                chunk = _readable(todo[start:start + batch_size])
                if not chunk:
                    continue
                labelled = teacher.photos([rgb for _, rgb in chunk], self.short_side(level), batch_size)
                for (key, _), (mask, conf, margin) in zip(chunk, labelled):
                    conf_path, margin_path, mask_path = self.paths(level, key)
                    write_bytes(conf_path, encode_scores_png(conf))
                    write_bytes(margin_path, _margin_png(margin))
                    write_bytes(mask_path, encode_mask_png(mask))  # last: the photo is done
                done += len(chunk)
        return done

    def _start(self, record: dict[str, Any]) -> None:
        """A cache made by another teacher, levels or scale is removed (it is ours: OUT/teacher)."""
        path = self.folder / RECORD
        try:
            same = path.is_file() and to_json(record) == to_json(_load(path))
        except ValueError:
            same = False
        if not same:
            if self.folder.is_dir():
                log.info(f"teacher: {self.folder} was made by another teacher or scale; labelling again")
                shutil.rmtree(self.folder)
            write_json(path, record)


def _margin_png(margin: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.clip(np.round(margin * MARGIN_STEPS), 0, 65535).astype(np.uint16)).save(buf, format="PNG")
    return buf.getvalue()


def _load(path: Path) -> Any:
    import json

    return json.loads(path.read_text(encoding="utf-8"))


def _readable(chunk: list[tuple[str, Path]]) -> list[tuple[str, np.ndarray]]:
    out = []
    for key, path in chunk:
        try:
            out.append((key, load_image(path)))
        except ImageError as e:  # changed since the scan: reported, and left out of training
            log.warning(f"{path}: skipped by the teacher ({e.reason})")
    return out

