"""Model specs -> segmenters. A spec is ``KIND:WHAT``, e.g. ``maskclip:ViT-B-16``.

Each kind has one ``build_*`` function in ``SEGMENTERS``; ``load_segmenter`` parses the spec,
builds the model and encodes the label set.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from ..labelset import LabelSet
from .base import Segmenter

DEFAULT_MODEL = "maskclip:ViT-B-16"


def build_maskclip(name: str, pretrained: str | None = "openai", cache_dir: str | None = None,
                   device: str | torch.device = "cpu", model_config: str | None = None,
                   method: str = "auto", logit_scale: float | None = None,
                   key_smoothing: bool | None = False, prompt_denoising: bool | None = False,
                   **_: Any) -> Segmenter:
    """``method``: maskclip, clearclip, sclip, naclip or scclip (see models/trainingfree.py), or
    auto (the default, as in the CLI: ``DEFAULT_METHOD`` on ViT towers, maskclip on ResNet towers);
    ``logit_scale``: None for the method's own. MaskCLIP's refinements given as None: on for
    maskclip, off for the others."""
    from .clip import create_clip, register_model_config
    from .maskclip import MaskCLIP
    from .trainingfree import check_method, default_method

    if method != "auto":
        check_method(method)  # before minutes of weight loading
    if model_config:
        register_model_config(model_config)
    clip_model, tokenizer, info = create_clip(name, pretrained, cache_dir=cache_dir, device=device)
    if method == "auto":
        method = default_method("resnet" if hasattr(clip_model.visual, "attnpool") else "vit")
    refine = method == "maskclip"
    model = MaskCLIP(clip_model, tokenizer=tokenizer, method=method, logit_scale=logit_scale,
                     key_smoothing=refine if key_smoothing is None else key_smoothing,
                     prompt_denoising=refine if prompt_denoising is None else prompt_denoising)
    model.weights_info = info
    return model


def build_student(path: str, **options: Any) -> Segmenter:
    from .deeplab import build_student as build

    return build(path, **options)


def build_lseg(path: str, **options: Any) -> Segmenter:
    from .lseg import build_lseg as build

    return build(path, **options)


SEGMENTERS: dict[str, Callable[..., Segmenter]] = {
    "maskclip": build_maskclip,
    "lseg": build_lseg,
    "student": build_student,
}


def parse_spec(spec: str) -> tuple[str, str]:
    kind, sep, what = spec.partition(":")
    if not sep or not what:
        raise ValueError(f"model spec '{spec}' must look like KIND:NAME (e.g. {DEFAULT_MODEL})")
    if kind not in SEGMENTERS:
        raise ValueError(f"unknown model kind '{kind}' in '{spec}' (known: {', '.join(SEGMENTERS)})")
    return kind, what


def load_segmenter(spec: str = DEFAULT_MODEL, labelset: LabelSet | None = None, **options: Any) -> Segmenter:
    """Build the segmenter named by ``spec`` and, given a label set, encode its classes."""
    kind, what = parse_spec(spec)
    model = SEGMENTERS[kind](what, **options)
    model.spec = spec
    if labelset is not None:
        model.set_labels(labelset)
    return model


def list_models() -> list[str]:
    """Every spec ``maskclip:`` accepts (open_clip architectures with a ViT or ResNet tower)."""
    import open_clip

    names = []
    for name in open_clip.list_models():
        vision = (open_clip.get_model_config(name) or {}).get("vision_cfg", {})
        if "timm_model_name" not in vision and not vision.get("attentional_pool"):
            names.append(f"maskclip:{name}")
    return names
