"""Training data of ``seglabel distill``: (image, pseudo-mask) pairs matched by relative path and
checked before training starts (dataset.py samples and augments them). seglabel's own output
folders found under the images (an earlier annotate's masks and overlays) are not training photos:
they are left out and listed, by the rule annotate follows (images.find_images).

Images a person corrected (their record in --pseudo's run says so, as ``records.current_record``
reads it: an import, or a mask edited by hand) are ground truth: their masks are trained on as
written, with or without a teacher (``Pair.corrected``; the training loop keeps them as they are).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import UsageError
from ..images import ImageError, find_images
from ..labelset import LabelSet
from ..layout import MASKS, RECORDS
from ..records import current_record, iter_records, read_record_head
from ..writers import OutputError, OutputFolderError, read_mask as read_mask_file

log = logging.getLogger("seglabel")


class DataError(UsageError):
    """Training data that cannot be used; one line naming the folder or file and the problem."""


@dataclass
class Pair:
    key: str  # relative path without suffix
    image: Path
    mask: Path | None  # None: labels come from an online teacher
    scores: Path | None = None  # the teacher's confidence per pixel (annotate --save-scores)
    corrected: bool = False  # a person's mask: trained on as written, never relabelled by a teacher


@dataclass
class PairScan:
    pairs: list[Pair]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    outputs: list[str] = field(default_factory=list)  # seglabel output folders under the images, left out
    run_records: bool = False  # --pseudo is a run with records: the corrected count is told, 0 included

    @property
    def corrected(self) -> int:
        return sum(pair.corrected for pair in self.pairs)

    def corrected_note(self) -> str:
        """" (N corrected by a person: ...)" for the plan and the log; "" without a run's records."""
        if not self.run_records:
            return ""
        return f" ({self.corrected} corrected by a person: trained on as written, no teacher)"

    def report(self) -> None:
        """Every skip on its own line (warnings: shown under --quiet too), then the count."""
        for folder in self.outputs:
            log.warning(f"{folder}: a seglabel run's output (masks, overlays...), not training photos: skipped")
        for path, reason in self.skipped:
            log.warning(f"skipped: {path}: {reason}")
        log.info(f"{len(self.pairs)} training images{self.corrected_note()}"
                 + (f", {len(self.skipped)} skipped" if self.skipped else "")
                 + (f", {len(self.outputs)} seglabel output folders left out" if self.outputs else ""))


@dataclass
class Corrections:
    """The images of --pseudo's run whose masks a person made, by their records."""
    masks: dict[str, Path] = field(default_factory=dict)  # key -> the corrected mask
    problems: dict[str, tuple[str, str]] = field(default_factory=dict)  # key -> (path, why it cannot be used)
    found: bool = False  # the folder is a run with records


def find_corrections(run: Path, labelset: LabelSet) -> Corrections:
    """Every record of ``run`` as ``records.current_record`` reads it (the one reader: an imported
    correction, or a mask edited by hand since it was written). A person's mask that cannot be used,
    or a record that cannot be read (it may be a person's), is a problem: that image is skipped,
    never handed to a teacher in its place."""
    if not (run / RECORDS).is_dir():
        return Corrections()
    found = Corrections(found=True)
    for key, rel in iter_records(run):
        record_file = run / rel
        try:
            head = read_record_head(record_file)
        except OutputError as e:
            found.problems[key] = (str(record_file), str(e).split(": ", 1)[-1])
            continue
        now = current_record(run, key, labelset, stored=head)
        mask = run / MASKS / f"{key}.png"
        if now.problem:
            if head.get("corrected") or mask.exists():  # a missing mask nobody corrected: the teacher's to label
                found.problems[key] = now.problem
        elif now.record.get("corrected"):
            found.masks[key] = mask
    return found


def mask_files(folder: Path) -> dict[str, Path]:
    """PNG masks under ``folder`` keyed by relative path without suffix (hidden entries skipped)."""
    out: dict[str, Path] = {}
    for path in sorted(folder.rglob("*.png")):
        rel = path.relative_to(folder)
        if path.is_file() and not any(part.startswith(".") for part in rel.parts):
            out[rel.with_suffix("").as_posix()] = path
    return out


