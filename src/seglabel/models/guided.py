"""Joint bilateral upsampling (Kopf et al., 2007) of class logits, guided by the image.

A network with output stride 8 gives one logit vector per 8x8 cell; bilinear upsampling draws its
boundaries as smooth curves between cell centres, which cannot follow a thing's outline. Here each
pixel takes a weighted mean of the logits of the 3x3 cells around its own, weighted by distance
(in cells, ``sigma_space``) and by how close the pixel's colour is to each cell's mean colour
(``sigma_colour``, RGB in [0, 1]): a pixel takes the classes of the cells that look like it, so
boundaries snap to colour edges where the cells disagree. Where colours are alike it is a smooth
interpolation; the logits themselves decide everything else.

Memory is bounded: rows of cells are processed in bands (``K * 9 * band * W`` floats at a time).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

_DY = torch.tensor([-1.0, -1.0, -1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0])
_DX = torch.tensor([-1.0, 0.0, 1.0, -1.0, 0.0, 1.0, -1.0, 0.0, 1.0])


def guided_upsample(logits: torch.Tensor, rgb: torch.Tensor, cell: int, sigma_colour: float = 0.1,
                    sigma_space: float = 1.0, budget: int = 1 << 24) -> torch.Tensor:
    """Logits (B, K, h, w) of ``cell``-pixel cells -> (B, K, h * cell, w * cell), guided by ``rgb``
    (B, 3, h * cell, w * cell) in [0, 1]."""
    b, k, h, w = logits.shape
    height, width = h * cell, w * cell
    logits, rgb = logits.float(), rgb.float()[..., :height, :width]
    colours = F.avg_pool2d(rgb, cell)  # (B, 3, h, w): each cell's mean colour
    near_logits = _neighbours(logits)  # (B, K, 9, h, w)
    near_colours = _neighbours(colours)  # (B, 3, 9, h, w)
    offset = (torch.arange(cell, dtype=torch.float32, device=logits.device) + 0.5) / cell - 0.5  # in cells
    dy, dx = _DY.to(logits.device), _DX.to(logits.device)
    # spatial weight of neighbour n for a pixel at (oy, ox) inside its cell: (9, cell, cell)
    space = torch.exp(-((offset[None, :, None] - dy[:, None, None]) ** 2 + (offset[None, None, :] - dx[:, None, None]) ** 2)
                      / (2 * sigma_space ** 2))
    out = logits.new_empty(b, k, height, width)
    rows = max(1, budget // max(1, k * 9 * cell * width))  # cell rows per band
    for r0 in range(0, h, rows):
        r1 = min(h, r0 + rows)
        n = r1 - r0
        # every pixel of the band with its cell's 3x3 neighbourhood: (B, C, 9, n * cell, width)
        lg = near_logits[:, :, :, r0:r1].repeat_interleave(cell, 3).repeat_interleave(cell, 4)
        col = near_colours[:, :, :, r0:r1].repeat_interleave(cell, 3).repeat_interleave(cell, 4)
        pixels = rgb[:, :, None, r0 * cell:r1 * cell]
        colour = torch.exp(-((pixels - col) ** 2).sum(1) / (2 * sigma_colour ** 2))  # (B, 9, n*cell, width)
        weight = colour * space.repeat(1, n, w)[None]
        out[:, :, r0 * cell:r1 * cell] = (lg * weight[:, None]).sum(2) / weight.sum(1, keepdim=True).clamp_min(1e-12)
    return out


def _neighbours(x: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, C, 9, h, w): each cell's 3x3 neighbourhood (edges replicated)."""
    b, c, h, w = x.shape
    padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
    return F.unfold(padded, 3).view(b, c, 9, h, w)
