"""The student's starting weights: a ResNet state dict (torchvision, timm or mmseg layout) mapped
onto ``models.deeplab.ResNetV1c``, or ImageNet weights found in the caches their own packages fill
(downloaded on first use where there is network, like CLIP's), or none (random init).

``--backbone-weights imagenet`` takes, by depth, the ImageNet ResNet closest to MaskCLIP+'s
ResNet-v1c: timm's ``resnet50c`` / ``resnet101c`` (gluon, ImageNet-1k: the same deep stem and
downsampling), and torchvision's ResNet-18/34 (whose 7x7 stem cannot fill the deep stem: it
starts from random init). Offline and not cached: one line saying how to supply them or to pass
``--backbone-weights none``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..checkpoints import CheckpointError, load_weights, state_dict_of
from ..errors import UsageError
from ..models.deeplab import DEPTHS, DeepLabV2Student, ResNetV1c

# depth -> (what it is, where it is cached / downloaded from)
IMAGENET = {
    18: ("torchvision ResNet-18 (ImageNet-1k)", "tv", "ResNet18_Weights"),
    34: ("torchvision ResNet-34 (ImageNet-1k)", "tv", "ResNet34_Weights"),
    50: ("timm resnet50c.gluon_in1k (ImageNet-1k)", "timm", "resnet50c.gluon_in1k"),
    101: ("timm resnet101c.gluon_in1k (ImageNet-1k)", "timm", "resnet101c.gluon_in1k"),
}


@dataclass
class BackboneReport:
    layout: str
    loaded: int = 0
    not_loaded: list[str] = field(default_factory=list)  # ours, left at random init
    unused: list[str] = field(default_factory=list)  # theirs, not needed (classifier head)
    note: str = ""

    def summary(self) -> str:
        text = f"backbone weights ({self.layout} layout): {self.loaded} tensors loaded"
        if self.not_loaded:
            text += f"; {len(self.not_loaded)} left at random init"
        if self.unused:
            text += f"; {len(self.unused)} unused ({', '.join(sorted({k.split('.')[0] for k in self.unused}))})"
        return text + (f". {self.note}" if self.note else "")


_TIMM_STEM = {"conv1.0": "stem.0", "conv1.1": "stem.1", "conv1.3": "stem.3", "conv1.4": "stem.4",
              "conv1.6": "stem.6", "bn1": "stem.7"}


def detect_layout(sd: dict[str, torch.Tensor]) -> str:
    keys = set(sd)
    if any(k.startswith("backbone.") for k in keys) or any(k.startswith("stem.") for k in keys):
        return "mmseg"
    if "conv1.0.weight" in keys:
        return "timm"  # timm's deep-stem variants (resnet50c/d, resnet101c/d)
    if "conv1.weight" in keys and sd["conv1.weight"].shape[-1] == 7:
        return "torchvision"  # also timm's plain resnet50/101: the same keys
    raise CheckpointError("not a ResNet state_dict seglabel knows (torchvision, timm or mmseg keys)")


def map_backbone_state(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], BackboneReport]:
    """Their keys -> ours, for ``ResNetV1c``. Keys of a 7x7 stem and a classifier are reported."""
    layout = detect_layout(sd)
    report = BackboneReport(layout)
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key.endswith("num_batches_tracked"):
            continue
        k = key
        if layout == "mmseg":
            if not k.startswith(("backbone.", "stem.", "layer")):
                report.unused.append(key)  # decode_head, auxiliary_head
                continue
            k = k.removeprefix("backbone.")
        elif layout == "timm":
            prefix = next((p for p in _TIMM_STEM if k.startswith(p + ".")), None)
            if prefix:
                k = _TIMM_STEM[prefix] + k[len(prefix):]
        if k.startswith(("stem.", "layer")):
            out[k] = value
        else:
            report.unused.append(key)  # fc, and torchvision's 7x7 conv1/bn1
    if layout == "torchvision":
        report.note = ("torchvision's ResNet has a single 7x7 stem conv; the v1c deep stem (three 3x3 "
                       "convs) cannot take it, so the stem starts from random init and learns from the "
                       "pseudo-labels (mmseg/timm 'c' or 'd' weights include a deep stem)")
    return out, report


def load_backbone(backbone: ResNetV1c, sd: dict[str, torch.Tensor], source: str = "<weights>") -> BackboneReport:
    """Load mapped weights; every key of stages 1-4 must be there with the right shape (strict),
    only the stem may be missing (torchvision)."""
    mapped, report = map_backbone_state(sd)
    ours = {k: v for k, v in backbone.state_dict().items() if not k.endswith("num_batches_tracked")}
    wrong = [f"{k} {tuple(mapped[k].shape)} vs {tuple(v.shape)}" for k, v in ours.items()
             if k in mapped and mapped[k].shape != v.shape]
    if wrong:
        raise CheckpointError(f"{source}: {len(wrong)} tensors do not fit this ResNet (first: {wrong[0]}); "
                              f"is --depth right?")
    extra = sorted(set(mapped) - set(ours))
    if extra:
        raise CheckpointError(f"{source}: {len(extra)} backbone tensors have no place here (first: {extra[0]}); "
                              f"is --depth right?")
    missing = sorted(set(ours) - set(mapped))
    bad = [k for k in missing if not k.startswith("stem.")]
    if bad:
        raise CheckpointError(f"{source}: {len(bad)} backbone tensors are missing (first: {bad[0]}); is --depth right?")
    backbone.load_state_dict(mapped, strict=False)
    report.loaded, report.not_loaded = len(mapped), missing
    return report


def imagenet_file(depth: int, cache_dir: str | None = None) -> str:
    """The ImageNet weights file of a ResNet of ``depth``: cached by torchvision (torch hub) or timm
    (Hugging Face), else downloaded there; offline, a one-line ``WeightsUnavailable``."""
    from ..models.weights import WeightSource, resolve_weights

    name, package, which = IMAGENET[depth]
    if package == "tv":
        import torchvision

        url = getattr(torchvision.models, which).IMAGENET1K_V1.url
        source = WeightSource(hub_file=url.rsplit("/", 1)[-1], url=url,
                              download=f"python -c \"import torchvision; torchvision.models.resnet{depth}"
                                       f"(weights='IMAGENET1K_V1')\"")
    else:
        source = WeightSource(hf_repo=f"timm/{which}", hf_file="model.safetensors",
                              download=f"python -c \"import timm; timm.create_model('{which}', pretrained=True)\"")
    try:
        return resolve_weights(f"ImageNet ResNet-{depth} ({name})", source, None, "--backbone-weights", cache_dir)
    except UsageError as e:
        raise type(e)(f"{e}; or --backbone-weights none to start from random init") from None


def check_backbone(spec: str, depth: int, width: int, stem_width: int) -> None:
    """Refuse before any work what cannot load (the weights themselves are read by ``init_backbone``)."""
    if spec == "imagenet" and (width != 64 or stem_width != 64 or depth not in DEPTHS):
        raise UsageError(f"--backbone-weights imagenet needs a standard ResNet (--width 64), not width {width}")
    if spec not in ("imagenet", "none"):
        from pathlib import Path

        if not Path(spec).is_file():
            raise UsageError(f"--backbone-weights {spec}: no such file (a ResNet state dict, imagenet or none)")


def init_backbone(model: DeepLabV2Student, spec: str, cache_dir: str | None = None) -> str:
    """``spec``: a file, 'imagenet' or 'none'. Returns the line to tell the user."""
    if spec == "none":
        return "backbone from random init (--backbone-weights none)"
    if spec == "imagenet":
        path, source = imagenet_file(model.arch.depth, cache_dir), IMAGENET[model.arch.depth][0]
    else:
        path, source = spec, spec
    return load_backbone(model.backbone, state_dict_of(load_weights(path), path), source).summary()
