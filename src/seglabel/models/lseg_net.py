"""The LSeg network (Li et al., ICLR 2022): a DPT decoder on a ViT-L/16 or ResNet-101 backbone that
maps every pixel to a CLIP ViT-B/32 text-embedding space.

Module and parameter names mirror the official code (isl-org/lang-seg) so that its checkpoints load
strictly after removing the Lightning ``net.`` prefix. Sizes are parameters (``LSegConfig``) read
from a checkpoint's shapes, so scaled-down and user-trained variants load the same way.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UsageError

# LSeg compares pixels and texts with a fixed temperature; the stored CLIP logit_scale is unused.
LOGIT_SCALE = 1.0 / 0.07
VIT_MEAN = VIT_STD = (0.5, 0.5, 0.5)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class LSegConfig:
    backbone: str = "vit"  # "vit" (ViT-L/16 384) or "resnet" (ResNet-101)
    features: int = 256  # decoder width (scratch.*)
    out_dim: int = 512  # per-pixel embedding width = CLIP text embedding width
    # ViT backbone
    vit_dim: int = 1024
    vit_depth: int = 24
    vit_grid: int = 24  # pos_embed holds 1 + grid^2 entries (384 / 16)
    vit_classes: int = 1000  # the unused ImageNet head is stored, so it is kept
    reassemble: tuple[int, int, int, int] = (256, 512, 1024, 1024)
    # ResNet backbone (torchvision Bottleneck blocks)
    resnet_layers: tuple[int, int, int, int] = (3, 4, 23, 3)
    resnet_width: int = 64  # torchvision width_per_group
    # CLIP ViT-B/32 text tower
    text: dict[str, int] = field(default_factory=lambda: dict(
        width=512, layers=12, context_length=77, vocab_size=49408, output_dim=512))

    @property
    def hooks(self) -> list[int]:
        """ViT blocks whose outputs feed the decoder: 5, 11, 17, 23 for 24 blocks."""
        step = self.vit_depth // 4
        return [step * (i + 1) - 1 for i in range(4)]

    @property
    def mean(self) -> tuple[float, float, float]:
        return VIT_MEAN if self.backbone == "vit" else IMAGENET_MEAN

    @property
    def std(self) -> tuple[float, float, float]:
        return VIT_STD if self.backbone == "vit" else IMAGENET_STD

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- decoder pieces -------------------------------------------------------------------------------
class ProjectReadout(nn.Module):
    """Readout 'project': each patch token concatenated with the class token, Linear, exact GELU."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.project = nn.Sequential(nn.Linear(2 * dim, dim), nn.GELU())

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        patches = tokens[:, 1:]
        cls = tokens[:, :1].expand_as(patches)
        return self.project(torch.cat([patches, cls], dim=-1))


class Reassemble(nn.Module):
    """Tokens of one ViT block -> a feature map at one scale.

    The official module is an nn.Sequential (readout, transpose, unflatten, 1x1 conv, resample);
    the children keep its indices 0, 3 and 4 so that the checkpoint's keys match (1 and 2 have no
    parameters and are done inline, since the grid size changes with the input)."""

    def __init__(self, vit_dim: int, out: int, resample: nn.Module | None) -> None:
        super().__init__()
        self.add_module("0", ProjectReadout(vit_dim))
        self.add_module("3", nn.Conv2d(vit_dim, out, kernel_size=1))
        if resample is not None:
            self.add_module("4", resample)

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        x = self._modules["0"](tokens).transpose(1, 2).unflatten(2, grid)
        x = self._modules["3"](x)
        return self._modules["4"](x) if "4" in self._modules else x


class ResidualConvUnit(nn.Module):
    """x + bn2(conv2(relu(bn1(conv1(relu(x)))))); not in place, the skip adds the input as given."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(features, features, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(features)
        self.bn2 = nn.BatchNorm2d(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn1(self.conv1(F.relu(x)))
        out = self.bn2(self.conv2(F.relu(out)))
        return out + x


class FusionBlock(nn.Module):
    """DPT feature fusion: (x0 + RCU1(x1)) -> RCU2 -> bilinear x2 (align_corners=True) -> 1x1 conv."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.resConfUnit1 = ResidualConvUnit(features)
        self.resConfUnit2 = ResidualConvUnit(features)
        self.out_conv = nn.Conv2d(features, features, kernel_size=1)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if skip is not None:
            x = x + self.resConfUnit1(skip)
        x = self.resConfUnit2(x)
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
        return self.out_conv(x)