def image_size(path: Path) -> tuple[int, int]:
    """(H, W) as ``load_image`` will return it: EXIF rotations swap the sides."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            orientation = im.getexif().get(0x0112, 1)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ImageError(path, f"not an image PIL can read ({e})") from None
    return (w, h) if orientation in (5, 6, 7, 8) else (h, w)


def read_mask(path: Path, ignore_index: int) -> np.ndarray:
    """Class ids as int64 (writers.read_mask); 255 of an 8-bit mask is ignore whatever the label set
    (as annotate writes it), as is 65535 of a 16-bit one."""
    raw = read_mask_file(path)
    ids = raw.astype(np.int64)
    ids[raw == (255 if raw.dtype == np.uint8 else 65535)] = ignore_index
    return ids


def read_scores(path: Path) -> np.ndarray:
    """annotate's 16-bit confidence PNG -> float32 probabilities in [0, 1]."""
    with Image.open(path) as im:
        if im.mode not in ("I", "I;16", "I;16L", "I;16B", "L"):
            raise DataError(f"{path}: a {im.mode} image, not a confidence map")
        raw = np.asarray(im)
    return raw.astype(np.float32) / (255.0 if raw.dtype == np.uint8 else 65535.0)


def scan_pairs(images: Path, masks: Path | None, num_classes: int, ignore_index: int,
               scores: Path | None = None, exclude: tuple[Path, ...] = (),
               corrections: Corrections | None = None) -> PairScan:
    """Match images and masks (and, given ``scores``, confidence maps) by relative path and check
    each mask: readable, the image's size, class ids inside the label set. ``masks`` None: a
    teacher labels the images, except those in ``corrections`` (a person's masks, checked the same
    way; without confidence maps: there is no teacher's confidence to filter them by). Problems
    become reported skips; no usable pair is an error. Folders in ``exclude`` (distill's own
    --out) are never entered; seglabel's output folders are left out and listed (images.find_images)."""
    corrections = corrections or Corrections()
    if not images.is_dir():
        raise DataError(f"{images}: no such image folder (--images)")
    found = find_images([images], exclude=exclude)
    items, runs = found.items, found.skipped_outputs
    skipped = [(p.path, p.reason) for p in found.problems]
    if masks is None and not items:
        raise DataError(f"{images}: no training images found" + (" outside seglabel output folders" if runs else ""))
    if masks is not None and not masks.is_dir():
        raise DataError(f"{masks}: no such mask folder")
    by_key = mask_files(masks) if masks is not None else {}
    score_files = mask_files(scores) if scores is not None else {}
    pairs = []
    for item in items:
        mask = by_key.pop(item.key, None)
        if item.key in corrections.problems:
            skipped.append(corrections.problems[item.key])
            continue
        written = corrections.masks.get(item.key)
        if masks is None and written is None:  # the teacher's to label
            pairs.append(Pair(item.key, item.path, None))
            continue
        mask = written or mask
        if mask is None:
            skipped.append((str(item.path), f"no mask {item.key}.png in {masks}"))
            continue
        score = None if written else score_files.get(item.key)
        if scores is not None and score is None and not written:
            skipped.append((str(mask), f"no confidence map {item.key}.png in {scores}"))
            continue
        problem = _pair_problem(item.path, mask, score, num_classes, ignore_index)
        if problem:
            skipped.append(problem)
            continue
        pairs.append(Pair(item.key, item.path, mask, score, corrected=written is not None))
    skipped += [(str(p), "mask without an image") for p in by_key.values()]
    if not pairs:
        first = f" (first problem: {skipped[0][0]}: {skipped[0][1]})" if skipped else ""
        where = f"{images} and {masks}" if masks is not None else str(images)
        raise DataError(f"no usable (image, mask) pair in {where}{first}")
    return PairScan(pairs, skipped, runs, run_records=corrections.found)


def _pair_problem(image: Path, mask: Path, score: Path | None, num_classes: int,
                  ignore_index: int) -> tuple[str, str] | None:
    """(file, why) when ``mask`` (or ``score``) cannot train on ``image``, else None."""
    try:
        ids = read_mask(mask, ignore_index)
        size = image_size(image)
        conf_shape = read_scores(score).shape if score is not None else size
    except OutputFolderError as e:
        return str(mask), str(e).split(": ", 1)[-1]
    except (OSError, ValueError, ImageError, SyntaxError, Image.DecompressionBombError) as e:
        return str(mask), f"cannot be read: {e}"
    if ids.shape != size or conf_shape != size:
        bad = mask if ids.shape != size else score
        shape = ids.shape if ids.shape != size else conf_shape
        return str(bad), f"size {shape[1]}x{shape[0]} differs from its image {size[1]}x{size[0]}"
    bad_ids = ids[((ids >= num_classes) & (ids != ignore_index)) | (ids < 0)]
    if bad_ids.size:
        return str(mask), (f"class id {int(bad_ids.max())} is outside the label set "
                           f"(0..{num_classes - 1}, {ignore_index} = ignore)")
    return None
