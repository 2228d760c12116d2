"""MaskCLIP: dense labels read from a CLIP image encoder, classified by CLIP text embeddings.

Training-free (Zhou et al., ECCV 2022). Only the end of the image tower changes:
- ViT: in the last block the attention is replaced by the identity on the value path; the
  residual and the MLP are kept, then ``ln_post`` and ``proj`` give one embedding per patch.
- ResNet: the attention pool becomes two 1x1 convolutions, ``c_proj(v_proj(layer4))``.
Patch embeddings are compared with the text embeddings by cosine (no logit scale).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..labelset import LabelSet
from ..refine import key_smoothing, prompt_denoising
from ..text import cached_text_embeddings, class_max, encode_prompts, labelset_templates
from .base import Segmenter

# Softmax temperature of CLIP (exp of its logit scale), used by the official refinements
# and here for per-pixel confidence; argmax does not depend on it.
CLIP_LOGIT_SCALE = 100.0


class MaskCLIP(Segmenter):
    def __init__(
        self,
        clip_model: nn.Module,
        tokenizer: Callable[[list[str]], torch.Tensor] | None = None,
        key_smoothing: bool = False,
        prompt_denoising: bool = False,
        ks_threshold: float = 1.0,
        pd_threshold: float = 0.5,
        mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None,
    ) -> None:
        super().__init__()
        from open_clip.modified_resnet import ModifiedResNet
        from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

        visual = clip_model.visual
        if isinstance(visual, VisionTransformer):
            last = visual.transformer.resblocks[-1]
            if not isinstance(last, ResidualAttentionBlock) or not isinstance(last.attn, nn.MultiheadAttention):
                raise ValueError("MaskCLIP needs standard attention blocks (nn.MultiheadAttention) in the ViT")
            if visual.attn_pool is not None or visual.proj is None:
                raise ValueError("MaskCLIP needs a ViT with a class token and a projection (no attentional pool)")
            self.tower = "vit"
            self.stride = visual.patch_size[0]
        elif isinstance(visual, ModifiedResNet):
            self.tower = "resnet"
            self.stride = 32
        else:
            raise ValueError(f"MaskCLIP supports open_clip ViT and ModifiedResNet image towers, not {type(visual).__name__}")
        self.clip = clip_model
        self.tokenizer = tokenizer
        self.key_smoothing = key_smoothing
        self.prompt_denoising = prompt_denoising
        self.ks_threshold = ks_threshold
        self.pd_threshold = pd_threshold
        cfg = getattr(visual, "preprocess_cfg", {}) or {}
        self.mean = tuple(mean or cfg.get("mean", (0.48145466, 0.4578275, 0.40821073)))
        self.std = tuple(std or cfg.get("std", (0.26862954, 0.26130258, 0.27577711)))
        self.text_embeddings: torch.Tensor | None = None
        self.prompt_class: list[int] = []
        self.num_classes = 0

    # -- text side ------------------------------------------------------------------------------
    @torch.no_grad()
    def set_labels(self, labelset: LabelSet) -> None:
        if self.tokenizer is None:
            raise ValueError("MaskCLIP.set_labels needs the model's tokenizer (MaskCLIP(clip, tokenizer=...))")
        device = next(self.clip.parameters()).device
        from .clip import text_encoder

        templates = labelset_templates(labelset)
        self.text_embeddings = cached_text_embeddings(
            self.text_identity(), labelset.prompts, templates,
            lambda: encode_prompts(text_encoder(self.clip), self.tokenizer, labelset.prompts, templates, device),
        ).to(device)
        self.prompt_class = labelset.prompt_class
        self.num_classes = len(labelset)

    # -- image side -----------------------------------------------------------------------------
    def dense_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch embeddings (B, D, h, w) in the joint space, and the key features (B, C, h, w)
        that key smoothing compares."""
        return self._vit_dense(images) if self.tower == "vit" else self._resnet_dense(images)

    def patch_logits(self, images: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
        """Cosine logits (B, K, h, w) of each patch against L2-normalised text embeddings (K, D)."""
        feats, _ = self.dense_features(images)
        feats = F.normalize(feats, dim=1)
        return torch.einsum("bdhw,kd->bkhw", feats, text_embeddings.to(feats.dtype))

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.text_embeddings is None:
            raise RuntimeError("call set_labels(labelset) before labelling images")
        feats, keys = self.dense_features(images)
        cos = torch.einsum("bdhw,kd->bkhw", F.normalize(feats, dim=1), self.text_embeddings.to(feats.dtype))
        logits = CLIP_LOGIT_SCALE * class_max(cos.float(), self.prompt_class, self.num_classes)
        if self.prompt_denoising:
            logits = prompt_denoising(logits, self.pd_threshold)
        if self.key_smoothing:
            probs = key_smoothing(logits.softmax(dim=1), keys.float(), self.ks_threshold)
            logits = probs.clamp_min(1e-12).log()  # back to logits: softmax(log p) = p / sum(p)
        return logits

    def describe(self) -> dict[str, Any]:
        return {"method": "maskclip", "tower": self.tower, "key_smoothing": self.key_smoothing,
                "prompt_denoising": self.prompt_denoising}

    # -- towers ---------------------------------------------------------------------------------
    def _vit_dense(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v = self.clip.visual
        p = self.stride
        b, _, height, width = images.shape
        # Like the official code: zero-pad bottom/right to whole patches instead of dropping them.
        pad_h, pad_w = (-height) % p, (-width) % p
        if pad_h or pad_w:
            images = F.pad(images, (0, pad_w, 0, pad_h))
        x = v.conv1(images.to(v.conv1.weight.dtype))
        gh, gw = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        cls = v.class_embedding.to(x.dtype).expand(b, 1, -1)
        x = torch.cat([cls, x], dim=1) + resize_pos_embed(v.positional_embedding, v.grid_size, (gh, gw)).to(x.dtype)
        x = v.ln_pre(x)
        blocks = v.transformer.resblocks
        batch_first = getattr(v.transformer, "batch_first", True)
        if not batch_first:
            x = x.transpose(0, 1)
        for blk in blocks[:-1]:
            x = blk(x)
        if not batch_first:
            x = x.transpose(0, 1)
        last = blocks[-1]
        y = last.ln_1(x)
        _, k, val = F.linear(y, last.attn.in_proj_weight, last.attn.in_proj_bias).chunk(3, dim=-1)
        val = last.attn.out_proj(val)
        k = last.attn.out_proj(k)
        x = x + last.ls_1(val)  # attention replaced by identity: the value path, residual kept
        x = x + last.ls_2(last.mlp(last.ln_2(x)))
        feats = v.ln_post(x) @ v.proj
        to_map = lambda t: t[:, 1:].transpose(1, 2).reshape(b, t.shape[-1], gh, gw)  # noqa: E731
        return to_map(feats), to_map(k)

    def _resnet_dense(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v = self.clip.visual
        x = v.stem(images.to(v.conv1.weight.dtype))
        x = v.layer4(v.layer3(v.layer2(v.layer1(x))))
        pool = v.attnpool
        x = x.permute(0, 2, 3, 1)  # 1x1 convolutions = linear layers over channels
        feats = pool.c_proj(pool.v_proj(x)).permute(0, 3, 1, 2)
        keys = pool.k_proj(x).permute(0, 3, 1, 2)
        return feats, keys


def resize_pos_embed(pos: torch.Tensor, grid: tuple[int, int], new_grid: tuple[int, int]) -> torch.Tensor:
    """Position embeddings (1 + gh*gw, C) for a new patch grid: class token kept, the grid resized
    bicubically with align_corners=False and no antialias, as the official MaskCLIP does."""
    grid = tuple(grid)
    if grid == tuple(new_grid):
        return pos
    cls, patches = pos[:1], pos[1:]
    if patches.shape[0] != grid[0] * grid[1]:  # configs whose grid_size was not kept in sync
        side = int(math.isqrt(patches.shape[0]))
        grid = (side, side)
    patches = patches.reshape(1, grid[0], grid[1], -1).permute(0, 3, 1, 2).float()
    patches = F.interpolate(patches, size=new_grid, mode="bicubic", align_corners=False, antialias=False)
    patches = patches.permute(0, 2, 3, 1).reshape(new_grid[0] * new_grid[1], -1).to(pos.dtype)
    return torch.cat([cls, patches], dim=0)
