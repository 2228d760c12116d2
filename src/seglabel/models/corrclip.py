"""CorrCLIP (Zhang et al., ICCV 2025; the authors' CorrCLIPv1): CLIP's last attention rebuilt from a
second model's patch correlations, restricted to image regions (SAM / SAM 2 masks, or superpixels).

On one input (a crop, or a whole image) padded, centred, to a multiple of 56, with ``d`` the DINO
``q + k`` of its last block (patch tokens, L2-normalised) on its grid (I, J) and region ids
nearest-resized to that grid (the padding is a region of its own, 0 is "no region"):

1. Region merging: each region's mean ``d``, normalised; regions whose cosine distance
   ``max(cos) - cos`` chains within 0.2 are one group (DBSCAN, eps 0.2, min_samples 1).
2. Scope: patch p may attend q when both lie in one group, or when either lies outside every
   region and ``cos(d_p, d_q) > mean(cos)``. ``A = softmax(4 cos)`` over the allowed pairs.
3. Main and spatial branches: ``O(A v')`` with v' the last block's v (patches, bilinearly resized
   to (I, J)) of ``ln_1`` of the tokens entering the last block (main) and of the mean output of
   the 5 blocks before it (spatial; 12 blocks for 24-block ViTs, 28 for 32, L - 4 otherwise, at
   least 1); no residual, no MLP.
4. Semantic branch: one extra class token per group on CLIP's grid (groups nearest-resized to it),
   which through every block attends only the class token and its group's patches; after the
   full last block each patch takes its group's token.
5. ``f = ln_post(main) + ln_post(spatial) + 0.5 ln_post(semantic)``, then ``proj``.
Then the cosines with the text are bilinearly upsampled to the input, as in ProxyCLIP. Once the
whole image is labelled, every region (before merging) takes the label most of its pixels have
("map correction"). Departures from the authors' code: they treat the smallest id in each window
as "no region" (meant for 0; seglabel uses 0 only), they handle one image per batch, and they vote
on the labels at the photo's size, seglabel at the resized image's (swapping the top and the
voted class's logits per pixel, so the confidence stays the pixel's top probability).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UsageError
from .proxyclip import ProxyCLIP, clip_tokens, pad_centred, values_on_grid
from .regions import RegionSource
from .vfm import VFM

MERGE_EPS = 0.2
TAU = 4.0
SPATIAL_WEIGHT = 1.0
SEMANTIC_WEIGHT = 0.5


def spatial_layers(layers: int) -> int:
    return {12: 5, 24: 12, 32: 28}.get(layers, max(1, layers - 4))


def merge_regions(ids: torch.Tensor, feats: torch.Tensor, eps: float = MERGE_EPS) -> torch.Tensor:
    """Region ids (M,) of the patches, features (M, C) normalised -> group ids (M,): 0 stays 0,
    regions whose mean features chain within cosine distance ``eps`` share a group (1, 2, ...)."""
    values = torch.unique(ids)
    values = values[values != 0]
    if len(values) == 0:
        return torch.zeros_like(ids)
    member = ids[None] == values[:, None]  # (R, M)
    means = F.normalize((member.to(feats.dtype) @ feats) / member.sum(1, keepdim=True).to(feats.dtype), dim=1)
    sim = means @ means.t()
    near = (sim.max() - sim) <= eps
    label = torch.arange(len(values), device=ids.device)
    while True:  # connected components: each region takes the smallest label it is chained to
        new = torch.where(near, label[None], len(values)).amin(dim=1)
        new = new[new]  # jump along the chain
        if torch.equal(new, label):
            break
        label = new
    groups = torch.zeros_like(ids)
    index = torch.searchsorted(values, ids.clamp_min(values[0]))
    return torch.where(ids == 0, groups, label[index.clamp_max(len(values) - 1)] + 1)


def scope_attention(d: torch.Tensor, groups: torch.Tensor, tau: float = TAU) -> torch.Tensor:
    """(M, M) attention: softmax(tau cos) over the pairs step 2 allows (a patch always itself)."""
    sim = d @ d.t()
    same = (groups[:, None] == groups[None]) & (groups[:, None] != 0)
    free = (groups == 0)
    allowed = same | ((free[:, None] | free[None]) & (sim > sim.mean()))
    allowed |= torch.eye(len(groups), dtype=torch.bool, device=d.device)  # theirs: NaN rows when all-masked
    return (sim * tau).masked_fill(~allowed, float("-inf")).softmax(dim=-1)


def region_token_step(blk: nn.Module, tokens: torch.Tensor, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """One open_clip block on region tokens (R, C) that attend only the entries of ``x`` (1 + N, C)
    ``allowed`` (R, 1 + N) marks; x is the block's input and is not changed by them."""
    attn = blk.attn
    heads, c = attn.num_heads, attn.embed_dim
    w, b = attn.in_proj_weight, attn.in_proj_bias
    q = F.linear(blk.ln_1(tokens), w[:c], b[:c])
    k, v = F.linear(blk.ln_1(x), w[c:], b[c:]).chunk(2, dim=-1)
    split = lambda t: t.reshape(t.shape[0], heads, c // heads).transpose(0, 1)  # noqa: E731
    scores = split(q) @ split(k).transpose(-1, -2) * (c // heads) ** -0.5
    weights = scores.masked_fill(~allowed[None], float("-inf")).softmax(dim=-1)
    out = (weights @ split(v)).transpose(0, 1).reshape(tokens.shape[0], c)
    tokens = tokens + blk.ls_1(attn.out_proj(out))
    return tokens + blk.ls_2(blk.mlp(blk.ln_2(tokens)))


class CorrCLIP(ProxyCLIP):
    """CorrCLIP on an open_clip ViT with DINO-like ``vfm`` and a region source ``regions``.

    ``forward(images)`` labels whole images with their own regions (and the vote); the predictor's
    sliding window calls ``image_context`` once per image, ``forward(crops, context, boxes)`` per
    batch of windows and ``finish_image`` on the averaged logits."""

    vfm_method = "corrclip"

    def __init__(self, clip_model: nn.Module, vfm: VFM, regions: RegionSource, tokenizer=None,
                 logit_scale: float | None = None, vote: bool = True, **kwargs: Any) -> None:
        super().__init__(clip_model, vfm, tokenizer=tokenizer, logit_scale=logit_scale, **kwargs)
        if vfm.kind == "sam":
            raise UsageError("--method corrclip reads q + k of a plain ViT: use --proxy dino:..., dinov2:..., "
                             "mae:vitb or clip")
        self.regions, self.vote = regions, vote
        layers = len(clip_model.visual.transformer.resblocks)
        count = spatial_layers(layers)
        self.spatial = range(max(0, layers - 2 - count), layers - 2)  # block outputs averaged (0-based)

    def describe(self) -> dict[str, Any]:
        out = {**super().describe(), **self.regions.identity()}
        if not self.vote:
            out["vote"] = False
        return out

    # -- the predictor's hooks -------------------------------------------------------------------
    def image_context(self, image: torch.Tensor) -> torch.Tensor:
        """Region ids (H, W) of one whole normalised image (3, H, W)."""
        mean = torch.tensor(self.mean, device=image.device).view(3, 1, 1)
        std = torch.tensor(self.std, device=image.device).view(3, 1, 1)
        rgb = ((image.float() * std + mean).clamp(0, 1) * 255 + 0.5).to(torch.uint8)
        ids = self.regions(rgb.permute(1, 2, 0).cpu().numpy())
        return torch.from_numpy(np.asarray(ids, dtype=np.int64)).to(image.device)

    def finish_image(self, logits: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return vote(logits, context) if self.vote else logits

    @torch.no_grad()
    def forward(self, images: torch.Tensor, context: torch.Tensor | None = None,
                boxes: Sequence[Sequence[int]] | None = None) -> torch.Tensor:
        if self.text_embeddings is None:
            raise RuntimeError("call set_labels(labelset) before labelling images")
        if context is None:
            whole = [self.image_context(img) for img in images]
            logits = self.region_logits(images, torch.stack(whole))
            return torch.stack([self.finish_image(lg, ids) for lg, ids in zip(logits, whole)])
        ids = torch.stack([context[t:b, l:r] for t, l, b, r in boxes])
        if ids.shape[-2:] != images.shape[-2:]:
            raise UsageError("CorrCLIP windows must be whole crops of the image (no padding)")
        return self.region_logits(images, ids)

    def dense_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.stack([self.image_context(img) for img in images])
        padded, ids = self._pad(images, ids)
        feats = self._features(padded, ids)
        return feats, feats

    def region_logits(self, images: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Class logits (B, K, H, W) of inputs (B, 3, H, W) with region ids (B, H, W)."""
        padded, offset = pad_centred(images)
        _, padded_ids = self._pad(images, ids)
        return self.upsampled_logits(self._features(padded, padded_ids), padded, offset, images.shape[-2:])

    @staticmethod
    def _pad(images: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        padded, (top, left) = pad_centred(images)
        out = torch.full((ids.shape[0], *padded.shape[-2:]), int(ids.max()) + 1, dtype=ids.dtype, device=ids.device)
        out[:, top:top + ids.shape[1], left:left + ids.shape[2]] = ids  # the padding: a region of its own
        return padded, out

    # -- the computation -------------------------------------------------------------------------
    def _features(self, padded: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        d = self.vfm.qk(self.vfm_input(padded))
        size = tuple(d.shape[-2:])
        d = F.normalize(d.flatten(2).transpose(1, 2).float(), dim=-1)  # (B, M, C)
        on_grid = F.interpolate(ids[:, None].float(), size=size, mode="nearest")[:, 0].long().flatten(1)
        groups = torch.stack([merge_regions(g, f) for g, f in zip(on_grid, d)])
        v = self.clip.visual
        x, grid = clip_tokens(v, padded)
        outputs = self._blocks(x, keep_all=True)
        inputs = [x] + outputs  # what enters each block
        last = v.transformer.resblocks[-1]
        main = outputs[-1]
        spatial = torch.stack([outputs[i] for i in self.spatial]).mean(0)
        feats = []
        for i in range(len(padded)):
            attn = scope_attention(d[i], groups[i]).to(main.dtype)
            both = values_on_grid(last, torch.stack([main[i], spatial[i]]), grid, size)
            branch = last.attn.out_proj(attn @ both)  # (2, M, C)
            semantic = self._semantic(groups[i].view(size), [t[i] for t in inputs], grid, size)
            feats.append(v.ln_post(branch[0]) + SPATIAL_WEIGHT * v.ln_post(branch[1])
                         + SEMANTIC_WEIGHT * v.ln_post(semantic))
        feats = torch.stack(feats) @ v.proj
        return feats.transpose(1, 2).reshape(feats.shape[0], -1, *size)

    def _semantic(self, groups: torch.Tensor, inputs: list[torch.Tensor], grid: tuple[int, int],
                  size: tuple[int, int]) -> torch.Tensor:
        """(M, C): each patch's group token after the last block (step 4)."""
        on_clip = F.interpolate(groups[None, None].float(), size=grid, mode="nearest")[0, 0].long()
        values = torch.unique(on_clip)
        member = on_clip.flatten()[None] == values[:, None]  # (R, N)
        allowed = torch.cat([torch.ones_like(member[:, :1]), member], dim=1)  # the class token, the group
        tokens = inputs[0][:1].expand(len(values), -1)  # the class token after ln_pre
        for blk, x in zip(self.clip.visual.transformer.resblocks, inputs):
            tokens = region_token_step(blk, tokens, x, allowed)
        back = F.interpolate(member.view(-1, 1, *grid).to(tokens.dtype), size=size, mode="nearest").flatten(1)
        return back.t() @ tokens


def vote(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Map correction on class logits (K, H, W) with region ids (H, W): in each region (id != 0)
    every pixel's label becomes the region's most frequent one (the smallest on ties), by swapping
    that class's logit with the pixel's top one."""
    k = logits.shape[0]
    top = logits.argmax(dim=0)
    ids = ids.to(top.device)
    values, inverse = torch.unique(ids, return_inverse=True)
    counts = torch.bincount((inverse * k + top).flatten(), minlength=len(values) * k).view(len(values), k)
    mode = counts.argmax(dim=1)[inverse]  # first maximum: the smallest class on ties
    mode = torch.where(ids == 0, top, mode)
    lt, lm = logits.gather(0, top[None]), logits.gather(0, mode[None])
    out = logits.scatter(0, mode[None], lt)
    return out.scatter(0, top[None], torch.where((top == mode)[None], lt, lm))
