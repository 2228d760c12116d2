"""Model specs -> segmenters. A spec is ``KIND:WHAT``, e.g. ``maskclip:ViT-B-16``.

Each kind has one ``build_*`` function in ``SEGMENTERS``; ``load_segmenter`` parses the spec,
checks the options, builds the model and encodes the label set. A builder's keyword parameters
are the options its kind takes: any other option given a value is refused (one line naming the
option and the kind) before anything is loaded, instead of being silently ignored.
"""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import UsageError
from ..labelset import LabelSet
from .base import Segmenter

DEFAULT_MODEL = "maskclip:ViT-B-16"


def build_maskclip(name: str, pretrained: str | None = "openai", cache_dir: str | None = None,
                   device: str | torch.device = "cpu", model_config: str | None = None,
                   method: str = "auto", logit_scale: float | None = None,
                   key_smoothing: bool | None = False, prompt_denoising: bool | None = False,
                   proxy: str | None = None, proxy_weights: str | None = None, regions: str | None = None) -> Segmenter:
    """``method``: maskclip, clearclip, sclip, naclip or scclip (see models/trainingfree.py),
    proxyclip or corrclip (with a second vision model), or auto (the default, as in the CLI:
    ``DEFAULT_METHOD`` on ViT towers, maskclip on ResNet towers); ``logit_scale``: None for the
    method's own. MaskCLIP's refinements given as None: on for maskclip, off for the others.
    ProxyCLIP / CorrCLIP: ``proxy`` the second model (models/vfm.py; default dino:vitb8),
    ``proxy_weights`` a local file of its weights, ``regions`` CorrCLIP's region source
    (models/regions.py: sam2:FILE, sam:FILE or slic)."""
    from .clip import create_clip, register_model_config
    from .maskclip import MaskCLIP
    from .trainingfree import VFM_METHODS, check_method, default_method

    if method != "auto":
        check_method(method)  # before minutes of weight loading
    if method not in VFM_METHODS and (proxy or proxy_weights or regions):
        given = "--proxy" if proxy else "--proxy-weights" if proxy_weights else "--regions"
        raise UsageError(f"{given} applies to --method proxyclip or corrclip")
    if method == "proxyclip" and regions:
        raise UsageError("--regions applies to --method corrclip")
    if method in VFM_METHODS and (key_smoothing or prompt_denoising):
        raise UsageError(f"--{'key-smoothing' if key_smoothing else 'prompt-denoising'} applies to the CLIP-only "
                         f"methods, not {method}")
    if method == "corrclip" and not regions:
        raise UsageError("--method corrclip needs --regions (sam2:FILE, sam:FILE or slic)")
    if method in VFM_METHODS:
        from .vfm import check_proxy

        if check_proxy(proxy or "dino:vitb8").startswith("sam:") and method == "corrclip":
            raise UsageError("--method corrclip reads q + k of a plain ViT: use --proxy dino:..., dinov2:..., "
                             "mae:vitb or clip")
    if model_config:
        register_model_config(model_config)
    clip_model, tokenizer, info = create_clip(name, pretrained, cache_dir=cache_dir, device=device)
    if model_config:  # recorded in run.json: distill rebuilds the same model from it
        info["model_config"] = str(Path(model_config).resolve())
    if method == "auto":
        method = default_method("resnet" if hasattr(clip_model.visual, "attnpool") else "vit")
    if method in VFM_METHODS:
        model = _build_with_vfm(method, clip_model, tokenizer, logit_scale, proxy or "dino:vitb8", proxy_weights,
                                regions, cache_dir, device)
        model.weights_info = info
        return model
    refine = method == "maskclip"
    model = MaskCLIP(clip_model, tokenizer=tokenizer, method=method, logit_scale=logit_scale,
                     key_smoothing=refine if key_smoothing is None else key_smoothing,
                     prompt_denoising=refine if prompt_denoising is None else prompt_denoising)
    model.weights_info = info
    return model


def _build_with_vfm(method: str, clip_model, tokenizer, logit_scale: float | None, proxy: str,
                    proxy_weights: str | None, regions: str | None, cache_dir: str | None, device) -> Segmenter:
    from .vfm import build_vfm

    if hasattr(clip_model.visual, "attnpool"):
        raise UsageError(f"method {method} needs a ViT image tower; ResNet towers support maskclip only")
    region_source = None
    if regions:  # checked before the second model's weights are read
        from .regions import build_regions

        region_source = build_regions(regions, device=device, cache_dir=cache_dir)
    vfm = build_vfm(proxy, proxy_weights, clip_visual=clip_model.visual, cache_dir=cache_dir, device=device)
    if method == "corrclip":
        from .corrclip import CorrCLIP

        return CorrCLIP(clip_model, vfm, region_source, tokenizer=tokenizer, logit_scale=logit_scale)
    from .proxyclip import ProxyCLIP

    return ProxyCLIP(clip_model, vfm, tokenizer=tokenizer, logit_scale=logit_scale)


def build_student(path: str, device: str | torch.device = "cpu", cache_dir: str | None = None,
                  pretrained: str | None = None) -> Segmenter:
    """``cache_dir`` and ``pretrained``: where the student's CLIP text encoder is found when a label
    set other than the trained one is encoded (see models/deeplab.py)."""
    from .deeplab import build_student as build

    return build(path, device=device, cache_dir=cache_dir, pretrained=pretrained)


