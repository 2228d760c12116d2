"""MaskCLIP and its training-free successors: dense labels read from a CLIP image encoder,
classified by CLIP text embeddings.

Only the end of the image tower changes (``method``):
- ``maskclip`` (Zhou et al., ECCV 2022). ViT: in the last block the attention is replaced by the
  identity on the value path; the residual and the MLP are kept. ResNet: the attention pool becomes
  two 1x1 convolutions, ``c_proj(v_proj(layer4))``.
- ``clearclip``, ``sclip``, ``naclip``, ``scclip`` (ViT only): other last blocks, see
  ``trainingfree.py``; each resizes the position embeddings its own way.
- ``proxyclip``, ``corrclip`` (ViT only, with a second vision model): subclasses in
  ``proxyclip.py`` and ``corrclip.py``.
Then ``ln_post`` and ``proj`` give one embedding per patch, compared with the text embeddings by
cosine (``patch_logits``); ``forward`` scales the cosines by the method's logit scale.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UsageError
from ..labelset import LabelSet
from ..refine import key_smoothing, prompt_denoising
from ..text import cached_text_embeddings, class_max, encode_prompts, indistinct_warnings, labelset_templates
from . import trainingfree as tf
from .base import Segmenter

# Softmax temperature of CLIP (exp of its logit scale), used by the official refinements
# and here for per-pixel confidence; argmax does not depend on it.
CLIP_LOGIT_SCALE = 100.0


class MaskCLIP(Segmenter):
    def __init__(
        self,
        clip_model: nn.Module,
        tokenizer: Callable[[list[str]], torch.Tensor] | None = None,
        method: str = "maskclip",
        logit_scale: float | None = None,
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
                raise UsageError("MaskCLIP needs standard attention blocks (nn.MultiheadAttention) in the ViT")
            if visual.attn_pool is not None or visual.proj is None:
                raise UsageError("MaskCLIP needs a ViT with a class token and a projection (no attentional pool)")
            self.tower = "vit"
            self.stride = visual.patch_size[0]
        elif isinstance(visual, ModifiedResNet):
            self.tower = "resnet"
            self.stride = 32
        else:
            raise UsageError(f"MaskCLIP supports open_clip ViT and ModifiedResNet image towers, not {type(visual).__name__}")
        self.method = tf.check_method(method)
        if method in tf.VFM_METHODS and not hasattr(self, "vfm_method"):
            raise ValueError(f"method {method} needs a second vision model: build it with "
                             f"load_segmenter(..., method='{method}', proxy=...)")
        if self.tower != "vit" and method != "maskclip":
            raise UsageError(f"method {method} needs a ViT image tower; ResNet towers support maskclip only")
        self.logit_scale = float(logit_scale or tf.LOGIT_SCALES[method])
        if self.method == "scclip":
            self.scclip_indices = tf.scclip_indices(len(visual.transformer.resblocks))
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
        self.label_warnings = tuple(indistinct_warnings(labelset, self.tokenizer, templates, "this model's text encoder"))
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
        logits = self.class_logits(cos.float())
        if self.prompt_denoising:
            logits = prompt_denoising(logits, self.pd_threshold)
        if self.key_smoothing:
            probs = key_smoothing(logits.softmax(dim=1), keys.float(), self.ks_threshold)
            logits = probs.clamp_min(1e-12).log()  # back to logits: softmax(log p) = p / sum(p)
        return logits

    def class_logits(self, cos: torch.Tensor) -> torch.Tensor:
        """Per-prompt cosines (B, P, h, w) -> class logits (B, K, h, w) for a softmax over classes.

        ``maskclip``: the best prompt's cosine of each class, times the logit scale (CLIP's
        temperature, 100). The other methods, as their authors: softmax(scale * cosine) over all
        prompts, max over a class's prompts; returned as log-probabilities (with one prompt per
        class simply scale * cosine, so upsampling and PAMR act on the authors' linear logits)."""
        if self.method == "maskclip":
            return self.logit_scale * class_max(cos, self.prompt_class, self.num_classes)
        logits = self.logit_scale * cos
        if len(self.prompt_class) == self.num_classes:
            return logits
        probs = class_max(logits.softmax(dim=1), self.prompt_class, self.num_classes)
        return probs.clamp_min(1e-30).log()

    def describe(self) -> dict[str, Any]:
        out = {"method": self.method, "tower": self.tower, "key_smoothing": self.key_smoothing,
               "prompt_denoising": self.prompt_denoising}
        if self.logit_scale != tf.LOGIT_SCALES[self.method]:  # runs at the defaults keep their old record
            out["logit_scale"] = self.logit_scale
        return out

    # -- towers ---------------------------------------------------------------------------------
    def _vit_dense(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v = self.clip.visual
        p = self.stride
        b, _, height, width = images.shape
        # Like the official MaskCLIP: zero-pad bottom/right to whole patches instead of dropping them.
        pad_h, pad_w = (-height) % p, (-width) % p
        if pad_h or pad_w:
            images = F.pad(images, (0, pad_w, 0, pad_h))
        x = v.conv1(images.to(v.conv1.weight.dtype))
        grid = tuple(x.shape[-2:])
        x = x.flatten(2).transpose(1, 2)
        cls = v.class_embedding.to(x.dtype).expand(b, 1, -1)
        resize = resize_pos_embed if self.method == "maskclip" else tf.resize_pos_embed_by_scale
        x = torch.cat([cls, x], dim=1) + resize(v.positional_embedding, v.grid_size, grid).to(x.dtype)
        x = v.ln_pre(x)
        outputs = self._blocks(x, keep_all=self.method == "scclip")
        last = v.transformer.resblocks[-1]
        if self.method == "scclip":  # one image at a time, as the authors' code
            pairs = [tf.scclip_tokens(last, [o[i] for o in outputs], grid, self.scclip_indices) for i in range(b)]
            tokens = torch.stack([t for t, _ in pairs])
            keys = torch.stack([k for _, k in pairs])
        else:
            tokens, keys = tf.LAST_BLOCKS[self.method](last, outputs[-1], grid)
            tokens, keys = tokens[:, 1:], keys[:, 1:]  # class token dropped
        feats = v.ln_post(tokens) @ v.proj
        to_map = lambda t: t.transpose(1, 2).reshape(b, t.shape[-1], *grid)  # noqa: E731
        return to_map(feats), to_map(keys)

    def _blocks(self, x: torch.Tensor, keep_all: bool) -> list[torch.Tensor]:
        """Outputs (B, 1 + N, C) of every block but the last (only the final one unless keep_all)."""
        transformer = self.clip.visual.transformer
        batch_first = getattr(transformer, "batch_first", True)
        if not batch_first:
            x = x.transpose(0, 1)
        outputs = []
        for blk in transformer.resblocks[:-1]:
            x = blk(x)
            if keep_all:
                outputs.append(x if batch_first else x.transpose(0, 1))
        return outputs if keep_all else [x if batch_first else x.transpose(0, 1)]

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
