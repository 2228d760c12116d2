"""Second vision models (VFMs) for ProxyCLIP and CorrCLIP: built from the packages that define them,
weights read as plain tensors, patch features computed as those methods' authors compute them.

Specs (``--proxy``): ``dino:vitb8`` (also vits8, vitb16, vits16), ``dinov2:vitb14-reg`` (also
vits14-reg, vitl14-reg), ``mae:vitb``, ``sam:vitb`` (also vitl, vith), and ``clip``: the CLIP
model's own image tower (no second model; used on the toy world). DINO, DINOv2 and MAE are timm
ViTs, SAM's image encoder comes from ``segment-anything``. Token preparation follows each model's
reference code: DINO resizes its position embeddings by scale factor ``(n + 0.1) / n0`` (bicubic),
DINOv2 with registers by size (bicubic, antialiased), MAE sees every input resized to a square of
``input_side`` (ProxyCLIP's slide crop, 336) and SAM to its own 1024 x 1024.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoints import CheckpointError, load_weights, state_dict_of
from ..errors import UsageError
from .weights import WeightSource, file_identity, resolve_weights

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MAE_INPUT_SIDE = 336  # ProxyCLIP resizes every crop to its slide crop for MAE


@dataclass(frozen=True)
class ProxyArch:
    kind: str
    name: str  # what error messages call it
    build: str  # timm model name, or segment-anything registry key
    source: WeightSource


def _fb(path: str) -> str:
    return "https://dl.fbaipublicfiles.com/" + path


def _timm_source(timm_name: str, hub_file: str, url: str) -> WeightSource:
    return WeightSource(hub_file=hub_file, url=url, hf_repo=f"timm/{timm_name}", hf_file="model.safetensors",
                        download=f"python -c \"import timm; timm.create_model('{timm_name}', pretrained=True)\"")


def _sam_source(hub_file: str) -> WeightSource:
    return WeightSource(hub_file=hub_file, url=_fb(f"segment_anything/{hub_file}"),
                        download=f"python -c \"import torch; torch.hub.load_state_dict_from_url('"
                                 f"{_fb('segment_anything/' + hub_file)}')\"")


def _arch(kind: str, arch: str, name: str, timm_name: str, hub_file: str, url: str) -> tuple[str, ProxyArch]:
    return f"{kind}:{arch}", ProxyArch(kind, name, timm_name, _timm_source(timm_name, hub_file, url))


PROXIES: dict[str, ProxyArch] = dict([
    _arch("dino", "vitb8", "DINO ViT-B/8", "vit_base_patch8_224.dino", "dino_vitbase8_pretrain.pth",
          _fb("dino/dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth")),
    _arch("dino", "vits8", "DINO ViT-S/8", "vit_small_patch8_224.dino", "dino_deitsmall8_pretrain.pth",
          _fb("dino/dino_deitsmall8_pretrain/dino_deitsmall8_pretrain.pth")),
    _arch("dino", "vitb16", "DINO ViT-B/16", "vit_base_patch16_224.dino", "dino_vitbase16_pretrain.pth",
          _fb("dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth")),
    _arch("dino", "vits16", "DINO ViT-S/16", "vit_small_patch16_224.dino", "dino_deitsmall16_pretrain.pth",
          _fb("dino/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth")),
    _arch("dinov2", "vitb14-reg", "DINOv2 ViT-B/14 with registers", "vit_base_patch14_reg4_dinov2.lvd142m",
          "dinov2_vitb14_reg4_pretrain.pth", _fb("dinov2/dinov2_vitb14/dinov2_vitb14_reg4_pretrain.pth")),
    _arch("dinov2", "vits14-reg", "DINOv2 ViT-S/14 with registers", "vit_small_patch14_reg4_dinov2.lvd142m",
          "dinov2_vits14_reg4_pretrain.pth", _fb("dinov2/dinov2_vits14/dinov2_vits14_reg4_pretrain.pth")),
    _arch("dinov2", "vitl14-reg", "DINOv2 ViT-L/14 with registers", "vit_large_patch14_reg4_dinov2.lvd142m",
          "dinov2_vitl14_reg4_pretrain.pth", _fb("dinov2/dinov2_vitl14/dinov2_vitl14_reg4_pretrain.pth")),
    _arch("mae", "vitb", "MAE ViT-B/16", "vit_base_patch16_224.mae", "mae_pretrain_vit_base.pth",
          _fb("mae/pretrain/mae_pretrain_vit_base.pth")),
    ("sam:vitb", ProxyArch("sam", "SAM ViT-B", "vit_b", _sam_source("sam_vit_b_01ec64.pth"))),
    ("sam:vitl", ProxyArch("sam", "SAM ViT-L", "vit_l", _sam_source("sam_vit_l_0b3195.pth"))),
    ("sam:vith", ProxyArch("sam", "SAM ViT-H", "vit_h", _sam_source("sam_vit_h_4b8939.pth"))),
])
KINDS = ("dino", "dinov2", "mae", "sam", "clip")


def check_proxy(spec: str) -> str:
    if spec != "clip" and spec not in PROXIES:
        raise UsageError(f"unknown --proxy '{spec}' (known: {', '.join([*PROXIES, 'clip'])})")
    return spec


def build_vfm(spec: str, weights: str | None = None, clip_visual: nn.Module | None = None,
              cache_dir: str | None = None, device: str | torch.device = "cpu") -> "VFM":
    """The second model named by ``spec`` with its weights (``weights``: a local file, else the usual
    caches, else a download when online; ``WeightsUnavailable`` says how to supply them)."""
    check_proxy(spec)
    if spec == "clip":
        if weights:
            raise UsageError("--proxy clip uses the CLIP model's own image tower: give no --proxy-weights")
        return VFM("clip", clip_visual, spec).to(device).eval()
    arch = PROXIES[spec]
    path = resolve_weights(arch.name, arch.source, weights, "--proxy-weights", cache_dir)
    sd = state_dict_of(load_weights(path), path)
    if arch.kind == "sam":
        model = _sam_image_encoder(arch, sd, path)
    else:
        model = _timm_vit(arch, sd, path)
    return VFM(arch.kind, model, spec, path).to(device).eval()


def _timm_vit(arch: ProxyArch, sd: dict[str, torch.Tensor], path: str) -> nn.Module:
    import timm
    from timm.models.vision_transformer import checkpoint_filter_fn

    model = timm.create_model(arch.build, pretrained=False, num_classes=0)
    sd = checkpoint_filter_fn(dict(sd), model)  # the official DINOv2 layout -> timm's, else unchanged
    sd = {k: v for k, v in sd.items() if not k.startswith(("decoder", "mask_token", "head."))}  # MAE's decoder
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: does not fit {arch.name}: {str(e).strip().splitlines()[0]}") from None
    return model


def _sam_image_encoder(arch: ProxyArch, sd: dict[str, torch.Tensor], path: str) -> nn.Module:
    sam = build_sam(arch.build, sd, path)
    return sam.image_encoder


def build_sam(key: str, sd: dict[str, torch.Tensor], path: str) -> nn.Module:
    """segment-anything's Sam (``vit_b``/``vit_l``/``vit_h``) with a state_dict already read safely."""
    try:
        from segment_anything import sam_model_registry
    except ImportError:
        raise ImportError("SAM needs the segment-anything package: pip install 'seglabel[vfm]'") from None
    sam = sam_model_registry[key](checkpoint=None)  # never its own torch.load
    try:
        sam.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: does not fit SAM {key}: {str(e).strip().splitlines()[0]}") from None
    return sam.eval()


