"""One annotate run from what a user gives (label set, model spec, protocol, options), checked and
built: the one path that ``seglabel annotate``, ``seglabel.label_folders``, ``seglabel.ray`` and
``seglabel serve`` take.

A ``Recipe`` holds every option of a run as given (None: not given). ``check`` validates what
needs no model: the numbers and choices, the output folder, the device, the label set, the model
spec and its options, and the settings already in ``out``. ``prepare`` then builds the model and
decides the protocol once (``predict.resolve_protocol``: given > ``--protocol paper`` or the
model's own > defaults), checked against the model; the ``AnnotateConfig`` it returns holds that
concrete protocol. Both come before anything is written, so a refused run leaves the disk as it
was. ``dry_run`` is ``check`` plus the header of every image still to label. ``from_record`` is the
recipe of a finished run, read back from its run.json (distill rebuilds its teacher with it).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from .annotate import AnnotateConfig, plan
from .errors import UsageError
from .images import DEFAULT_MAX_PIXELS, ImageError, ImageItem, read_photo, read_size
from .labelset import LabelSet, load_labelset, parse_labelset
from .loader import DECODE_CHOICES, decode_device
from .models.base import Segmenter
from .models.registry import DEFAULT_MODEL, OWN_PROTOCOL_KINDS, check_options, load_segmenter, parse_spec
from .predict import (Protocol, ProtocolOptions, check_protocol, check_protocol_options, resolve_device,
                      resolve_protocol)
from .outputs import FolderOut, open_out
from .runs import check_owned, check_settings, run_settings
from .writers import check_output_folder

PRECISIONS = ("fp32", "fp16", "bf16")
PROTOCOL_NAMES = ("default", "paper")

log = logging.getLogger("seglabel")


@dataclass
class Recipe:
    """Every option of an annotate run, as given (None: not given, decided by ``prepare``)."""

    labels: str | Path | LabelSet
    out: str | Path = "labels"
    # -- the model
    model: str = DEFAULT_MODEL
    pretrained: str | None = "openai"
    model_config: str | None = None
    cache_dir: str | None = None
    device: str = "auto"
    method: str | None = None  # None: the tower's default (maskclip:NAME only)
    logit_scale: float | None = None
    key_smoothing: bool | None = None  # None: on for --method maskclip
    prompt_denoising: bool | None = None
    model_options: dict[str, Any] = field(default_factory=dict)  # the builder's others: proxy, proxy_weights, regions
    # -- what else decides the labels
    protocol: ProtocolOptions = field(default_factory=ProtocolOptions)
    min_confidence: float | None = None  # None: the label set's ignore.min_confidence
    # -- how the run goes (AnnotateConfig's fields)
    overwrite: bool = False
    overlay: bool = False
    save_scores: bool = False
    batch_size: int = 1
    max_pixels: int = DEFAULT_MAX_PIXELS
    workers: int | None = None
    precision: str = "fp32"
    compile: bool = False
    decode: str = "auto"
    part: str | None = None

    def config(self, protocol: Protocol) -> AnnotateConfig:
        """The ``AnnotateConfig`` of this run under ``protocol`` (the resolved one)."""
        return AnnotateConfig(out=self.out, overwrite=self.overwrite, overlay=self.overlay,
                              save_scores=self.save_scores, min_confidence=self.min_confidence,
                              batch_size=self.batch_size, max_pixels=self.max_pixels, protocol=protocol,
                              workers=self.workers, precision=self.precision, compile=self.compile,
                              decode=self.decode, part=self.part)


_RECIPE_FIELDS = frozenset(f.name for f in dataclasses.fields(Recipe)) - {"labels", "out", "protocol", "model_options"}
_PROTOCOL_FIELDS = frozenset(f.name for f in dataclasses.fields(ProtocolOptions)) - {"paper"}


def make_recipe(labels: str | Path | LabelSet, out: str | Path = "labels", *, model: str = DEFAULT_MODEL,
                protocol: str | ProtocolOptions | Protocol = "default", **options: Any) -> Recipe:
    """A ``Recipe`` from flat keyword options, as ``label_folders`` and ``seglabel.ray`` take them:
    the fields of ``Recipe``, the protocol's (``short_side``, ``max_long_side``, ``window``,
    ``window_stride``, ``tta``, ``pamr``; ``protocol``: ``"default"``, ``"paper"``, a
    ``ProtocolOptions``, or a ``Protocol`` used exactly), and any other option of the model's
    builder (``proxy``, ``proxy_weights``, ``regions``); ``check`` refuses what the model kind
    does not take. An option given as None is not given."""
    asked = {k: options.pop(k) for k in list(options) if k in _PROTOCOL_FIELDS}
    if isinstance(protocol, Protocol):
        protocol = ProtocolOptions(**dataclasses.asdict(protocol))
    elif isinstance(protocol, str):
        if protocol not in PROTOCOL_NAMES:
            raise UsageError(f"--protocol {protocol}: choose {_one_of(PROTOCOL_NAMES)}")
        protocol = ProtocolOptions(paper=protocol == "paper")
    elif not isinstance(protocol, ProtocolOptions):
        raise UsageError(f"protocol={protocol!r}: give 'default', 'paper', a ProtocolOptions or a Protocol")
    protocol = dataclasses.replace(protocol, **{k: v for k, v in asked.items() if v is not None})
    own = {k: v for k in list(options) if k in _RECIPE_FIELDS and (v := options.pop(k)) is not None}
    builder = {k: v for k, v in options.items() if v is not None}
    return Recipe(labels=labels, out=out, model=model, protocol=protocol, model_options=builder, **own)


@dataclass
class Prepared:
    labelset: LabelSet
    segmenter: Segmenter
    config: AnnotateConfig  # with the protocol this run uses


@dataclass
class Checked:
    labelset: LabelSet
    device: torch.device


@dataclass
class DryRun:
    todo: list[ImageItem]
    done: list[ImageItem]
    problems: list[ImageError]  # what a run would report: the inputs' own problems, then image headers
    kept: list[ImageItem] = field(default_factory=list)  # corrected by a person: a run keeps them


def check(recipe: Recipe) -> Checked:
    """Everything that can be refused without building the model (the flags first). The label
    set's warnings are logged here."""
    _check_options(recipe)
    out = open_out(recipe.out)
    if isinstance(out, FolderOut):
        check_output_folder(out.folder)
    else:  # the bucket, the credentials, the right to write and conditional writes: one request each
        out.check_store()
    check_owned(out)  # files under our names that seglabel did not write: refused
    device = resolve_device(recipe.device)
    decode_device(recipe.decode, device)  # --decode device where it cannot be done: refused now
    labelset = recipe.labels if isinstance(recipe.labels, LabelSet) else load_labelset(recipe.labels)
    for warning in labelset.warnings:
        log.warning(warning)
    kind, _ = parse_spec(recipe.model)
    check_options(kind, _model_kwargs(recipe, device))
    if recipe.method is not None:
        if kind != "maskclip":
            raise UsageError(f"--method {recipe.method} applies to maskclip:NAME models")
        from .models.trainingfree import check_method

        check_method(recipe.method)
    # The protocol is known now unless the model brings its own or the method's paper decides it
    protocol = None if recipe.protocol.paper or kind in OWN_PROTOCOL_KINDS else resolve_protocol(None, recipe.protocol)
    known = run_settings(labelset, recipe.model, recipe.pretrained, protocol, recipe.min_confidence)
    check_settings(out, known, per_image=False)  # the rest once the model is known
    return Checked(labelset, device)


