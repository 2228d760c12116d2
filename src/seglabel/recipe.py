"""One annotate run from what a user gives (label set, model spec, protocol, options), checked and
built: the one path that ``seglabel annotate`` and ``seglabel.ray.Annotator`` both take.

``check`` validates everything that needs no model: the numbers and choices, the output folder,
the device, the label set, the model spec and the settings already in ``--out``. ``prepare``
then builds the model and checks the protocol against it. Both come before anything is written,
so a refused run leaves the disk as it was. ``dry_run`` is ``check`` plus the header of every
image still to label. ``from_record`` is the recipe of a finished run, read back from its run.json
(distill rebuilds its teacher with it).
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from .annotate import AnnotateConfig, plan
from .errors import UsageError
from .images import ImageError, ImageItem, read_size
from .labelset import LabelSet, load_labelset, parse_labelset
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


# -- a recipe read back from a run record -----------------------------------------------------------
# What ``describe()`` of each maskclip method records (settings.method), beyond "method" and "tower"
_RECORDED_METHOD_OPTIONS = {"key_smoothing", "prompt_denoising", "logit_scale", "proxy", "proxy_weights",
                            "regions", "regions_weights", "vote"}
_FILE_KINDS = ("lseg", "student")  # kinds whose spec names the weights file


def from_record(record: dict[str, Any], source: str, device: str = "auto", cache_dir: str | None = None,
                overrides: dict[str, str | None] | None = None) -> Recipe:
    """The recipe that made the run recorded in ``record`` (its run.json, read from ``source``):
    the model, its weights and model config, every method option and the protocol, each as annotate
    recorded it, so that ``prepare`` builds the same model (a caller compares ``settings_of`` of the
    result with the record's settings). What cannot be rebuilt is refused in one line, before any
    model is loaded. Files are found where the run read them (relative paths from its ``cwd``), or
    where ``overrides`` (pretrained, model_config, proxy_weights, regions) say they are now."""
    given = {k: v for k, v in (overrides or {}).items() if v}
    settings = record.get("settings") if isinstance(record.get("settings"), dict) else {}
    spec = record.get("model")
    if not isinstance(spec, str) or ":" not in spec:
        raise UsageError(f"{source}: records no model spec (KIND:NAME) to rebuild")
    kind, what = parse_spec(spec)
    argv = [a for a in record.get("argv") or [] if isinstance(a, str)]
    cwd = record.get("cwd") if isinstance(record.get("cwd"), str) else None
    weights = record.get("weights") if isinstance(record.get("weights"), dict) else {}
    if kind in _FILE_KINDS:
        path = _recorded_file(what, cwd)
        if not os.path.isfile(path):
            raise UsageError(f"{source}: its model {spec} is not at {path} any more; pass --teacher {kind}:FILE")
        spec, pretrained = f"{kind}:{path}", None
    else:
        pretrained = given.get("pretrained") or weights.get("pretrained") or "openai"
        if not given.get("pretrained") and (os.path.isfile(_recorded_file(pretrained, cwd)) or _looks_like_file(pretrained)):
            pretrained = _recorded_file(pretrained, cwd)  # a file, not an open_clip tag
            if not os.path.isfile(pretrained):
                raise UsageError(f"{source}: its weights file {pretrained} is not there any more; pass --pretrained FILE")
    model_config = given.get("model_config") or weights.get("model_config") or argv_value(argv, "--model-config")
    if model_config and not given.get("model_config"):
        model_config = _recorded_file(model_config, cwd)
        if not os.path.isfile(model_config):
            raise UsageError(f"{source}: its model config {model_config} is not there any more; pass --model-config FILE")
    method = settings.get("method") if isinstance(settings.get("method"), dict) else {}
    options: dict[str, Any] = {}
    recipe = Recipe(labels=_recorded_labelset(record, source), config=_recorded_config(record, settings, source),
                    model=spec, pretrained=pretrained, model_config=model_config, cache_dir=cache_dir, device=device,
                    protocol_name="default", explicit=frozenset(PROTOCOL_FIELDS), model_options=options)
    if kind != "maskclip":
        return recipe  # everything else of LSeg and students comes from their file
    unknown = sorted(set(method) - _RECORDED_METHOD_OPTIONS - {"method", "tower"})
    if unknown:
        raise UsageError(f"{source}: records method options this seglabel cannot rebuild ({', '.join(unknown)})")
    if method.get("vote", True) is not True:
        raise UsageError(f"{source}: its corrclip teacher ran without the region vote, which annotate has no flag "
                         f"for; label with annotate --method corrclip, or pass --teacher none")
    recipe.method = method.get("method")
    recipe.logit_scale = method.get("logit_scale")
    recipe.key_smoothing, recipe.prompt_denoising = method.get("key_smoothing"), method.get("prompt_denoising")
    if method.get("proxy"):
        options["proxy"] = method["proxy"]
    if method.get("proxy_weights"):
        options["proxy_weights"] = _recorded_weights(method["proxy_weights"], "--proxy-weights",
                                                     given.get("proxy_weights") or argv_value(argv, "--proxy-weights"),
                                                     cwd, source)
    if method.get("regions"):
        options["regions"] = method["regions"]
        if method.get("regions_weights"):  # sam:FILE, sam2:FILE: the kind is recorded, the file by identity
            flag = given.get("regions") or argv_value(argv, "--regions") or ""
            region_kind, _, file = flag.partition(":")
            if region_kind != method["regions"]:
                file = ""
            found = _recorded_weights(method["regions_weights"], "--regions", file, cwd, source,
                                      given.get("regions") is not None)
            options["regions"] = f"{method['regions']}:{found}"
    return recipe


def _recorded_labelset(record: dict[str, Any], source: str) -> LabelSet:
    if not isinstance(record.get("labelset"), dict):
        raise UsageError(f"{source}: records no label set")
    return parse_labelset(record["labelset"], source=f"{source}:labelset")


def _recorded_config(record: dict[str, Any], settings: dict[str, Any], source: str) -> AnnotateConfig:
    protocol = settings.get("protocol") if isinstance(settings.get("protocol"), dict) else {}
    known = {f.name for f in dataclasses.fields(Protocol)}
    unknown = sorted(set(protocol) - known)
    if unknown:
        raise UsageError(f"{source}: records protocol fields this seglabel cannot rebuild ({', '.join(unknown)})")
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in protocol.items()}
    try:
        config = AnnotateConfig(out=Path(source).parent, protocol=Protocol(**fields),
                                min_confidence=settings.get("min_confidence"))
        check_protocol_options(config.protocol)
    except (TypeError, ValueError) as e:
        raise UsageError(f"{source}: its protocol cannot be rebuilt ({e})") from None
    return config


def _recorded_weights(identity: Any, flag: str, path: str | None, cwd: str | None, source: str,
                      given: bool = False) -> str:
    """The file a run read for ``flag``, checked against the identity it recorded ([name, size])."""
    from .models.weights import file_identity

    if not path:
        raise UsageError(f"{source}: records the file of {flag} only as {identity}; pass {flag} FILE")
    found = path if given else _recorded_file(path, cwd)
    if not os.path.isfile(found):
        raise UsageError(f"{source}: its {flag} file {found} is not there any more; pass {flag} with the file")
    if json_plain(file_identity(found)) != json_plain(identity):
        raise UsageError(f"{source}: {found} is not the {flag} file the run read (it recorded {identity}); "
                         f"pass {flag} with that file")
    return found


def json_plain(value: Any) -> Any:
    return [json_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def _looks_like_file(value: str) -> bool:
    return os.sep in value or value.endswith((".safetensors", ".bin", ".pt", ".pth", ".ckpt"))


def _recorded_file(path: str, cwd: str | None) -> str:
    """A path as the run gave it, from the folder it ran in."""
    return path if os.path.isabs(path) or not cwd else os.path.join(cwd, path)


def argv_value(argv: Sequence[str], flag: str) -> str | None:
    """The value a recorded command line gave ``flag`` (``--flag VALUE`` or ``--flag=VALUE``)."""
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None
