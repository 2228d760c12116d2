"""Training data of ``seglabel distill``: (image, pseudo-mask) pairs matched by relative path,
checked before training starts, and MaskCLIP+'s augmentations (mmseg's pipeline: rescale 0.5-2,
crop, flip, photometric distortion, normalise, pad).

Every random draw of sample ``n`` comes from a generator seeded with (seed, n), so a batch depends
only on the iteration number: resuming, worker counts and ranks never change what is seen.
seglabel's own run folders found under the images (an earlier annotate's masks and overlays) are
not training photos: they are skipped and counted.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import UsageError
from ..images import ImageError, ImageItem, find_images, load_image
from ..interrupts import leave_signals_to_parent
from ..layout import is_run_folder
from ..writers import OutputFolderError, read_mask as read_mask_file

if TYPE_CHECKING:
    from .cache import TeacherCache

log = logging.getLogger("seglabel")


class DataError(UsageError):
    """Training data that cannot be used; one line naming the folder or file and the problem."""


@dataclass
class Pair:
    key: str  # relative path without suffix
    image: Path
    mask: Path | None  # None: labels come from an online teacher
    scores: Path | None = None  # the teacher's confidence per pixel (annotate --save-scores)


@dataclass
class PairScan:
    pairs: list[Pair]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    run_folders: dict[str, int] = field(default_factory=dict)  # seglabel run folder -> images in it

    def report(self) -> None:
        """Every skip on its own line (warnings: shown under --quiet too), then the count."""
        for folder, n in self.run_folders.items():
            log.warning(f"{folder}: a seglabel run folder (annotate's output), not training photos: "
                        f"its {n} image files skipped")
        for path, reason in self.skipped:
            log.warning(f"skipped: {path}: {reason}")
        runs = sum(self.run_folders.values())
        log.info(f"{len(self.pairs)} training images" + (f", {len(self.skipped)} skipped" if self.skipped else "")
                 + (f", {runs} in {len(self.run_folders)} seglabel run folders left out" if runs else ""))


def outside_run_folders(items: list[ImageItem], root: Path) -> tuple[list[ImageItem], dict[str, int]]:
    """``items`` without those inside a seglabel run folder at or under ``root`` (layout.is_run_folder),
    and how many each such folder held."""
    verdict: dict[str, bool] = {}
    kept, skipped = [], {}
    for item in items:
        folder = str(root)
        inside = None
        for part in [""] + list(Path(item.rel).parts[:-1]):
            folder = os.path.join(folder, part) if part else folder
            if folder not in verdict:
                verdict[folder] = is_run_folder(folder)
            if verdict[folder]:
                inside = folder
                break
        if inside is None:
            kept.append(item)
        else:
            skipped[inside] = skipped.get(inside, 0) + 1
    return kept, skipped


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
               scores: Path | None = None, exclude: tuple[Path, ...] = ()) -> PairScan:
    """Match images and masks (and, given ``scores``, confidence maps) by relative path and check
    each mask: readable, the image's size, class ids inside the label set. Problems become
    reported skips; no usable pair is an error. Folders in ``exclude`` (distill's own --out) are
    never entered; seglabel run folders are left out and counted."""
    if not images.is_dir():
        raise DataError(f"{images}: no such image folder (--images)")
    found = find_images([images], exclude=exclude)
    items, runs = outside_run_folders(found.items, images)
    skipped = [(p.path, p.reason) for p in found.problems]
    if masks is None:
        if not items:
            raise DataError(f"{images}: no training images found" + (" outside seglabel run folders" if runs else ""))
        return PairScan([Pair(i.key, i.path, None) for i in items], skipped, runs)
    if not masks.is_dir():
        raise DataError(f"{masks}: no such mask folder")
    by_key = mask_files(masks)
    score_files = mask_files(scores) if scores is not None else {}
    pairs = []
    for item in items:
        mask = by_key.pop(item.key, None)
        if mask is None:
            skipped.append((str(item.path), f"no mask {item.key}.png in {masks}"))
            continue
        score = score_files.get(item.key)
        if scores is not None and score is None:
            skipped.append((str(mask), f"no confidence map {item.key}.png in {scores}"))
            continue
        try:
            ids = read_mask(mask, ignore_index)
            size = image_size(item.path)
            conf_shape = read_scores(score).shape if score is not None else size
        except OutputFolderError as e:
            skipped.append((str(mask), str(e).split(": ", 1)[-1]))
            continue
        except (OSError, ValueError, ImageError, SyntaxError, Image.DecompressionBombError) as e:
            skipped.append((str(mask), f"cannot be read: {e}"))
            continue
        if ids.shape != size or conf_shape != size:
            bad = mask if ids.shape != size else score
            shape = ids.shape if ids.shape != size else conf_shape
            skipped.append((str(bad), f"size {shape[1]}x{shape[0]} differs from its image {size[1]}x{size[0]}"))
            continue
        bad = ids[((ids >= num_classes) & (ids != ignore_index)) | (ids < 0)]
        if bad.size:
            skipped.append((str(mask), f"class id {int(bad.max())} is outside the label set "
                                       f"(0..{num_classes - 1}, {ignore_index} = ignore)"))
            continue
        pairs.append(Pair(item.key, item.path, mask, score))
    skipped += [(str(p), "mask without an image") for p in by_key.values()]
    if not pairs:
        first = f" (first problem: {skipped[0][0]}: {skipped[0][1]})" if skipped else ""
        raise DataError(f"no usable (image, mask) pair in {images} and {masks}{first}")
    return PairScan(pairs, skipped, runs)


@dataclass(frozen=True)
class Augment:
    crop: int = 512
    base_size: int = 512  # before the random factor, the short side is resized to this
    scale_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75  # mmseg: retry crops that one class fills more than this
    flip: bool = True
    photometric: bool = True


class PairDataset(torch.utils.data.Dataset):
    """Item ``n`` (a global sample number) -> (normalised image crop, int64 mask crop, sureness).

    The sample number picks the pair (a fresh permutation per epoch) and seeds the augmentation.
    The mask is the pair's, or with a cached teacher its labels at the level nearest the drawn
    scale (sureness: the margin of its two best classes, else an empty tensor); with an online
    teacher it is 0 on the image and ``ignore`` on the padding."""

    def __init__(self, pairs: list[Pair], aug: Augment, mean, std, ignore_index: int, seed: int = 0,
                 min_confidence: float = 0.0, cache: "TeacherCache | None" = None):
        self.pairs, self.aug, self.ignore, self.seed, self.cache = pairs, aug, ignore_index, seed, cache
        self.min_confidence = min_confidence
        self.mean = torch.tensor(mean).view(3, 1, 1) * 255
        self.std = torch.tensor(std).view(3, 1, 1) * 255

    def __len__(self) -> int:
        return 1 << 62  # indexed by sample number, never iterated to the end

    def pair_index(self, n: int) -> int:
        epoch, pos = divmod(n, len(self.pairs))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return int(torch.randperm(len(self.pairs), generator=g)[pos])

    def __getitem__(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pair = self.pairs[self.pair_index(n)]
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + 7919 * n + 1)
        rand = lambda: float(torch.rand((), generator=g))  # noqa: E731
        lo, hi = self.aug.scale_range
        factor = lo + rand() * (hi - lo)
        sure = None
        try:
            rgb = load_image(pair.image)
            if self.cache is not None:
                from .cache import nearest_level

                mask, conf, sure = self.cache.read(nearest_level(factor, self.cache.levels), pair.key, self.ignore)
            elif pair.mask:
                mask, conf = read_mask(pair.mask, self.ignore), None
            else:
                mask, conf = np.zeros(rgb.shape[:2], np.int64), None
            if pair.scores is not None:
                conf = read_scores(pair.scores)
            if conf is not None and self.min_confidence > 0:
                mask[conf < self.min_confidence] = self.ignore
        except (ImageError, OSError, ValueError) as e:  # changed on disk since the scan
            log.warning(f"{pair.image}: skipped this time ({e})")
            return self[n + 1]
        return self.augment(torch.from_numpy(rgb).permute(2, 0, 1).float(), torch.from_numpy(mask),
                            None if sure is None else torch.from_numpy(sure), factor, rand)

    def augment(self, img: torch.Tensor, mask: torch.Tensor, sure: torch.Tensor | None, factor: float,
                rand) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        a = self.aug
        h, w = img.shape[1:]
        scale = a.base_size * factor / min(h, w)
        size = max(1, round(h * scale)), max(1, round(w * scale))
        img = F.interpolate(img[None], size=size, mode="bilinear", align_corners=False, antialias=scale < 1)[0]
        mask = F.interpolate(mask[None, None].float(), size=size, mode="nearest")[0, 0].long()
        if sure is not None:  # labels of the photo at another size (a cached level) follow it the same way
            sure = F.interpolate(sure[None, None].float(), size=size, mode="nearest")[0, 0]
        top, left = self.random_crop(mask, rand)
        c = a.crop
        img, mask = img[:, top:top + c, left:left + c], mask[top:top + c, left:left + c]
        sure = sure[top:top + c, left:left + c] if sure is not None else None
        if a.flip and rand() < 0.5:
            img, mask = img.flip(-1), mask.flip(-1)
            sure = sure.flip(-1) if sure is not None else None
        if a.photometric:
            img = photometric_distortion(img, rand)
        img = (img - self.mean) / self.std
        ph, pw = a.crop - img.shape[1], a.crop - img.shape[2]
        img = F.pad(img, (0, pw, 0, ph), value=0.0)  # 0 after normalising: the mean colour, as mmseg
        mask = F.pad(mask, (0, pw, 0, ph), value=self.ignore)
        sure = F.pad(sure, (0, pw, 0, ph), value=0.0) if sure is not None else torch.zeros(0)
        return img, mask, sure

    def random_crop(self, mask: torch.Tensor, rand) -> tuple[int, int]:
        """(top, left) of a crop that no class fills beyond ``cat_max_ratio`` (mmseg), 10 tries."""
        c = self.aug.crop
        h, w = mask.shape
        for _ in range(10):
            top, left = int(rand() * (max(h - c, 0) + 1)), int(rand() * (max(w - c, 0) + 1))
            m = mask[top:top + c, left:left + c]
            _, counts = m[m != self.ignore].unique(return_counts=True)
            if len(counts) > 1 and counts.max() / counts.sum() < self.aug.cat_max_ratio:
                break
        return top, left


def photometric_distortion(img: torch.Tensor, rand) -> torch.Tensor:
    """mmseg's PhotoMetricDistortion on a 0-255 float image: brightness +-32, contrast 0.5-1.5,
    saturation 0.5-1.5, hue +-18 (of 180), each with probability 1/2, contrast first or last."""
    from torchvision.transforms.v2 import functional as TF

    uniform = lambda lo, hi: lo + rand() * (hi - lo)  # noqa: E731
    if rand() < 0.5:
        img = img + uniform(-32, 32)
    contrast_first = rand() < 0.5
    if contrast_first and rand() < 0.5:
        img = img * uniform(0.5, 1.5)
    img = img.clamp(0, 255) / 255
    if rand() < 0.5:
        img = TF.adjust_saturation(img, uniform(0.5, 1.5))
    if rand() < 0.5:
        img = TF.adjust_hue(img, uniform(-18, 18) / 180)
    img = img * 255
    if not contrast_first and rand() < 0.5:
        img = img * uniform(0.5, 1.5)
    return img.clamp(0, 255)


class SampleNumbers(torch.utils.data.Sampler):
    """The sample numbers rank ``rank`` reads from iteration ``start`` on: iteration i of the global
    batch B holds numbers i*B .. i*B+B-1, and each rank takes its consecutive share."""

    def __init__(self, start: int, iters: int, global_batch: int, rank: int, world: int):
        self.start, self.iters, self.b, self.rank, self.local = start, iters, global_batch, rank, global_batch // world

    def __iter__(self):
        for i in range(self.start, self.iters):
            first = i * self.b + self.rank * self.local
            yield from range(first, first + self.local)

    def __len__(self) -> int:
        return (self.iters - self.start) * self.local


def worker_init(_: int) -> None:
    torch.set_num_threads(1)  # workers are processes already; threads would oversubscribe the cores
    leave_signals_to_parent()  # Ctrl-C/SIGTERM to the process group: the parent saves last.pt
