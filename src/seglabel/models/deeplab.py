"""DeepLabv2 student of MaskCLIP+: a dilated ResNet-v1c, an ASPP head into the CLIP embedding
space, and a frozen classifier made of the label set's CLIP text embeddings.

Because the classifier is text, a trained student stays open-vocabulary: ``set_labels`` with
another label set encodes it with the CLIP text encoder recorded in ``student.pt``.

Key layout follows mmsegmentation's ResNetV1c (``stem.0`` ... ``layer4.N.conv3``) so its
checkpoints load as they are; torchvision and timm layouts are mapped by ``distill/backbone.py``.
``student.pt`` (written by distill, read by ``annotate --model student:FILE``) is defined here.
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoints import CheckpointError, load_weights
from ..errors import UsageError
from ..labelset import LabelSet, parse_labelset
from ..text import class_max, encode_prompts, labelset_templates
from .base import Segmenter

STUDENT_FORMAT = "seglabel-student/1"
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the backbone is an ImageNet ResNet, as in mmseg
IMAGENET_STD = (0.229, 0.224, 0.225)
# The student is trained with cross-entropy on its raw dot products, so softmax(raw) is already
# the confidence it learnt; scaling would only sharpen or flatten it. Argmax never depends on it.
STUDENT_LOGIT_SCALE = 1.0
DEPTHS = {18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)),
          50: ("bottleneck", (3, 4, 6, 3)), 101: ("bottleneck", (3, 4, 23, 3))}


@dataclass
class StudentArch:
    """Everything needed to rebuild the network (stored in student.pt and last.pt)."""

    embed_dim: int = 512  # D: the CLIP joint-embedding width
    depth: int = 101
    block: str = "bottleneck"  # bottleneck | basic (small students for tests)
    layers: tuple[int, ...] = (3, 4, 23, 3)
    width: int = 64  # channels of layer1's 3x3 convs; doubles each stage
    stem_width: int = 64
    dilations: tuple[int, ...] = (1, 1, 2, 4)  # per stage: output stride 8
    strides: tuple[int, ...] = (1, 2, 1, 1)
    aspp_dilations: tuple[int, ...] = (6, 12, 18, 24)
    # mmseg's -d8 configs halve the dilation of the first block of a dilated stage
    contract_dilation: bool = True
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    # How labelling upsamples the logits of 8x8 cells to pixels: "bilinear" (MaskCLIP+), or "guided"
    # by the image's colours (models/guided.py). Training's losses always read bilinear logits.
    upsample: str = "bilinear"

    @classmethod
    def resnet(cls, depth: int = 101, embed_dim: int = 512, **kw: Any) -> "StudentArch":
        if depth not in DEPTHS:
            raise UsageError(f"--depth {depth}: choose one of {', '.join(map(str, DEPTHS))}")
        block, layers = DEPTHS[depth]
        return cls(embed_dim=embed_dim, depth=depth, block=block, layers=layers, **kw)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "StudentArch":
        d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


# -- backbone -----------------------------------------------------------------------------------
class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, width: int, stride: int, dilation: int, downsample: nn.Module | None):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 3, stride, dilation, dilation, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, 1, dilation, dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int, dilation: int, downsample: nn.Module | None):
        super().__init__()
        # stride on the 3x3 conv ("pytorch" style, ResNet v1.5): as torchvision, timm and mmseg
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, dilation, dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, width * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(width * 4)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


def _conv_bn_relu(cin: int, cout: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class ResNetV1c(nn.Module):
    """ResNet with the deep stem (three 3x3 convs) and dilated late stages."""

    def __init__(self, arch: StudentArch):
        super().__init__()
        block = Bottleneck if arch.block == "bottleneck" else BasicBlock
        s = arch.stem_width
        self.stem = nn.Sequential(*_conv_bn_relu(3, s // 2, 2), *_conv_bn_relu(s // 2, s // 2, 1),
                                  *_conv_bn_relu(s // 2, s, 1))
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = s
        for i, (n, stride, dil) in enumerate(zip(arch.layers, arch.strides, arch.dilations)):
            width = arch.width * 2 ** i
            downsample = None
            if stride != 1 or cin != width * block.expansion:
                downsample = nn.Sequential(nn.Conv2d(cin, width * block.expansion, 1, stride, bias=False),
                                           nn.BatchNorm2d(width * block.expansion))
            first_dil = dil // 2 if arch.contract_dilation and dil > 1 else dil
            blocks = [block(cin, width, stride, first_dil, downsample)]
            cin = width * block.expansion
            blocks += [block(cin, width, 1, dil, None) for _ in range(n - 1)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.out_channels = cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.stem(x))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class ASPPv2(nn.Module):
    """DeepLabv2 ASPP: parallel dilated 3x3 convs (each + BN + ReLU), outputs summed."""

    def __init__(self, cin: int, cout: int, dilations: tuple[int, ...]):
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Sequential(nn.Conv2d(cin, cout, 3, 1, d, d, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))
            for d in dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(self._branch(branch, x) for branch in self.branches)

    @staticmethod
    def _branch(branch: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        conv = branch[0]
        d = conv.dilation[0]
        if d < x.shape[-2] or d < x.shape[-1]:
            return branch(x)
        # A map no larger than the dilation (small inputs: 64 px -> 8 x 8): the eight outer taps
        # only ever read the zero padding, so the 3x3 conv is its centre tap, a 1x1 conv (exact,
        # gradients included, at a ninth of the cost).
        out = F.conv2d(x, conv.weight[:, :, 1:2, 1:2], conv.bias)
        return branch[2](branch[1](out))


# -- the student --------------------------------------------------------------------------------
class DeepLabV2Student(Segmenter):
    cell = 8  # output stride of the network

    @property
    def stride(self) -> int:
        """8, or 1 when labelling with guided upsampling (the logits come at every pixel)."""
        return 1 if self.arch.upsample == "guided" and not self.training else self.cell

    @property
    def pad_to(self) -> int:
        return self.cell

    def __init__(self, arch: StudentArch, clip_spec: dict[str, Any] | None = None):
        super().__init__()
        self.arch = arch
        self.mean, self.std = tuple(arch.mean), tuple(arch.std)
        self.backbone = ResNetV1c(arch)
        self.aspp = ASPPv2(self.backbone.out_channels, arch.embed_dim, arch.aspp_dilations)
        # The classifier: one L2-normalised text embedding per prompt, a buffer so that no optimizer
        # ever sees it. Not persistent: its shape follows the label set, stored beside the weights.
        self.register_buffer("text_embeddings", torch.zeros(0, arch.embed_dim), persistent=False)
        self.prompt_class: list[int] = []
        self.num_classes = 0
        self.text_key: dict[str, Any] | None = None  # which prompts/templates the embeddings encode
        self.clip_spec = clip_spec  # the CLIP text encoder that makes the classifier
        self.logit_scale = STUDENT_LOGIT_SCALE
        self.cache_dir: str | None = None
        self.weights_info: dict[str, Any] = {}
        self.fused = False  # fuse_for_inference

    # -- text side ------------------------------------------------------------------------------
    def set_text(self, embeddings: torch.Tensor, labelset: LabelSet) -> None:
        if embeddings.shape != (len(labelset.prompts), self.arch.embed_dim):
            raise CheckpointError(f"text embeddings {tuple(embeddings.shape)} do not fit {len(labelset.prompts)} "
                             f"prompts of width {self.arch.embed_dim}")
        self.text_embeddings = F.normalize(embeddings.float(), dim=-1).to(self.text_embeddings.device)
        self.prompt_class = labelset.prompt_class
        self.num_classes = len(labelset)
        self.text_key = text_key(labelset)

    def set_labels(self, labelset: LabelSet) -> None:
        if self.text_key == text_key(labelset):
            self.prompt_class, self.num_classes = labelset.prompt_class, len(labelset)
            return  # same prompts and templates: the stored embeddings are the answer, no CLIP needed
        if not self.clip_spec:
            raise UsageError("this student records no CLIP text encoder, so it can only label its own label set")
        self.set_text(encode_labelset(self.clip_spec, labelset, cache_dir=self.cache_dir), labelset)

    # -- image side -----------------------------------------------------------------------------
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Dense embeddings (B, D, H/8, W/8) in CLIP's joint space (not normalised, as MaskCLIP+)."""
        return self.aspp(self.backbone(images))

    def raw_logits(self, images: torch.Tensor) -> torch.Tensor:
        """Dot products with the frozen text embeddings, pooled to classes (B, K, H/8, W/8)."""
        if self.num_classes == 0:
            raise RuntimeError("call set_labels(labelset) before using the student")
        feats = self.features(images)
        weight = self.text_embeddings.to(feats.dtype)[:, :, None, None]
        return class_max(F.conv2d(feats, weight), self.prompt_class, self.num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.fused:
            images = images.contiguous(memory_format=torch.channels_last)
        logits = self.raw_logits(images)
        if self.training:
            return logits
        if self.arch.upsample == "guided":
            from .guided import guided_upsample

            mean, std = (torch.tensor(v, device=images.device).view(1, 3, 1, 1) for v in (self.mean, self.std))
            logits = guided_upsample(logits, (images.float() * std + mean).clamp(0, 1), self.cell)
        return self.logit_scale * logits.float()

    def describe(self) -> dict[str, Any]:
        return {"method": "maskclip+ student (deeplabv2)", "arch": self.arch.to_dict(),
                "logit_scale": self.logit_scale, "text_encoder": self.clip_spec}

    def fuse_for_inference(self) -> "DeepLabV2Student":
        """Fold every batch norm into the convolution before it (the same function, fewer passes
        over memory) and keep activations channels-last (faster convolutions on CPUs and tensor
        cores). For labelling only: the folded model cannot train, and its state_dict has other keys."""
        from torch.nn.utils.fusion import fuse_conv_bn_eval

        self.eval()
        for module in list(self.modules()):
            if isinstance(module, nn.Sequential):  # the stem, ASPP branches, downsample shortcuts
                for i in range(len(module) - 1):
                    if isinstance(module[i], nn.Conv2d) and isinstance(module[i + 1], nn.BatchNorm2d):
                        module[i], module[i + 1] = fuse_conv_bn_eval(module[i], module[i + 1]), nn.Identity()
            for conv, bn in (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")):  # residual blocks
                if isinstance(getattr(module, bn, None), nn.BatchNorm2d):
                    setattr(module, conv, fuse_conv_bn_eval(getattr(module, conv), getattr(module, bn)))
                    setattr(module, bn, nn.Identity())
        self.fused = True
        return self.to(memory_format=torch.channels_last)


def text_key(labelset: LabelSet) -> dict[str, Any]:
    return {"prompts": labelset.prompts, "templates": list(labelset_templates(labelset))}


def build_text_encoder(clip_spec: dict[str, Any], cache_dir: str | None = None, device: str | torch.device = "cpu"):
    """(CLIP model, tokenizer) from a spec {"model", "pretrained", "config"}; the config dict, when
    present, is registered under the model's name so the spec needs no file besides the weights."""
    import open_clip

    from .clip import create_clip, register_model_config

    name = clip_spec["model"]
    config = clip_spec.get("config")
    if config and open_clip.get_model_config(name) != config:
        folder = tempfile.mkdtemp(prefix="seglabel-clip-config-")
        path = Path(folder) / f"{name}.json"
        path.write_text(json.dumps(config), encoding="utf-8")
        register_model_config(path)
    clip_model, tokenizer, _ = create_clip(name, clip_spec.get("pretrained"), cache_dir=cache_dir, device=device)
    return clip_model, tokenizer


def encode_labelset(clip_spec: dict[str, Any], labelset: LabelSet, cache_dir: str | None = None,
                    device: str | torch.device = "cpu") -> torch.Tensor:
    clip_model, tokenizer = build_text_encoder(clip_spec, cache_dir, device)
    emb = encode_prompts(clip_model.encode_text, tokenizer, labelset.prompts, labelset_templates(labelset), device)
    return emb.cpu()


# -- student.pt ---------------------------------------------------------------------------------
def student_checkpoint(model: DeepLabV2Student, labelset: LabelSet, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Plain tensors, numbers and strings only, so ``load_weights`` (weights_only) reads it."""
    return {
        "format": STUDENT_FORMAT,
        "arch": model.arch.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "labelset": labelset.to_dict(),
        "text_embeddings": model.text_embeddings.detach().cpu(),
        "text_key": text_key(labelset),
        "clip": model.clip_spec,
        "logit_scale": model.logit_scale,
        "trained": extra or {},
    }


def student_from_checkpoint(ckpt: dict[str, Any], source: str = "<student>") -> tuple[DeepLabV2Student, LabelSet]:
    if not isinstance(ckpt, dict) or ckpt.get("format") != STUDENT_FORMAT:
        raise CheckpointError(f"{source}: not a seglabel student checkpoint (made by `seglabel distill`)")
    missing = [k for k in ("arch", "state_dict", "labelset", "text_embeddings") if k not in ckpt]
    if missing:
        raise CheckpointError(f"{source}: an incomplete student checkpoint (no {', '.join(missing)})")
    try:
        model = DeepLabV2Student(StudentArch.from_dict(ckpt["arch"]), ckpt.get("clip"))
    except (TypeError, ValueError, AttributeError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"{source}: its architecture cannot be built ({type(e).__name__}: {e})") from None
    try:
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{source}: weights do not fit its architecture: {str(e).splitlines()[0]}") from None
    labelset = parse_labelset(ckpt["labelset"], source=f"{source}:labelset")
    model.set_text(ckpt["text_embeddings"], labelset)
    model.logit_scale = float(ckpt.get("logit_scale", STUDENT_LOGIT_SCALE))
    return model, labelset


def build_student(path: str, device: str | torch.device = "cpu", cache_dir: str | None = None,
                  pretrained: str | None = None, **_: Any) -> Segmenter:
    """``--model student:PATH``. ``pretrained``, when it names an existing file, replaces the
    recorded CLIP weights file for re-encoding other label sets (a moved weights file)."""
    ckpt = load_weights(path)
    model, _ = student_from_checkpoint(ckpt, str(path))
    if pretrained and Path(pretrained).is_file() and model.clip_spec:
        model.clip_spec = {**model.clip_spec, "pretrained": str(pretrained)}
    model.cache_dir = cache_dir
    trained = ckpt.get("trained") if isinstance(ckpt.get("trained"), dict) else {}
    base = trained.get("base_size")
    if isinstance(base, int) and not isinstance(base, bool) and base > 0:
        model.default_protocol = {"short_side": base}  # the scale it learnt at, unless --short-side says otherwise
    model.weights_info = {"pretrained": str(path), "weights_file": str(path),
                          "text_encoder": {k: v for k, v in (model.clip_spec or {}).items() if k != "config"}}
    return model.to(device).fuse_for_inference()
