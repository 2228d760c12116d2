"""ProxyCLIP (Lan et al., ECCV 2024): CLIP's last attention replaced by a second model's patch
similarity ("proxy attention").

On one input (a crop, or a whole image), with ``ex`` the VFM's last-layer patch features on its
grid (I, J) and ``x`` the CLIP tokens entering the last block:

    S  = cos(ex_p, ex_q)                                    (IJ x IJ, shared by every head)
    A  = softmax(gamma * (S - beta * mean(S))), entries < 0 masked out     (beta 1.2, gamma 3)
    v' = v of ln_1(x) (patches), bilinearly resized from CLIP's grid to (I, J)
    f  = ln_post(O(A v')) @ proj                            (no residual, no MLP)

The cosines of ``f`` with the text embeddings are bilinearly upsampled to the input; each input is
first zero-padded, centred, to a multiple of 56 (in CLIP normalisation), and the VFM sees it
re-normalised to its own statistics. As the authors' code, except: the mean of S is taken per
image (theirs is over the batch; they run one crop at a time, where the two agree), CLIP's grid
is (H // p, W // p) (theirs swaps the sides, which only matters for non-square crops), and a row
whose every entry is negative keeps its largest (theirs gives NaN there).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import trainingfree as tf
from .maskclip import MaskCLIP
from .vfm import VFM

PROXY_BETA = 1.2
PROXY_GAMMA = 3.0
PAD_MULTIPLE = 56  # ProxyCLIP and CorrCLIP pad every crop (centred) to a multiple of this


def pad_centred(images: torch.Tensor, multiple: int = PAD_MULTIPLE) -> tuple[torch.Tensor, tuple[int, int]]:
    """Zero-pad (B, C, H, W) to multiples of ``multiple``, the extra split as the authors split it
    (the smaller half before); returns the padded images and the (top, left) offsets."""
    h, w = images.shape[-2:]
    dh, dw = (-h) % multiple, (-w) % multiple
    top, left = dh // 2, dw // 2
    if dh or dw:
        images = F.pad(images, (left, dw - left, top, dh - top))
    return images, (top, left)


def clip_tokens(visual: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """CLIP ViT tokens (B, 1 + N, C) after ln_pre, and the patch grid floor(side / patch) (the
    strided convolution drops what is left over, as in the authors' code). Position embeddings
    are resized by scale factor (n + 0.1) / n0."""
    x = visual.conv1(images.to(visual.conv1.weight.dtype))
    grid = (x.shape[-2], x.shape[-1])
    x = x.flatten(2).transpose(1, 2)
    cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    pos = tf.resize_pos_embed_by_scale(visual.positional_embedding, visual.grid_size, grid)
    return visual.ln_pre(torch.cat([cls, x], dim=1) + pos.to(x.dtype)), grid


def proxy_attention(ex: torch.Tensor, beta: float = PROXY_BETA, gamma: float = PROXY_GAMMA) -> torch.Tensor:
    """(B, M, M) attention from VFM features (B, C, I, J), M = I * J."""
    f = F.normalize(ex.flatten(2), dim=1)
    s = f.transpose(1, 2) @ f
    s = (s - beta * s.mean(dim=(1, 2), keepdim=True)) * gamma
    keep = (s >= 0) | (s == s.amax(dim=-1, keepdim=True))
    return s.masked_fill(~keep, float("-inf")).softmax(dim=-1)


def values_on_grid(last: nn.Module, x: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """v of the last block on ``ln_1(x)`` (patch tokens only), (B, C, h, w) resized bilinearly to
    ``size`` and flattened to (B, I*J, C)."""
    attn = last.attn
    c = attn.embed_dim
    v = F.linear(last.ln_1(x), attn.in_proj_weight[2 * c:], attn.in_proj_bias[2 * c:])[:, 1:]
    v = v.transpose(1, 2).reshape(v.shape[0], c, *grid)
    v = F.interpolate(v, size=size, mode="bilinear", align_corners=False)
    return v.flatten(2).transpose(1, 2)


class ProxyCLIP(MaskCLIP):
    """ProxyCLIP on an open_clip ViT with a second model ``vfm``. ``forward`` returns class logits
    at every input pixel (stride 1): inputs need no padding (``pad_to`` 1)."""

    vfm_method = "proxyclip"

    def __init__(self, clip_model: nn.Module, vfm: VFM, tokenizer=None, logit_scale: float | None = None,
                 beta: float = PROXY_BETA, gamma: float = PROXY_GAMMA, **kwargs: Any) -> None:
        super().__init__(clip_model, tokenizer=tokenizer, method=self.vfm_method, logit_scale=logit_scale, **kwargs)
        self.vfm = vfm
        self.beta, self.gamma = beta, gamma
        self.stride = 1

    @property
    def pad_to(self) -> int:
        return 1

    def describe(self) -> dict[str, Any]:
        out = {"method": self.method, "tower": self.tower, **self.vfm.identity()}
        if self.logit_scale != tf.LOGIT_SCALES[self.method]:
            out["logit_scale"] = self.logit_scale
        return out

    def vfm_input(self, padded: torch.Tensor) -> torch.Tensor:
        return self.vfm.prepare(padded, self.mean, self.std)

    def dense_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings (B, D, I, J) on the VFM grid of the centred, padded input (twice: there are
        no separate smoothing keys)."""
        padded, _ = pad_centred(images)
        feats = self._features(padded)
        return feats, feats

    def _features(self, padded: torch.Tensor) -> torch.Tensor:
        ex = self.vfm.features(self.vfm_input(padded))
        v = self.clip.visual
        x, grid = clip_tokens(v, padded)
        x = self._blocks(x, keep_all=False)[-1]
        last = v.transformer.resblocks[-1]
        attn = proxy_attention(ex.float(), self.beta, self.gamma).to(x.dtype)
        out = last.attn.out_proj(attn @ values_on_grid(last, x, grid, tuple(ex.shape[-2:])))
        feats = v.ln_post(out) @ v.proj
        return feats.transpose(1, 2).reshape(feats.shape[0], -1, *ex.shape[-2:])

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.text_embeddings is None:
            raise RuntimeError("call set_labels(labelset) before labelling images")
        padded, offset = pad_centred(images)
        return self.upsampled_logits(self._features(padded), padded, offset, images.shape[-2:])

    def upsampled_logits(self, feats: torch.Tensor, padded: torch.Tensor, offset: tuple[int, int],
                         size) -> torch.Tensor:
        """Cosines on the feature grid -> bilinear to the padded input -> padding cut -> class logits."""
        cos = torch.einsum("bdhw,kd->bkhw", F.normalize(feats, dim=1), self.text_embeddings.to(feats.dtype))
        cos = F.interpolate(cos.float(), size=padded.shape[-2:], mode="bilinear", align_corners=False)
        top, left = offset
        return self.class_logits(cos[..., top:top + size[0], left:left + size[1]])
