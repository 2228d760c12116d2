"""The last-block computations of MaskCLIP's training-free successors on an open_clip ViT.

Each method changes only how the last residual block of a CLIP ViT turns its input tokens into
per-patch embeddings (written here on batch-first tokens (B, 1 + h*w, C), class token first):

- ClearCLIP: query-query attention; residual and MLP dropped.
- SCLIP: query-query plus key-key attention (rows sum to 2); residual and MLP kept.
- NACLIP: key-key attention plus a Gaussian over patch-grid distance; residual and MLP dropped.
- SC-CLIP: anomalous tokens repaired, then NACLIP-like attention guided by mid-layer token
  similarity, plus multi-level features of earlier blocks (one image at a time).

Notation: ``y = ln_1(x)``, per-head ``q, k, v`` from ``attn.in_proj``, ``s = head_dim ** -0.5``,
``O = attn.out_proj``. The block's layer scale ``ls_1``/``ls_2`` (the identity in CLIP) is kept on
its branches. ``paper_protocol`` gives the inference protocol each method was measured with.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UsageError

METHODS = ("maskclip", "clearclip", "sclip", "naclip", "scclip")
# Methods that also need a second vision model (models/proxyclip.py, models/corrclip.py).
VFM_METHODS = ("proxyclip", "corrclip")

# softmax(scale * cosine) as each method's evaluation computes it; only the confidence depends on
# it (argmax does not). MaskCLIP's refinements use CLIP's own temperature.
LOGIT_SCALES = {"maskclip": 100.0, "clearclip": 50.0, "sclip": 40.0, "naclip": 40.0, "scclip": 40.0,
                "proxyclip": 40.0, "corrclip": 40.0}

NACLIP_SIGMA = 5.0  # patches
SCCLIP_LOF_NEIGHBOURS = 30
SCCLIP_LOF_CONTAMINATION = 0.05
SCCLIP_BETA = 0.4  # similarity threshold of the aggregation
SCCLIP_CLS_WEIGHT = 0.3
SCCLIP_ATTN_SHARPNESS = 3.0
# Indices (into the outputs of blocks 0 .. L-2) the authors use on 12-block ViTs.
SCCLIP_INDICES_12 = {"mid": 8, "after": 3, "multi_first": 3, "multi_last": 9}


# What `seglabel annotate` uses when --method is not given (ViT towers; ResNet towers: maskclip).
# Chosen on the toy-world measurements, see the README ("Models").
DEFAULT_METHOD = "sclip"


def default_method(tower: str) -> str:
    return DEFAULT_METHOD if tower == "vit" else "maskclip"


def check_method(method: str) -> str:
    if method not in METHODS + VFM_METHODS:
        raise UsageError(f"unknown method '{method}' (known: {', '.join(METHODS + VFM_METHODS)})")
    return method


def paper_protocol(method: str) -> dict[str, int]:
    """The inference protocol of the method's own evaluation (``--protocol paper``), as the fields
    of a ``seglabel.predict.Protocol`` (a plain dict: the models floor does not import predict).

    MaskCLIP: short side 512, whole image. ClearCLIP: short side 448, 448 window, stride 224.
    SCLIP, NACLIP, SC-CLIP: short side 336, 224 window, stride 112 (all three use 560 on
    Cityscapes, and NACLIP labels VOC whole-image: override with --short-side / --window 0).
    ProxyCLIP, CorrCLIP: short side 336, 336 window, stride 112 (both use short side 448 on ADE20K
    and Cityscapes, and a 224 window on Cityscapes); each window is padded, centred, to a
    multiple of 56 by the model itself."""
    check_method(method)
    if method == "maskclip":
        return dict(short_side=512, max_long_side=2048, window=0, window_stride=0)
    if method == "clearclip":
        return dict(short_side=448, max_long_side=2048, window=448, window_stride=224)
    if method in VFM_METHODS:
        return dict(short_side=336, max_long_side=2048, window=336, window_stride=112)
    return dict(short_side=336, max_long_side=2048, window=224, window_stride=112)


# -- shared pieces --------------------------------------------------------------------------------
def resize_pos_embed_by_scale(pos: torch.Tensor, grid: tuple[int, int], new_grid: tuple[int, int]) -> torch.Tensor:
    """Position embeddings for a new patch grid as ClearCLIP, SCLIP, NACLIP and SC-CLIP resize them:
    class entry kept, the grid resized bicubically (align_corners=False) with
    ``scale_factor = (new + 0.1) / old`` per side, which samples slightly other points than a
    size-based resize. The native grid is used as it is."""
    grid, new_grid = tuple(grid), tuple(new_grid)
    if grid == new_grid:
        return pos
    cls, patches = pos[:1], pos[1:]
    if patches.shape[0] != grid[0] * grid[1]:  # configs whose grid_size was not kept in sync
        side = int(math.isqrt(patches.shape[0]))
        grid = (side, side)
        if grid == new_grid:
            return pos
    patches = patches.reshape(1, grid[0], grid[1], -1).permute(0, 3, 1, 2).float()
    scale = ((new_grid[0] + 0.1) / grid[0], (new_grid[1] + 0.1) / grid[1])
    patches = F.interpolate(patches, scale_factor=scale, mode="bicubic", align_corners=False,
                            recompute_scale_factor=False)
    assert tuple(patches.shape[-2:]) == new_grid, (patches.shape, new_grid)
    patches = patches.permute(0, 2, 3, 1).reshape(new_grid[0] * new_grid[1], -1).to(pos.dtype)
    return torch.cat([cls, patches], dim=0)


def split_heads(attn: nn.MultiheadAttention, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v of ``attn`` on tokens ``y`` (B, N, C), each (B, heads, N, head_dim)."""
    b, n, c = y.shape
    heads = attn.num_heads
    q, k, v = F.linear(y, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    per_head = lambda t: t.reshape(b, n, heads, c // heads).transpose(1, 2)  # noqa: E731
    return per_head(q), per_head(k), per_head(v)


def attend(attn: nn.MultiheadAttention, weights: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``O(A v)``: attention weights (B or 1, heads, N, N) applied to v, heads merged, out_proj."""
    b, heads, n, d = v.shape
    out = (weights @ v).transpose(1, 2).reshape(b, n, heads * d)
    return attn.out_proj(out)


def self_softmax(t: torch.Tensor) -> torch.Tensor:
    """softmax(s t t^T) per head: the q-q or k-k attention of these methods."""
    return (t @ t.transpose(-1, -2) * t.shape[-1] ** -0.5).softmax(dim=-1)


def smoothing_keys(last: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """``O(k)`` of the last block on ``y = ln_1(x)``: what MaskCLIP's key smoothing compares."""
    _, k, _ = F.linear(y, last.attn.in_proj_weight, last.attn.in_proj_bias).chunk(3, dim=-1)
    return last.attn.out_proj(k)


# -- the last blocks ------------------------------------------------------------------------------
# Each takes the last block and its input tokens x (B, 1 + N, C), and returns the tokens that
# ln_post and proj turn into embeddings (class token still first), and the smoothing keys.
def maskclip_block(last: nn.Module, x: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention replaced by the identity on the value path; residual and MLP kept."""
    y = last.ln_1(x)
    _, _, v = F.linear(y, last.attn.in_proj_weight, last.attn.in_proj_bias).chunk(3, dim=-1)
    x = x + last.ls_1(last.attn.out_proj(v))
    x = x + last.ls_2(last.mlp(last.ln_2(x)))
    return x, smoothing_keys(last, y)


def clearclip_block(last: nn.Module, x: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``O(softmax(s q q^T) v)``; residual and MLP dropped."""
    y = last.ln_1(x)
    q, _, v = split_heads(last.attn, y)
    return last.ls_1(attend(last.attn, self_softmax(q), v)), smoothing_keys(last, y)


def sclip_block(last: nn.Module, x: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Correlative self-attention ``softmax(s q q^T) + softmax(s k k^T)`` (not renormalised);
    residual and MLP kept."""
    y = last.ln_1(x)
    q, k, v = split_heads(last.attn, y)
    x = x + last.ls_1(attend(last.attn, self_softmax(q) + self_softmax(k), v))
    x = x + last.ls_2(last.mlp(last.ln_2(x)))
    return x, smoothing_keys(last, y)


def naclip_block(last: nn.Module, x: torch.Tensor, grid: tuple[int, int],
                 sigma: float = NACLIP_SIGMA) -> tuple[torch.Tensor, torch.Tensor]:
    """``O(softmax(s k k^T + G) v)`` with G a Gaussian of patch-grid distance; residual and MLP
    dropped ("reduced" architecture)."""
    y = last.ln_1(x)
    _, k, v = split_heads(last.attn, y)
    bias = F.pad(gaussian_bias(grid, sigma, k.device, k.dtype), (1, 0, 1, 0))  # class token: no bias
    scores = k @ k.transpose(-1, -2) * k.shape[-1] ** -0.5 + bias
    return last.ls_1(attend(last.attn, scores.softmax(dim=-1), v)), smoothing_keys(last, y)


def gaussian_bias(grid: tuple[int, int], sigma: float, device=None, dtype=None) -> torch.Tensor:
    """(N, N) ``exp(-|pos p - pos p'|^2 / (2 sigma^2))`` over the h x w patch grid (row-major),
    not normalised."""
    rows, cols = torch.meshgrid(torch.arange(grid[0], device=device), torch.arange(grid[1], device=device),
                                indexing="ij")
    pos = torch.stack([rows.flatten(), cols.flatten()], dim=1).to(torch.float32)
    dist2 = ((pos[:, None] - pos[None]) ** 2).sum(-1)
    return torch.exp(-dist2 / (2 * sigma ** 2)).to(dtype or torch.float32)


LAST_BLOCKS: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor]]] = {
    "maskclip": maskclip_block, "clearclip": clearclip_block, "sclip": sclip_block, "naclip": naclip_block,
}


# -- SC-CLIP ----------------------------------------------------------------------------------------
def scclip_indices(layers: int) -> dict[str, int]:
    """Block-output indices SC-CLIP reads, for a ViT of ``layers`` blocks.

    The authors fix them for 12 blocks (outputs 0..10 of the blocks before the last): similarity
    from output 8, aggregation weights from output 3, multi-level sum of outputs 3..9. Other depths
    get the same relative depths: index i -> round(i * (L - 2) / 10), the identity for L = 12.
    (A 4-block ViT: similarity 2, aggregation 1, sum 1..2.)"""
    if layers < 2:
        raise UsageError("SC-CLIP needs a ViT with at least 2 blocks")
    scale = (layers - 2) / 10
    return {name: min(layers - 2, int(math.floor(i * scale + 0.5))) for name, i in SCCLIP_INDICES_12.items()}


def outlier_tokens(tokens: torch.Tensor, neighbours: int = SCCLIP_LOF_NEIGHBOURS,
                   contamination: float = SCCLIP_LOF_CONTAMINATION) -> torch.Tensor:
    """Boolean (N,) mask of anomalous tokens (N, C) by SC-CLIP's local outlier factor.

    Squared Euclidean distances; reach distance ``max(d(p, o), kdist(p))`` (the point's own
    k-distance, as the authors compute it); LRD = k / mean reach distance; LOF = mean over the k
    neighbours of LRD(o) / LRD(p); outliers: LOF above its (1 - contamination) quantile.
    Grids of at most k tokens (smaller than any the authors run) use k = N // 2: with k = N - 1
    every reach distance is the point's own k-distance and the top LOF values tie."""
    n = tokens.shape[0]
    k = neighbours if n > neighbours else n // 2
    if k < 1:
        return torch.zeros(n, dtype=torch.bool, device=tokens.device)
    t = tokens.float()
    dist = ((t[:, None] - t[None]) ** 2).sum(-1)
    knn_dist, knn_idx = dist.topk(k + 1, dim=1, largest=False)
    knn_dist, knn_idx = knn_dist[:, 1:], knn_idx[:, 1:]  # the nearest is the token itself
    reach = torch.maximum(knn_dist, knn_dist[:, -1:])
    lrd = k / torch.nan_to_num(reach.mean(dim=1), nan=1e-6)
    lof = (lrd[knn_idx] / lrd[:, None]).mean(dim=1)
    return lof > torch.quantile(lof, 1 - contamination)


def fill_outliers(tokens: torch.Tensor, outliers: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Each outlier token (N, C), cells (i // w, i % w), replaced by the mean of its non-outlier
    3x3 neighbours (cells outside the grid do not count); one without any is kept."""
    h, w = grid
    c = tokens.shape[-1]
    fmap = tokens.t().reshape(1, c, h, w)
    good = (~outliers).to(tokens.dtype).reshape(1, 1, h, w)
    ring = torch.ones(1, 1, 3, 3, dtype=tokens.dtype, device=tokens.device)
    ring[0, 0, 1, 1] = 0
    total = F.conv2d(F.pad(fmap * good, (1, 1, 1, 1)), ring.expand(c, 1, 3, 3), groups=c)
    count = F.conv2d(F.pad(good, (1, 1, 1, 1)), ring)
    replace = (1 - good) * (count > 0).to(tokens.dtype)
    mean = total / count.clamp_min(1)
    out = fmap * (1 - replace) + mean * replace
    return out.reshape(c, h * w).t()


def cosine_matrix(tokens: torch.Tensor) -> torch.Tensor:
    t = F.normalize(tokens, dim=-1)
    return t @ t.t()


def row_normalised(sim: torch.Tensor) -> torch.Tensor:
    return sim / (sim.sum(dim=-1, keepdim=True) + 1e-6)


def scclip_attention(last: nn.Module, y: torch.Tensor, mid: torch.Tensor) -> torch.Tensor:
    """``O(A v)`` with ``A = (softmax(M) + softmax(s k k^T)) / 2`` on patch tokens y (N, C);
    ``M = 3 (mid - mean(mid))`` with negative entries masked out."""
    _, k, v = split_heads(last.attn, y[None])
    guide = SCCLIP_ATTN_SHARPNESS * (mid - mid.mean())
    guide = guide.masked_fill(guide < 0, float("-inf")).softmax(dim=-1)
    weights = (guide[None, None] + self_softmax(k)) / 2
    return last.ls_1(attend(last.attn, weights, v))[0]


def scclip_tokens(last: nn.Module, outputs: list[torch.Tensor], grid: tuple[int, int],
                  indices: dict[str, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """SC-CLIP on one image: ``outputs`` are the (1 + N, C) outputs of every block but the last.
    Returns the N patch tokens for ln_post and proj, and the smoothing keys (N, C)."""
    x = outputs[-1]
    cls, patches = x[0], x[1:]
    outliers = outlier_tokens(patches)
    patches = fill_outliers(patches, outliers, grid)
    mid = cosine_matrix(fill_outliers(outputs[indices["mid"]][1:], outliers, grid))
    patches = row_normalised(mid * (mid >= SCCLIP_BETA)) @ patches
    y = last.ln_1(patches)
    feats = scclip_attention(last, y, mid) + SCCLIP_CLS_WEIGHT * cls
    after = cosine_matrix(outputs[indices["after"]][1:])
    after = row_normalised(after * (after >= SCCLIP_BETA))
    feats = after @ feats
    multi = torch.stack(outputs[indices["multi_first"]:indices["multi_last"] + 1]).sum(dim=0)
    extra = scclip_attention(last, last.ln_1(multi[1:]), mid) + SCCLIP_CLS_WEIGHT * multi[0]
    return feats + after @ extra, smoothing_keys(last, y)