class VFM(nn.Module):
    """Patch features of a second vision model on images in its own normalisation.

    ``features``: the last layer's patch tokens (after the final norm; SAM: its image encoder's
    output), (B, C, I, J) on the model's grid, as ProxyCLIP reads them. ``qk``: ``q + k`` of the
    last block's attention (heads concatenated), as CorrCLIP reads DINO. ``kind`` picks the token
    preparation; ``model`` is the timm ViT, SAM image encoder or CLIP image tower."""

    def __init__(self, kind: str, model: nn.Module, spec: str | None = None, weights_file: str | None = None,
                 input_side: int | None = None) -> None:
        super().__init__()
        if kind not in KINDS:
            raise UsageError(f"unknown VFM kind {kind}")
        self.kind, self.model, self.spec, self.weights_file = kind, model, spec or kind, weights_file
        if kind == "sam":
            self.input_side = input_side or model.img_size
        elif kind == "clip":
            self.input_side = None
        else:
            self.input_side = input_side or (MAE_INPUT_SIDE if kind == "mae" else None)
        # The CLIP tower reads CLIP-normalised images; every other model ImageNet-normalised ones.
        self.mean = None if kind == "clip" else IMAGENET_MEAN
        self.std = None if kind == "clip" else IMAGENET_STD

    def identity(self) -> dict[str, Any]:
        """What the run record and the settings check say about this model."""
        out: dict[str, Any] = {"proxy": self.spec}
        if self.weights_file:
            out["proxy_weights"] = file_identity(self.weights_file)
        return out

    def prepare(self, images: torch.Tensor, mean, std) -> torch.Tensor:
        """Images normalised with (mean, std) -> this model's normalisation (the identity for clip)."""
        if self.mean is None:
            return images
        m0, s0, m1, s1 = (torch.as_tensor(v, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
                          for v in (mean, std, self.mean, self.std))
        return (images * s0 + m0 - m1) / s1

    # -- what the methods read ----------------------------------------------------------------------
    def features(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "sam":
            x = F.interpolate(x, size=(self.input_side, self.input_side), mode="bilinear", align_corners=False)
            return self.model(x.to(self.model.patch_embed.proj.weight.dtype))
        tokens, grid = self._last_block_input(x)
        if self.kind == "clip":
            transformer = self.model.transformer
            out = self.model.ln_post(_clip_blocks(transformer, transformer.resblocks[-1:], tokens))
        else:
            out = self.model.norm(self.model.blocks[-1](tokens))
        return _to_map(out[:, self._prefix():], grid)

    def qk(self, x: torch.Tensor) -> torch.Tensor:
        """``q + k`` of the last attention block on the patch tokens, (B, C, I, J)."""
        if self.kind == "sam":
            raise UsageError("CorrCLIP reads q + k of a plain ViT: use --proxy dino:..., dinov2:..., mae:vitb or clip")
        tokens, grid = self._last_block_input(x)
        if self.kind == "clip":
            last = self.model.transformer.resblocks[-1]
            q, k, _ = F.linear(last.ln_1(tokens), last.attn.in_proj_weight, last.attn.in_proj_bias).chunk(3, dim=-1)
        else:
            last = self.model.blocks[-1]
            q, k, _ = last.attn.qkv(last.norm1(tokens)).chunk(3, dim=-1)
        return _to_map((q + k)[:, self._prefix():], grid)

    # -- token preparation ---------------------------------------------------------------------------
    def _prefix(self) -> int:
        return 1 + (getattr(self.model, "num_reg_tokens", 0) if self.kind == "dinov2" else 0)

    def _last_block_input(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Tokens (B, prefix + I*J, C) entering the last block, and the patch grid (I, J)."""
        if self.kind == "mae" and self.input_side:
            x = F.interpolate(x, size=(self.input_side, self.input_side), mode="bilinear", align_corners=False)
        m = self.model
        conv = m.conv1 if self.kind == "clip" else m.patch_embed.proj
        t = conv(x.to(conv.weight.dtype))  # the patch grid is floor(side / patch), as a strided conv gives
        grid = (t.shape[-2], t.shape[-1])
        t = t.flatten(2).transpose(1, 2)
        b = t.shape[0]
        if self.kind == "clip":
            from .trainingfree import resize_pos_embed_by_scale

            cls = m.class_embedding.to(t.dtype).expand(b, 1, -1)
            t = torch.cat([cls, t], dim=1) + resize_pos_embed_by_scale(m.positional_embedding, m.grid_size, grid).to(t.dtype)
            return _clip_blocks(m.transformer, m.transformer.resblocks[:-1], m.ln_pre(t)), grid
        t = m.patch_embed.norm(t)
        pos = self._pos_embed(grid).to(t.dtype)
        cls = m.cls_token.to(t.dtype).expand(b, -1, -1)
        if self.kind == "dinov2":  # timm's layout: the class token's position entry is folded into it
            reg = m.reg_token.to(t.dtype).expand(b, -1, -1)
            t = torch.cat([cls, reg, t + pos], dim=1)
        else:
            t = torch.cat([cls, t], dim=1) + pos
        t = m.norm_pre(t)
        for blk in m.blocks[:-1]:
            t = blk(t)
        return t, grid

    def _pos_embed(self, grid: tuple[int, int]) -> torch.Tensor:
        m = self.model
        pos = m.pos_embed[0]
        native = tuple(m.patch_embed.grid_size)
        if self.kind == "dinov2":  # no class entry; by size, antialiased, as DINOv2's hub models with registers
            if tuple(grid) == native:
                return pos
            p = pos.float().reshape(1, *native, -1).permute(0, 3, 1, 2)
            p = F.interpolate(p, size=grid, mode="bicubic", antialias=True, align_corners=False)
            return p.permute(0, 2, 3, 1).reshape(-1, pos.shape[-1]).to(pos.dtype)
        if self.kind == "mae":  # by size, once for the square input (MAE's interpolate_pos_embed)
            if tuple(grid) == native:
                return pos
            p = pos[1:].float().reshape(1, *native, -1).permute(0, 3, 1, 2)
            p = F.interpolate(p, size=grid, mode="bicubic", align_corners=False)
            return torch.cat([pos[:1], p.permute(0, 2, 3, 1).reshape(-1, pos.shape[-1]).to(pos.dtype)])
        from .trainingfree import resize_pos_embed_by_scale  # DINO: scale factor (n + 0.1) / n0

        return resize_pos_embed_by_scale(pos, native, grid)


def _clip_blocks(transformer: nn.Module, blocks, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip blocks on batch-first tokens, whatever layout the transformer uses."""
    batch_first = getattr(transformer, "batch_first", True)
    t = tokens if batch_first else tokens.transpose(0, 1)
    for blk in blocks:
        t = blk(t)
    return t if batch_first else t.transpose(0, 1)


def _to_map(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[-1], *grid)
