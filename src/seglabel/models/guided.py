"""Joint bilateral upsampling (Kopf et al., 2007) of class logits, guided by the image.

A network with output stride 8 gives one logit vector per 8x8 cell; bilinear upsampling draws its
boundaries as smooth curves between cell centres, which cannot follow a thing's outline. Here each
pixel takes a weighted mean of the logits of the 3x3 cells around its own, weighted by distance
(in cells, ``sigma_space``) and by how close the pixel's colour is to each cell's mean colour
(``sigma_colour``, RGB in [0, 1]): a pixel takes the classes of the cells that look like it, so
boundaries snap to colour edges where the cells disagree. Where colours are alike it is a smooth
interpolation; the logits themselves decide everything else.

Per cell, one small matrix product: (K classes x 9 neighbours) @ (9 x the cell's pixels), batched
over the cells: 9 multiply-adds per output logit, far less than the network that made the logits.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def guided_upsample(logits: torch.Tensor, rgb: torch.Tensor, cell: int, sigma_colour: float = 0.1,
                    sigma_space: float = 1.0) -> torch.Tensor:
    """Logits (B, K, h, w) of ``cell``-pixel cells -> (B, K, h * cell, w * cell), guided by ``rgb``
    (B, 3, >= h * cell, >= w * cell) in [0, 1]."""
    b, k, h, w = logits.shape
    n = b * h * w  # cells
    logits, rgb = logits.float(), rgb.float()[..., :h * cell, :w * cell]
    # the cell-major layout: cell i's pixels (3, cell * cell), its neighbours' colours (9, 3) and logits (K, 9)
    pixels = rgb.reshape(b, 3, h, cell, w, cell).permute(0, 2, 4, 1, 3, 5).reshape(n, 3, cell * cell)
    colours = _neighbours(F.avg_pool2d(rgb, cell)).permute(0, 3, 4, 2, 1).reshape(n, 9, 3)
    near_logits = _neighbours(logits).permute(0, 3, 4, 1, 2).reshape(n, k, 9)
    # |pixel - colour|^2 = |pixel|^2 - 2 pixel . colour + |colour|^2, the middle term a matrix product
    distance = pixels.square().sum(1, keepdim=True) - 2 * torch.bmm(colours, pixels) + \
        colours.square().sum(2, keepdim=True)  # (cells, 9, cell * cell)
    offset = (torch.arange(cell, dtype=torch.float32, device=logits.device) + 0.5) / cell - 0.5  # in cells
    dy, dx = _DY.to(logits.device), _DX.to(logits.device)
    space = ((offset[None, :, None] - dy[:, None, None]) ** 2 + (offset[None, None, :] - dx[:, None, None]) ** 2)
    weight = torch.softmax(distance.clamp_min(0) / (-2 * sigma_colour ** 2)
                           - space.view(1, 9, cell * cell) / (2 * sigma_space ** 2), dim=1)  # over the 9
    per_cell = torch.bmm(near_logits, weight)  # (cells, K, cell * cell)
    return per_cell.view(b, h, w, k, cell, cell).permute(0, 3, 1, 4, 2, 5).reshape(b, k, h * cell, w * cell)


_DY = torch.tensor([-1.0, -1.0, -1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0])
_DX = torch.tensor([-1.0, 0.0, 1.0, -1.0, 0.0, 1.0, -1.0, 0.0, 1.0])


def _neighbours(x: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, C, 9, h, w): each cell's 3x3 neighbourhood (edges replicated)."""
    b, c, h, w = x.shape
    return F.unfold(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3).view(b, c, 9, h, w)
