"""Losses of ``seglabel distill``: cross-entropy on the teacher's labels (MaskCLIP+'s only loss)
and a colour-affinity term for the pixels the teacher leaves unlabelled.

Why the second term: a CLIP teacher labels patches (8-16 px), so its boundaries are off by up to
half a patch, and the same way every time (a thing bleeds into its surroundings). A student that
starts from ImageNet weights (MaskCLIP+) has features that follow image edges and snaps to them;
one from random init has no such prior and copies the teacher's boundaries faithfully. So distill
ignores the pixels the teacher is least sure of (mostly those boundary bands) and lets colour
decide them: neighbouring pixels of similar colour should get the same class (the Potts
relaxation of a CRF, as in regularised losses for weakly-supervised segmentation), counted only
for pairs that touch an unlabelled pixel, so that the teacher keeps the last word where it spoke.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Neighbour offsets (dy, dx), one of each symmetric pair; scaled by each dilation
_HALF_RING = ((0, 1), (1, 0), (1, 1), (1, -1))


def upsample(logits: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Cross-entropy of logits (B, K, h, w) upsampled to the target (B, H, W), averaged over the
    pixels that are not ignored. No such pixel: 0 (with a graph), not 0/0 = NaN."""
    total = F.cross_entropy(upsample(logits, target.shape[-2:]), target, ignore_index=ignore_index, reduction="sum")
    return total / (target != ignore_index).sum().clamp_min(1)


def colour_affinity_loss(logits: torch.Tensor, rgb: torch.Tensor, inside: torch.Tensor,
                         unlabelled: torch.Tensor | None = None, sigma: float = 0.1,
                         dilations: tuple[int, ...] = (1, 2)) -> torch.Tensor:
    """Mean over neighbouring pixel pairs (i, j) inside the image of
    ``w_ij * (1 - p_i . p_j)``, with ``p`` the student's class probabilities at the crop's
    resolution and ``w_ij = exp(-|rgb_i - rgb_j|^2 / (2 sigma^2))`` (rgb in [0, 1]), divided by
    the sum of the weights. 0 where the colours differ, so boundaries are free to sit on edges.

    Given ``unlabelled`` (B, H, W), only pairs with at least one unlabelled pixel count: the
    teacher decides where it is sure, colour where it is not. Over every pair, a heavy weight
    would be satisfied best by one class for the whole image.

    logits (B, K, h, w); rgb (B, 3, H, W); inside (B, H, W) bool: real pixels, not padding."""
    probs = upsample(logits, rgb.shape[-2:]).softmax(dim=1)
    rgb = rgb.float()
    h, w = rgb.shape[-2:]
    total = probs.new_zeros(())
    weight = probs.new_zeros(())
    for d in dilations:
        for dy, dx in _HALF_RING:
            oy, ox = dy * d, dx * d
            # pixel i at (y, x) and j at (y + oy, x + ox): both views cropped to where both exist
            ys_i, ys_j = slice(0, h - oy), slice(oy, h)
            xs_i = slice(max(0, -ox), w - max(0, ox))
            xs_j = slice(max(0, ox), w - max(0, -ox))
            p_i, p_j = probs[:, :, ys_i, xs_i], probs[:, :, ys_j, xs_j]
            c_i, c_j = rgb[:, :, ys_i, xs_i], rgb[:, :, ys_j, xs_j]
            both = inside[:, ys_i, xs_i] & inside[:, ys_j, xs_j]
            if unlabelled is not None:
                both = both & (unlabelled[:, ys_i, xs_i] | unlabelled[:, ys_j, xs_j])
            w_ij = torch.exp(-(c_i - c_j).pow(2).sum(1) / (2 * sigma ** 2)) * both
            total = total + (w_ij * (1 - (p_i * p_j).sum(1))).sum()
            weight = weight + w_ij.sum()
    return total / weight.clamp_min(1e-6)
