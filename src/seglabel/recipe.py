"""One annotate run from what a user gives (label set, model spec, protocol, options), checked and
built: the one path that ``seglabel annotate`` and ``seglabel.ray.Annotator`` both take.

``check`` validates everything that needs no model: the numbers and choices, the output folder,
the device, the label set, the model spec and the settings already in ``--out``. ``prepare``
then builds the model and checks the protocol against it. Both come before anything is written,
so a refused run leaves the disk as it was. ``dry_run`` is ``check`` plus the header of every
image still to label.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from .annotate import AnnotateConfig, plan
from .errors import UsageError
from .images import ImageError, ImageItem, read_size
from .labelset import LabelSet, load_labelset
from .loader import DECODE_CHOICES
from .models.base import Segmenter
from .models.registry import DEFAULT_MODEL, OWN_PROTOCOL_KINDS, load_segmenter, parse_spec
from .predict import Protocol, check_protocol, check_protocol_options, resolve_device
from .runs import check_owned, check_settings, model_identity
from .writers import check_output_folder

PROTOCOL_FIELDS = ("short_side", "max_long_side", "window", "window_stride")
PRECISIONS = ("fp32", "fp16", "bf16")


@dataclass
class Recipe:
    labels: str | Path | LabelSet
    config: AnnotateConfig
    model: str = DEFAULT_MODEL
    pretrained: str | None = "openai"
    model_config: str | None = None
    cache_dir: str | None = None
    device: str = "auto"
    method: str | None = None  # None: the tower's default (maskclip:NAME only)
    logit_scale: float | None = None
    key_smoothing: bool | None = None  # None: on for --method maskclip
    prompt_denoising: bool | None = None
    protocol_name: str = "default"  # or "paper": the method's own protocol ...
    explicit: frozenset[str] = frozenset()  # ... except these fields of config.protocol, given by the user
    model_options: dict[str, Any] = field(default_factory=dict)  # further options of the model's builder


@dataclass
class Prepared:
    labelset: LabelSet
    segmenter: Segmenter
    config: AnnotateConfig


@dataclass
class Checked:
    labelset: LabelSet
    device: torch.device


@dataclass
class DryRun:
    todo: list[ImageItem]
    done: list[ImageItem]
    problems: list[ImageError]  # images a run would report (header checks), besides the inputs' own
    kept: list[ImageItem] = field(default_factory=list)  # corrected by a person: a run keeps them


def check(recipe: Recipe) -> Checked:
    """Everything that can be refused without building the model (the flags first)."""
    config = recipe.config
    _check_options(recipe)
    check_output_folder(Path(config.out))
    check_owned(Path(config.out))  # files under our names that seglabel did not write: refused
    device = resolve_device(recipe.device)
    labelset = recipe.labels if isinstance(recipe.labels, LabelSet) else load_labelset(recipe.labels)
    kind, _ = parse_spec(recipe.model)
    if recipe.method is not None:
        if kind != "maskclip":
            raise UsageError(f"--method {recipe.method} applies to maskclip:NAME models")
        from .models.trainingfree import check_method

        check_method(recipe.method)
    known = {"labelset": labelset.fingerprint(), **model_identity(recipe.model, recipe.pretrained),
             "min_confidence": labelset.min_confidence if config.min_confidence is None else config.min_confidence}
    if recipe.protocol_name == "default" and kind not in OWN_PROTOCOL_KINDS:  # else known with the model
        known["protocol"] = dataclasses.asdict(config.protocol)
    check_settings(Path(config.out), known, per_image=False)  # the rest once the model is known
    return Checked(labelset, device)


def prepare(recipe: Recipe, checked: Checked | None = None) -> Prepared:
    """``check`` (unless done), then the model, then the protocol against the model; nothing is
    written yet."""
    checked = checked or check(recipe)
    labelset, device = checked.labelset, checked.device
    segmenter = load_segmenter(
        recipe.model, labelset, pretrained=recipe.pretrained, cache_dir=recipe.cache_dir, device=device,
        model_config=recipe.model_config, method=recipe.method or "auto", logit_scale=recipe.logit_scale,
        key_smoothing=recipe.key_smoothing, prompt_denoising=recipe.prompt_denoising, **recipe.model_options)
    config = recipe.config
    if "short_side" in recipe.explicit:  # --short-side 512 given is 512, not the model's own scale
        config = dataclasses.replace(config, own_protocol=False)
    if recipe.protocol_name == "paper":  # the method is known once the tower is
        config = dataclasses.replace(config, protocol=_paper_protocol(getattr(segmenter, "method", "maskclip"),
                                                                      config.protocol, recipe.explicit))
        check_protocol_options(config.protocol, config.max_pixels)
    check_protocol(config.protocol, segmenter)
    return Prepared(labelset, segmenter, config)


def dry_run(recipe: Recipe, items: Sequence[ImageItem], checked: Checked | None = None) -> DryRun:
    """What a run would do, after every check a run makes before loading the model, and the
    header of each image still to label (loads no model, writes nothing)."""
    checked = checked or check(recipe)
    planned = plan(items, recipe.config, checked.labelset)
    readable, problems = [], [ImageError(path, reason) for path, reason in planned.failures]
    for item in planned.todo:
        try:
            read_size(item.path, recipe.config.max_pixels)
            readable.append(item)
        except ImageError as e:
            problems.append(e)
    return DryRun(readable, planned.done, problems, planned.kept)


def _check_options(recipe: Recipe) -> None:
    config = recipe.config
    for flag, value, least in (("--batch-size", config.batch_size, 1), ("--max-pixels", config.max_pixels, 1),
                               ("--workers", 0 if config.workers is None else config.workers, 0)):
        if value < least:
            raise UsageError(f"{flag} {value}: must be at least {least}")
    if recipe.logit_scale is not None and not (math.isfinite(recipe.logit_scale) and recipe.logit_scale > 0):
        raise UsageError(f"--logit-scale {recipe.logit_scale}: must be a finite number above 0")
    if config.min_confidence is not None and not (math.isfinite(config.min_confidence)
                                                  and 0 <= config.min_confidence <= 1):
        raise UsageError(f"--min-confidence {config.min_confidence}: must be a number from 0 to 1")
    if config.precision not in PRECISIONS:
        raise UsageError(f"--precision {config.precision}: choose {_one_of(PRECISIONS)}")
    if config.decode not in DECODE_CHOICES:
        raise UsageError(f"--decode {config.decode}: choose {_one_of(DECODE_CHOICES)}")
    if recipe.protocol_name not in ("default", "paper"):
        raise UsageError(f"--protocol {recipe.protocol_name}: choose default or paper")
    check_protocol_options(config.protocol, config.max_pixels)


def _one_of(choices: Sequence[str]) -> str:
    return ", ".join(choices[:-1]) + " or " + choices[-1]


def _paper_protocol(method: str, given: Protocol, explicit: frozenset[str]) -> Protocol:
    """``--protocol paper``: the method's own short side, window and stride (models/trainingfree.py);
    the fields given explicitly win (a window given without a stride: half the given window)."""
    from .models.trainingfree import paper_protocol

    fields = {f: getattr(given, f) for f in PROTOCOL_FIELDS if f in explicit}
    if "window" in fields and "window_stride" not in fields:
        fields["window_stride"] = given.window_stride
    return dataclasses.replace(given, **{**paper_protocol(method), **fields})
