"""The training samples of ``seglabel distill`` and MaskCLIP+'s augmentations (mmseg's pipeline:
rescale 0.5-2, crop, flip, photometric distortion, normalise, pad).

Every random draw of sample ``n`` comes from a generator seeded with (seed, n), so a batch depends
only on the iteration number: resuming, worker counts and ranks never change what is seen.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from ..images import ImageError, load_image
from ..interrupts import leave_signals_to_parent
from .data import Pair, read_mask, read_scores

if TYPE_CHECKING:
    from .cache import TeacherCache

log = logging.getLogger("seglabel")


@dataclass(frozen=True)
class Augment:
    crop: int = 512
    base_size: int = 512  # before the random factor, the short side is resized to this
    scale_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75  # mmseg: retry crops that one class fills more than this
    flip: bool = True
    photometric: bool = True


class PairDataset(torch.utils.data.Dataset):
    """Item ``n`` (a global sample number) -> (normalised image crop, int64 mask crop, sureness,
    corrected).

    The sample number picks the pair (a fresh permutation per epoch) and seeds the augmentation.
    The mask is the pair's, or with a cached teacher its labels at the level nearest the drawn
    scale (sureness: the margin of its two best classes, else an empty tensor); with an online
    teacher it is 0 on the image and ``ignore`` on the padding. A pair a person corrected always
    gives its own mask as written (``corrected`` True: the training loop keeps it, no teacher)."""

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

    def __getitem__(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        pair = self.pairs[self.pair_index(n)]
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + 7919 * n + 1)
        rand = lambda: float(torch.rand((), generator=g))  # noqa: E731
        lo, hi = self.aug.scale_range
        factor = lo + rand() * (hi - lo)
        sure = None
        try:
            rgb = load_image(pair.image)
            if pair.corrected:  # ground truth: no teacher's labels, confidence or sureness
                mask, conf = read_mask(pair.mask, self.ignore), None
                if self.cache is not None:  # batched with cached labels' sureness; never read for it
                    sure = np.zeros(mask.shape, np.float32)
            elif self.cache is not None:
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
        img, mask, sure = self.augment(torch.from_numpy(rgb).permute(2, 0, 1).float(), torch.from_numpy(mask),
                                       None if sure is None else torch.from_numpy(sure), factor, rand)
        return img, mask, sure, torch.tensor(pair.corrected)

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
