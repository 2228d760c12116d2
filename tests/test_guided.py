"""Guided (joint bilateral) upsampling of a student's logits: the formula written out, boundaries
that follow colour edges, and images of a batch labelled independently."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from seglabel.models.guided import guided_upsample


def reference(logits, rgb, cell, sc=0.1, ss=1.0):
    """Each pixel: the mean of its cell's 3x3 neighbours' logits (edges replicated), weighted by
    exp(-d_space^2 / 2 ss^2) * exp(-|rgb - cell colour|^2 / 2 sc^2), distances in cells."""
    k, h, w = logits.shape
    colours = F.avg_pool2d(rgb[None], cell)[0]
    out = torch.zeros(k, h * cell, w * cell)
    for y in range(h * cell):
        for x in range(w * cell):
            cy, cx = y // cell, x // cell
            total, norm = torch.zeros(k), 0.0
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    qy, qx = min(max(cy + dy, 0), h - 1), min(max(cx + dx, 0), w - 1)
                    oy, ox = (y % cell + 0.5) / cell - 0.5 - dy, (x % cell + 0.5) / cell - 0.5 - dx
                    wgt = math.exp(-(oy ** 2 + ox ** 2) / (2 * ss ** 2)) * \
                        math.exp(-float(((rgb[:, y, x] - colours[:, qy, qx]) ** 2).sum()) / (2 * sc ** 2))
                    total += wgt * logits[:, qy, qx]
                    norm += wgt
            out[:, y, x] = total / norm
    return out


def test_matches_the_formula_written_out():
    torch.manual_seed(0)
    logits, rgb = torch.randn(1, 3, 3, 4), torch.rand(1, 3, 12, 16)
    torch.testing.assert_close(guided_upsample(logits, rgb, 4)[0], reference(logits[0], rgb[0], 4), atol=1e-5, rtol=1e-4)


def test_boundaries_follow_the_colour_edge_where_bilinear_cannot():
    rgb = torch.zeros(1, 3, 16, 32)
    rgb[..., 13:] = 1.0  # a colour edge at x = 13, inside the second cell of 8
    logits = torch.zeros(1, 2, 2, 4)
    logits[:, 0, :, :2] = 5.0  # class 0 in the two left columns of cells, class 1 to the right
    logits[:, 1, :, 2:] = 5.0
    guided = guided_upsample(logits, rgb, 8).argmax(1)[0]
    bilinear = F.interpolate(logits, scale_factor=8, mode="bilinear", align_corners=False).argmax(1)[0]
    edge = (torch.arange(32) >= 13).long().expand(16, 32)
    assert torch.equal(guided, edge)
    assert not torch.equal(bilinear, edge)  # bilinear splits half way between the cells
    same = torch.full((1, 2, 2, 4), 0.3)
    torch.testing.assert_close(guided_upsample(same, rgb, 8), torch.full((1, 2, 16, 32), 0.3))


def test_images_of_a_batch_are_independent():
    torch.manual_seed(1)
    logits, rgb = torch.randn(2, 5, 6, 7), torch.rand(2, 3, 48, 56)
    torch.testing.assert_close(guided_upsample(logits, rgb, 8)[1:], guided_upsample(logits[1:], rgb[1:], 8))