def build_lseg(path: str, device: str | torch.device = "cpu") -> Segmenter:
    """Everything else is in the checkpoint; the precision is the caller's (autocast around it)."""
    from .lseg import build_lseg as build

    return build(path, device=device)


# Kinds whose models bring a protocol of their own (``Segmenter.default_protocol``), known only once
# the model is loaded: LSeg's evaluation, a student's training scale.
OWN_PROTOCOL_KINDS = frozenset({"lseg", "student"})

SEGMENTERS: dict[str, Callable[..., Segmenter]] = {
    "maskclip": build_maskclip,
    "lseg": build_lseg,
    "student": build_student,
}


def parse_spec(spec: str) -> tuple[str, str]:
    kind, sep, what = spec.partition(":")
    if not sep or not what:
        raise UsageError(f"model spec '{spec}' must look like KIND:NAME (e.g. {DEFAULT_MODEL})")
    if kind not in SEGMENTERS:
        raise UsageError(f"unknown model kind '{kind}' in '{spec}' (known: {', '.join(SEGMENTERS)})")
    return kind, what


# Values that mean "not given": what the CLI and seglabel.ray pass for an option the user left
# alone. Such an option is dropped for a kind that does not take it; any other value is refused.
NOT_GIVEN: dict[str, tuple[Any, ...]] = {"method": (None, "auto"), "pretrained": (None, "openai")}


def model_options(kind: str) -> list[str]:
    """The options ``kind`` takes: its builder's keyword parameters."""
    params = list(inspect.signature(SEGMENTERS[kind]).parameters.values())[1:]  # the first is WHAT
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def check_options(kind: str, options: dict[str, Any]) -> dict[str, Any]:
    """The options ``kind`` takes; a value given for any other option is a ``UsageError`` (one line)."""
    taken = model_options(kind)
    out = {}
    for name, value in options.items():
        if name in taken:
            out[name] = value
        elif not any(value is v or (isinstance(value, str) and value == v) for v in NOT_GIVEN.get(name, (None,))):
            flag = "--" + name.replace("_", "-")
            others = [k for k in SEGMENTERS if name in model_options(k)]
            if not others:
                raise UsageError(f"unknown model option '{name}' ({kind} models take: {', '.join(taken)})")
            raise UsageError(f"{flag} is not an option of {kind} models (it applies to "
                             f"{' and '.join(others)} models); leave it out")
    return out


def load_segmenter(spec: str = DEFAULT_MODEL, labelset: LabelSet | None = None, **options: Any) -> Segmenter:
    """Build the segmenter named by ``spec`` and, given a label set, encode its classes (classes
    its tokenizer cannot tell apart are logged as warnings).

    ``options`` are the keyword parameters of the kind's builder (``SEGMENTERS``, ``model_options``):

    - ``maskclip:NAME`` (``build_maskclip``): ``pretrained`` (an open_clip tag, default
      ``"openai"``, or a weights file), ``cache_dir``, ``device``, ``model_config`` (an open_clip
      config JSON to register), ``method`` (``"auto"``, maskclip, clearclip, sclip, naclip,
      scclip, proxyclip, corrclip), ``logit_scale``, ``key_smoothing``, ``prompt_denoising``,
      ``proxy``, ``proxy_weights``, ``regions``;
    - ``lseg:FILE`` (``build_lseg``): ``device``;
    - ``student:FILE`` (``build_student``): ``device``, ``cache_dir``, ``pretrained`` (where its
      CLIP text encoder is found for a label set other than the trained one).

    An option the kind does not take is refused (``UsageError``, one line) before anything is
    loaded, unless its value means "not given" (``NOT_GIVEN``, see ``check_options``)."""
    kind, what = parse_spec(spec)
    options = check_options(kind, options)
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


# What each kind labels with, and a spec to start from (``seglabel models``).
KINDS: dict[str, tuple[str, str]] = {
    "maskclip": ("an open_clip CLIP run by a training-free method (--method: sclip by default on ViTs, "
                 "maskclip on ResNets; proxyclip and corrclip add a second vision model)",
                 f"{DEFAULT_MODEL} --pretrained openai"),
    "lseg": ("an official LSeg checkpoint (ViT-L/16 or ResNet-101), read from the file; nothing is downloaded",
             "lseg:demo_e200.ckpt"),
    "student": ("a DeepLabv2 student trained by `seglabel distill` (open-vocabulary: any label set)",
                "student:runs/street/student.pt"),
}
RECOMMENDED_TAG = "openai"  # what every training-free method was published with


def model_catalog() -> list[dict[str, Any]]:
    """Every kind, and for ``maskclip:`` every architecture with its pretrained tags and the one to
    use. A tag builds the activation its weights were trained with (QuickGELU for OpenAI's), so
    the plain name is right with a tag; a weights FILE of such weights needs the -quickgelu name."""
    import open_clip

    catalog = []
    for kind, (about, example) in KINDS.items():
        entry: dict[str, Any] = {"kind": kind, "spec": f"{kind}:{'NAME' if kind == 'maskclip' else 'FILE'}",
                                 "about": about, "example": example}
        if kind == "maskclip":
            entry["models"] = []
            for spec in list_models():
                name = spec.partition(":")[2]
                tags = open_clip.list_pretrained_tags_by_model(name)
                recommended = RECOMMENDED_TAG if RECOMMENDED_TAG in tags else (tags[0] if tags else None)
                entry["models"].append({"spec": spec, "pretrained": tags, "recommended": recommended})
        catalog.append(entry)
    return catalog