def prepare(recipe: Recipe, checked: Checked | None = None) -> Prepared:
    """``check`` (unless done), then the model, then the protocol, decided once and checked
    against the model; nothing is written yet."""
    checked = checked or check(recipe)
    segmenter = load_segmenter(recipe.model, checked.labelset, **_model_kwargs(recipe, checked.device))
    protocol = resolve_protocol(segmenter, recipe.protocol)
    check_protocol_options(protocol, recipe.max_pixels)
    check_protocol(protocol, segmenter)
    return Prepared(checked.labelset, segmenter, recipe.config(protocol))


def dry_run(recipe: Recipe, items: Sequence[ImageItem], checked: Checked | None = None) -> DryRun:
    """What a run would do, after every check a run makes before loading the model, and the
    header of each image still to label (loads no model, writes nothing)."""
    checked = checked or check(recipe)
    planned = plan(items, recipe.config(Protocol()), checked.labelset)  # the plan does not depend on the protocol
    readable, problems = [], [ImageError(path, reason) for path, reason in planned.failures]
    for item in planned.todo:
        try:
            read_size(item.path, recipe.max_pixels, read_photo(item) if item.remote else None)
            readable.append(item)
        except ImageError as e:
            problems.append(e)
    return DryRun(readable, planned.done, problems, planned.kept)


