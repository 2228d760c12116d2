"""What the dataset exports (``hf``, ``webdataset``) share: every image paired with its photo and
checked before anything is written, the shards planned, the bytes of each mask, and the
clearing of what an earlier export left that this one does not rewrite.

Photos go in as they are (their bytes, never re-encoded). Masks go in as annotate's grayscale
PNGs of class indices: copied as they are, or re-encoded where an older output holds palette
PNGs. An image is left out, with one note for all such images, when its photo is not found or
cannot be read, or when the photo's size as annotate saw it (EXIF orientation applied) is not
its mask's: a photo changed since it was labelled would be paired with labels that do not fit it.
"""
from __future__ import annotations

import io
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from PIL import Image

from ..images import printable
from ..writers import encode_mask_png, temporary_target
from .run_output import ImageEntry, OutputFolderError, RunOutput

DEFAULT_SHARD_IMAGES = 1000
MAX_SHARD_BYTES = 500 << 20  # photos + masks; the Hub's and webdataset's usual shard size
ORIENTATION = 0x0112  # the EXIF tag
TURNED = (5, 6, 7, 8)  # orientations that swap width and height
PHOTO_NOT_FOUND = "photo not found"


@dataclass(frozen=True)
class Sample:
    entry: ImageEntry
    photo: Path
    suffix: str  # the photo's extension, lower case, without the dot
    orientation: int  # the photo's EXIF orientation (1: none); its mask is of the photo turned upright
    nbytes: int  # photo and mask file sizes, for planning shards


@dataclass
class Plan:
    shards: list[list[Sample]]
    left_out: list[tuple[str, str]] = field(default_factory=list)  # (file_name, reason), one per image

    @property
    def images(self) -> int:
        return sum(len(s) for s in self.shards)

    def leave_out(self, entry: ImageEntry, reason: str) -> None:
        self.left_out.append((printable(entry.file_name), reason))

    def notes(self) -> list[str]:
        """What to do about the images left out (each is listed in ``left_out``)."""
        if any(reason == PHOTO_NOT_FOUND for _, reason in self.left_out):
            return ["a photo not found needs --images DIR, the folder the photos were labelled from"]
        return []


def plan(run: RunOutput, shard_images: int = DEFAULT_SHARD_IMAGES, max_bytes: int = MAX_SHARD_BYTES) -> Plan:
    """Each image checked (headers only) and the shards, in key order: at most ``shard_images``
    images and about ``max_bytes`` of photos and masks each (an image larger than that alone)."""
    if shard_images < 1:
        raise OutputFolderError(f"--shard-size {shard_images}: must be at least 1")
    result = Plan([])
    size = 0
    for entry in run.entries:
        sample = _checked(run, entry)
        if isinstance(sample, str):
            result.leave_out(entry, sample)
            continue
        if not result.shards or len(result.shards[-1]) >= shard_images or size + sample.nbytes > max_bytes:
            result.shards.append([])
            size = 0
        result.shards[-1].append(sample)
        size += sample.nbytes
    if not result.shards:
        raise OutputFolderError(f"{run.out}: none of the {len(run.entries)} images can be exported (first: "
                                f"{': '.join(result.left_out[0])}); pass --images DIR, the folder the photos were labelled from")
    return result


def _checked(run: RunOutput, entry: ImageEntry) -> Sample | str:
    """The image's sample, or why it is left out."""
    expected = (entry.width, entry.height)
    photo = run.images.find(entry.file_name)
    if photo is None:
        return PHOTO_NOT_FOUND
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # EXIF and palette notes
            with Image.open(photo) as img:
                raw, orientation = img.size, int(img.getexif().get(ORIENTATION) or 1)
    except Image.DecompressionBombError:
        return "more pixels than PIL opens unless told to, so datasets and webdataset would refuse it too"
    except Exception as e:  # noqa: BLE001 - any failure of PIL's parsers on this one file
        return f"unreadable photo ({type(e).__name__}: {e})"
    upright = raw[::-1] if orientation in TURNED else raw
    if upright != expected:
        return (f"the photo is {upright[0]}x{upright[1]}, its labels {expected[0]}x{expected[1]} "
                "(changed since it was labelled?)")
    mask = run.mask_path(entry)
    try:
        with Image.open(mask) as img:
            mask_size = img.size
        nbytes = os.path.getsize(photo) + os.path.getsize(mask)
    except Exception as e:  # noqa: BLE001 - as above
        return f"unreadable mask {mask.name} ({type(e).__name__}: {e})"
    if mask_size != expected:
        return f"its mask is {mask_size[0]}x{mask_size[1]}, its record {expected[0]}x{expected[1]}"
    return Sample(entry, photo, photo_suffix(photo), orientation if 1 <= orientation <= 8 else 1, nbytes)


def photo_suffix(photo: Path) -> str:
    """The extension a photo is stored under: its own, lower case, with ``jpeg`` as ``jpg`` and
    ``tiff`` as ``tif``, so a data set has one name per format."""
    suffix = photo.suffix.lower().lstrip(".")
    return {"jpeg": "jpg", "tiff": "tif"}.get(suffix, suffix) or "img"


def read_samples(run: RunOutput, samples: Iterable[Sample], plan: Plan) -> Iterator[tuple[Sample, bytes, bytes]]:
    """Each sample with its photo's bytes and its mask PNG (``read_sample``); one that cannot be
    read now is left out in ``plan`` with the reason."""
    for sample in samples:
        got = read_sample(run, sample)
        if isinstance(got, str):
            plan.leave_out(sample.entry, got)
        else:
            yield sample, *got


def read_sample(run: RunOutput, sample: Sample) -> tuple[bytes, bytes] | str:
    """The photo's bytes and the mask as a grayscale PNG of class indices (annotate's file as it
    is, an older palette PNG re-encoded); or why not, if a file changed since ``plan`` looked."""
    path = run.mask_path(sample.entry)
    try:
        photo = sample.photo.read_bytes()
        mask = path.read_bytes()
        with Image.open(io.BytesIO(mask)) as img:
            if img.format == "PNG" and img.mode in ("L", "I;16"):
                return photo, mask
        return photo, encode_mask_png(run.read_mask(sample.entry))
    except (OSError, OutputFolderError) as e:
        return f"unreadable now ({e})"


def id2label(run: RunOutput) -> dict[str, str]:
    """Pixel value -> class name (transformers' ``id2label``); the ignore index is not a class."""
    return {str(i): c.name for i, c in enumerate(run.labelset.classes)}


def clear_stale(folder: Path, ours: re.Pattern, written: Iterable[str]) -> list[str]:
    """Remove the files of ``folder`` named like ours (``ours`` matches the whole name) that this
    export did not write, and temporaries of ours that a killed export left; returns their names.
    Anything else in the folder is the user's and stays."""
    keep = set(written)
    removed = []
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return removed
    for name in names:
        target = temporary_target(name)
        if (target is not None and ours.fullmatch(target)) or (ours.fullmatch(name) and name not in keep):
            try:
                os.unlink(folder / name)
                removed.append(name)
            except OSError:
                pass
    return removed