# -- backbones --------------------------------------------------------------------------------------
class ViTBackbone(nn.Module):
    """timm ViT-L/16 read at four depths and reassembled to 1/4, 1/8, 1/16 and 1/32 of the input."""

    def __init__(self, cfg: LSegConfig) -> None:
        super().__init__()
        import timm

        d = cfg.vit_dim
        # vit_large_patch16_384 with sizes overridable for scaled-down variants; heads of width 64.
        self.model = timm.create_model(
            "vit_large_patch16_384", pretrained=False, img_size=cfg.vit_grid * 16, embed_dim=d,
            depth=cfg.vit_depth, num_heads=max(1, d // 64), num_classes=cfg.vit_classes)
        r = cfg.reassemble
        self.act_postprocess1 = Reassemble(d, r[0], nn.ConvTranspose2d(r[0], r[0], 4, stride=4))
        self.act_postprocess2 = Reassemble(d, r[1], nn.ConvTranspose2d(r[1], r[1], 2, stride=2))
        self.act_postprocess3 = Reassemble(d, r[2], None)
        self.act_postprocess4 = Reassemble(d, r[3], nn.Conv2d(r[3], r[3], 3, stride=2, padding=1))
        self.hooks = cfg.hooks

    def pos_embed(self, grid: tuple[int, int]) -> torch.Tensor:
        """The stored 384-pixel position embeddings resized to a patch grid: class entry kept,
        the rest bilinear, align_corners=False, no antialias (as the official _resize_pos_embed)."""
        pos = self.model.pos_embed
        cls, patches = pos[:, :1], pos[:, 1:]
        side = int(round(patches.shape[1] ** 0.5))
        patches = patches.reshape(1, side, side, -1).permute(0, 3, 1, 2)
        patches = F.interpolate(patches, size=grid, mode="bilinear", align_corners=False)
        return torch.cat([cls, patches.permute(0, 2, 3, 1).flatten(1, 2)], dim=1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        vit = self.model
        grid = (x.shape[2] // 16, x.shape[3] // 16)
        tokens = vit.patch_embed.proj(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([vit.cls_token.expand(x.shape[0], -1, -1), tokens], dim=1)
        tokens = tokens + self.pos_embed(grid).to(tokens.dtype)
        taken = []
        for i, block in enumerate(vit.blocks[: self.hooks[-1] + 1]):  # later blocks and norm are unused
            tokens = block(tokens)
            if i in self.hooks:
                taken.append(tokens)
        heads = (self.act_postprocess1, self.act_postprocess2, self.act_postprocess3, self.act_postprocess4)
        return [head(t, grid) for head, t in zip(heads, taken)]


class ResNetBackbone(nn.Module):
    """torchvision ResNet-101 stages; ``layer1`` holds the stem, as in the official code."""

    def __init__(self, cfg: LSegConfig) -> None:
        super().__init__()
        from torchvision.models.resnet import Bottleneck, ResNet

        net = ResNet(Bottleneck, list(cfg.resnet_layers), width_per_group=cfg.resnet_width)
        self.layer1 = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1)
        self.layer2, self.layer3, self.layer4 = net.layer2, net.layer3, net.layer4

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = [self.layer1(x)]
        for layer in (self.layer2, self.layer3, self.layer4):
            out.append(layer(out[-1]))
        return out


def build_text_tower(text: dict[str, int]) -> nn.Module:
    """The OpenAI CLIP text transformer (QuickGELU, heads of width 64, causal mask, argmax pool)."""
    from open_clip.transformer import QuickGELU, TextTransformer

    return TextTransformer(context_length=text["context_length"], vocab_size=text["vocab_size"],
                           width=text["width"], heads=max(1, text["width"] // 64), layers=text["layers"],
                           output_dim=text["output_dim"], act_layer=QuickGELU)


# -- the network ----------------------------------------------------------------------------------
class LSegNet(nn.Module):
    """Image (B, 3, H, W), H and W multiples of 32 -> pixel embeddings (B, out_dim, H/2, W/2)."""

    def __init__(self, cfg: LSegConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.clip_pretrained = build_text_tower(cfg.text)
        if cfg.backbone == "vit":
            self.pretrained: nn.Module = ViTBackbone(cfg)
            widths = list(cfg.reassemble)
        else:
            self.pretrained = ResNetBackbone(cfg)
            widths = [64 * 4 * 2 ** i for i in range(4)]  # Bottleneck outputs 256 ... 2048
        f = cfg.features
        self.scratch = nn.Module()
        for i, w in enumerate(widths, 1):
            setattr(self.scratch, f"layer{i}_rn", nn.Conv2d(w, f, 3, padding=1, bias=False))
        for i in range(1, 5):
            setattr(self.scratch, f"refinenet{i}", FusionBlock(f))
        self.scratch.head1 = nn.Conv2d(f, cfg.out_dim, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.scratch
        l1, l2, l3, l4 = self.pretrained(x)
        path = s.refinenet4(s.layer4_rn(l4))
        path = s.refinenet3(path, s.layer3_rn(l3))
        path = s.refinenet2(path, s.layer2_rn(l2))
        path = s.refinenet1(path, s.layer1_rn(l1))
        return s.head1(path)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.clip_pretrained(tokens)


def build_lseg_net(variant: str = "vit", device: str | torch.device = "meta", **overrides: Any) -> LSegNet:
    """A randomly initialised LSegNet; on the meta device nothing is allocated.

    ``variant`` is "vit" (ViT-L/16) or "resnet" (ResNet-101); ``overrides`` replace fields of
    ``LSegConfig`` (e.g. vit_dim=64, vit_depth=4, text=dict(width=64, ...)) for small test models."""
    if variant not in ("vit", "resnet"):
        raise UsageError(f"LSeg variant must be 'vit' or 'resnet', not '{variant}'")
    cfg = replace(LSegConfig(backbone=variant), **overrides)
    if "text" in overrides:
        cfg = replace(cfg, text={**LSegConfig().text, **overrides["text"]})
    with torch.device(device):
        net = LSegNet(cfg)
    return net.eval()