def _model_kwargs(recipe: Recipe, device: torch.device) -> dict[str, Any]:
    """``load_segmenter``'s options of this recipe (values that mean "not given" are dropped there)."""
    return dict(pretrained=recipe.pretrained, cache_dir=recipe.cache_dir, device=device,
                model_config=recipe.model_config, method=recipe.method or "auto", logit_scale=recipe.logit_scale,
                key_smoothing=recipe.key_smoothing, prompt_denoising=recipe.prompt_denoising, **recipe.model_options)


def _check_options(recipe: Recipe) -> None:
    for flag, value, least in (("--batch-size", recipe.batch_size, 1), ("--max-pixels", recipe.max_pixels, 1),
                               ("--workers", 0 if recipe.workers is None else recipe.workers, 0)):
        if value < least:
            raise UsageError(f"{flag} {value}: must be at least {least}")
    if recipe.logit_scale is not None and not (math.isfinite(recipe.logit_scale) and recipe.logit_scale > 0):
        raise UsageError(f"--logit-scale {recipe.logit_scale}: must be a finite number above 0")
    if recipe.min_confidence is not None and not (math.isfinite(recipe.min_confidence)
                                                  and 0 <= recipe.min_confidence <= 1):
        raise UsageError(f"--min-confidence {recipe.min_confidence}: must be a number from 0 to 1")
    if recipe.precision not in PRECISIONS:
        raise UsageError(f"--precision {recipe.precision}: choose {_one_of(PRECISIONS)}")
    if recipe.decode not in DECODE_CHOICES:
        raise UsageError(f"--decode {recipe.decode}: choose {_one_of(DECODE_CHOICES)}")
    # What was given, over seglabel's defaults: the model may change the rest, not these values
    check_protocol_options(Protocol(**recipe.protocol.given()), recipe.max_pixels)


def _one_of(choices: Sequence[str]) -> str:
    return ", ".join(choices[:-1]) + " or " + choices[-1]


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
    # every field of the recorded protocol is given, so it is used exactly, whatever the model's own
    recipe = Recipe(labels=_recorded_labelset(record, source), out=Path(source).parent, model=spec,
                    pretrained=pretrained, model_config=model_config, cache_dir=cache_dir, device=device,
                    protocol=_recorded_protocol(settings, source), min_confidence=settings.get("min_confidence"),
                    model_options=options)
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


def _recorded_protocol(settings: dict[str, Any], source: str) -> ProtocolOptions:
    protocol = settings.get("protocol") if isinstance(settings.get("protocol"), dict) else {}
    known = {f.name for f in dataclasses.fields(Protocol)}
    unknown = sorted(set(protocol) - known)
    if unknown:
        raise UsageError(f"{source}: records protocol fields this seglabel cannot rebuild ({', '.join(unknown)})")
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in protocol.items()}
    try:
        protocol = Protocol(**fields)
        check_protocol_options(protocol)
    except (TypeError, ValueError) as e:
        raise UsageError(f"{source}: its protocol cannot be rebuilt ({e})") from None
    return ProtocolOptions(**dataclasses.asdict(protocol))


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
