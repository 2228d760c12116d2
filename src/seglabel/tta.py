"""The official LSeg evaluation protocol (multi-scale, flip, sliding window) and its single-scale
form, for any segmenter.

As in lang-seg's MultiEvalModule (from PyTorch-Encoding): for each scale the long side becomes
ceil(base_size * scale) (bilinear, align_corners=True, no antialias); an image no larger than the
crop is padded to crop x crop, a larger one is covered by crop-sized windows every ``stride``
pixels (the last windows are cut at the border and padded, not shifted); logits of the image and
of its mirror image are summed, overlapping windows averaged, each scale resized back (bilinear,
align_corners=True) and the scales summed. Padding is black: the normalised value of a 0 pixel,
-mean/std per channel, as the official ``pad_image`` does (not 0 in normalised space, which would
be mid-grey). The single-scale evaluation of that code base is the same with scales [1.0] and no
flip (PyTorch-Encoding's test scripts without --ms): long side 520, 480 windows, stride 320.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from .errors import UsageError
from .models.base import Segmenter

SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


@torch.no_grad()
def multiscale_logits(
    segmenter: Segmenter,
    image: torch.Tensor,
    scales: Sequence[float] = SCALES,
    base_size: int = 520,
    crop: int = 480,
    stride: int = 320,
    flip: bool = True,
    out_size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Summed raw logits (K, H, W) of a normalised image (3, H, W) on the segmenter's device.

    ``out_size`` (default: the image's size) is where each scale's logits are resized to before
    summing; a smaller one bounds memory for large photos (K x H x W floats)."""
    out_size = tuple(out_size or image.shape[1:])
    total: torch.Tensor | None = None
    for scale in scales:
        out = scale_logits(segmenter, image, scale, base_size, crop, stride, flip)
        score = F.interpolate(out[None], size=out_size, mode="bilinear", align_corners=True)[0]
        total = score if total is None else total + score
    return total


@torch.no_grad()
def scale_logits(segmenter: Segmenter, image: torch.Tensor, scale: float = 1.0, base_size: int = 520,
                 crop: int = 480, stride: int = 320, flip: bool = False) -> torch.Tensor:
    """Raw logits (K, h, w) of one scale at that scale's size: the long side ceil(base_size * scale).
    With the defaults this is the official single-scale evaluation before its final upsampling."""
    if crop % segmenter.pad_to:
        raise UsageError(f"crop {crop} must be a multiple of {segmenter.pad_to} for this model")
    if stride <= 0:
        raise UsageError("stride must be positive")
    _, h, w = image.shape
    black = (-torch.tensor(segmenter.mean) / torch.tensor(segmenter.std)).to(image).view(1, 3, 1, 1)
    long_side = int(math.ceil(base_size * scale))
    if h > w:
        height, width = long_side, int(w * long_side / h + 0.5)
    else:
        height, width = int(h * long_side / w + 0.5), long_side
    resized = F.interpolate(image[None], size=(height, width), mode="bilinear", align_corners=True)
    if long_side <= crop:
        out = _infer(segmenter, _pad(resized, crop, black), flip)
    else:
        out = _slide(segmenter, _pad(resized, crop, black), crop, stride, black, flip)
    return out[0, :, :height, :width]


def _slide(segmenter: Segmenter, img: torch.Tensor, crop: int, stride: int, black: torch.Tensor,
           flip: bool) -> torch.Tensor:
    """Windows of crop x crop at multiples of stride; logits averaged where windows overlap."""
    _, _, ph, pw = img.shape
    rows = math.ceil((ph - crop) / stride) + 1
    cols = math.ceil((pw - crop) / stride) + 1
    total = count = None
    for i in range(rows):
        for j in range(cols):
            h0, w0 = i * stride, j * stride
            h1, w1 = min(h0 + crop, ph), min(w0 + crop, pw)
            out = _infer(segmenter, _pad(img[:, :, h0:h1, w0:w1], crop, black), flip)
            if total is None:
                total = out.new_zeros(1, out.shape[1], ph, pw)
                count = out.new_zeros(1, 1, ph, pw)
            total[:, :, h0:h1, w0:w1] += out[:, :, : h1 - h0, : w1 - w0]
            count[:, :, h0:h1, w0:w1] += 1
    return total / count


def _infer(segmenter: Segmenter, img: torch.Tensor, flip: bool) -> torch.Tensor:
    """Full-resolution logits (1, K, h, w) of one padded crop, plus those of its mirror image."""
    batch = torch.cat([img, img.flip(-1)]) if flip else img  # one pass for both
    logits = segmenter(batch).float()
    upsample = getattr(segmenter, "upsample_logits", None)
    if upsample is not None:  # the model's own output head (LSeg: x2, align_corners=True)
        logits = upsample(logits)
    else:
        logits = F.interpolate(logits, scale_factor=segmenter.stride, mode="bilinear", align_corners=False)
    out = logits[:1]
    if flip:
        out = out + logits[1:].flip(-1)
    return out


def _pad(img: torch.Tensor, size: int, fill: torch.Tensor) -> torch.Tensor:
    """Pad bottom/right up to size x size with a per-channel fill; larger sides stay as they are."""
    _, _, h, w = img.shape
    if h >= size and w >= size:
        return img
    out = fill.expand(img.shape[0], 3, max(h, size), max(w, size)).clone()
    out[:, :, :h, :w] = img
    return out
