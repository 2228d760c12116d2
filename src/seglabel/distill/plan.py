"""``plan(cfg)``: every setting of a distill run resolved once, everything refusable refused, before
any model is built or any file written (``seglabel distill --dry-run`` prints it).

What it settles: the processes (torchrun), the device and its defaults, --pseudo's run record,
the label set and CLIP text encoder, the teacher (its recipe, rebuilt from the record, and
whether it labels online or into a cache), the student's architecture and losses, the training
scale, the images (the masks skipped and why; those a person corrected, trained on as written),
the number of iterations and, with a last.pt in --out, whether and how the run resumes.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..errors import UsageError
from ..labelset import LabelSet, load_labelset, parse_labelset
from ..layout import RUN_FILE, SCORES
from ..models.deeplab import StudentArch
from ..recipe import Recipe, argv_value
from .backbone import IMAGENET, check_backbone
from .cache import FOLDER as CACHE_FOLDER, scale_levels
from .config import (AFFINITY_WEIGHT, IGNORE_UNSURE, TEACHER_LABELS, UPSAMPLE, DeviceDefaults, DistillConfig,
                     default_iters, device_defaults)
from .data import DataError, PairScan, find_corrections, scan_pairs
from .state import LAST, check_resumable, read_last, saved_schedule
from .teacher import known_protocol, labels_mode, resolve_teacher, teacher_recipe


@dataclass
class Plan:
    cfg: DistillConfig  # every automatic setting made concrete (config.json, last.pt)
    device: torch.device
    rank: int
    world: int
    labelset: LabelSet
    clip_spec: dict[str, Any]
    defaults: DeviceDefaults
    scan: PairScan
    schedule: list[list[int]]
    run: dict[str, Any] = field(default_factory=dict)  # --pseudo's run record
    teacher: Recipe | None = None
    teacher_labels: str | None = None  # online | cached
    levels: list[float] = field(default_factory=list)  # cached: the scale levels
    last: dict[str, Any] | None = None  # last.pt, when the run resumes

    @property
    def out(self) -> Path:
        return Path(self.cfg.out)

    @property
    def run_source(self) -> str:
        return str(Path(self.cfg.pseudo or ".") / RUN_FILE)

    def lines(self) -> list[str]:
        """What the run would do, for ``--dry-run``."""
        c, arch = self.cfg, StudentArch.from_dict(self.cfg.student or {})
        init = {"none": "from random init", "imagenet": f"from ImageNet weights ({IMAGENET.get(arch.depth, ('?',))[0]})"}
        own = (c.depth, c.width, c.backbone_weights, c.upsample) == (
            self.defaults.depth, self.defaults.width, self.defaults.backbone_weights, self.defaults.upsample)
        lines = [f"student: DeepLabv2, ResNet-{arch.depth} width {arch.width}, "
                 f"{init.get(c.backbone_weights or 'none', f'from {c.backbone_weights}')}, labels with "
                 f"{arch.upsample} upsampling"
                 + (f" (the {self.device.type} default, measured on {self.defaults.measured})" if own else ""),
                 f"device: {self.device}" + (f", {self.world} processes" if self.world > 1 else "")]
        if self.teacher is None:
            lines.append(f"teacher: none; training on the masks in {c.pseudo} as written")
        else:
            how = ("online: it labels every augmented crop" if self.teacher_labels == "online" else
                   f"cached: it labels every photo once at {len(self.levels)} scales "
                   f"({', '.join(f'{x:g}' for x in self.levels)} x base size) into {self.out / CACHE_FOLDER}")
            origin = f"rebuilt from {self.run_source}" if self.run and c.teacher == self.run.get("model") else "given"
            lines.append(f"teacher: {c.teacher} {_describe(self.teacher)}, {origin}; {how}")
        passes = c.iters * c.batch_size / max(1, len(self.scan.pairs))
        lines.append(f"iterations: {c.iters} of batch {c.batch_size} ({passes:.0f} "
                     f"passes over {len(self.scan.pairs)} images), lr {c.lr:g} poly to {c.min_lr:g}")
        lines.append(f"scale: base size {c.base_size}, random rescale {c.scale_min:g}-{c.scale_max:g}, crop {c.crop}, "
                     f"photometric distortion {'on' if c.photometric else 'off'}")
        lines.append("loss: cross-entropy" + (f" + colour affinity x{c.affinity_weight:g} (sigma {c.affinity_sigma:g})"
                                              if c.affinity_weight else "")
                     + (f"; the teacher's least sure {c.ignore_unsure:.0%} of pixels ignored" if c.ignore_unsure else "")
                     + (f"; pixels below confidence {c.min_confidence:g} ignored" if c.min_confidence else ""))
        outputs = self.scan.outputs
        lines.append(f"images: {len(self.scan.pairs)} to train on in {c.images}{self.scan.corrected_note()}; "
                     f"{len(self.scan.skipped)} skipped"
                     + (f"; {len(outputs)} seglabel output folders left out" if outputs else ""))
        lines += [f"  skipped: {path}: {reason}" for path, reason in self.scan.skipped]
        lines += [f"  left out: {folder} (a seglabel run's output)" for folder in outputs]
        if self.last is not None:
            lines.append(f"resume: from {self.out / LAST} at iteration {self.last['iteration']} of {c.iters}")
        lines.append(f"out: {self.out} (last.pt, student.pt, config.json, log.jsonl)")
        return lines


def _describe(recipe: Recipe) -> str:
    parts = [recipe.method] if recipe.method else []
    parts += [f"{k.replace('_', ' ')} {v}" for k, v in recipe.model_options.items()]
    protocol = known_protocol(recipe)
    parts += [f"short side {protocol.short_side}"] + (["PAMR"] if protocol.pamr else []) + \
        ([f"window {protocol.window}"] if protocol.window else []) + (["TTA"] if protocol.tta else [])
    return f"({', '.join(parts)})"


def plan(cfg: DistillConfig) -> Plan:
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    _check_numbers(cfg, world)
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: a file, not a folder (--out names the run folder)")
    from ..predict import resolve_device

    device = resolve_device(cfg.device)
    last = read_last(out / LAST) if (out / LAST).is_file() else None  # a bad one: refused before setup
    masks, run = read_pseudo_record(cfg)
    spec = resolve_teacher(cfg.teacher, run)
    labelset, clip_spec = resolve_labels(cfg, run, spec)
    overrides = {"pretrained": cfg.pretrained, "model_config": cfg.model_config, "proxy_weights": cfg.proxy_weights,
                 "regions": cfg.regions}
    base = base_size(cfg, run)
    recipe = mode = None
    if spec is not None:
        recipe = teacher_recipe(spec, run, str(Path(cfg.pseudo or cfg.out) / RUN_FILE), labelset, base, cfg.device,
                                cfg.cache_dir, overrides)
        mode = labels_mode(recipe, cfg.teacher_labels)
    cfg = resolve_settings(replace(cfg, teacher=spec), run, int(clip_spec["config"]["embed_dim"]), device.type, mode)
    arch = StudentArch.from_dict(cfg.student)
    check_backbone(cfg.backbone_weights, arch.depth, arch.width, arch.stem_width)
    if cfg.ignore_unsure and not spec:
        raise UsageError("--ignore-unsure ranks the teacher's pixels: it needs a teacher (--teacher), "
                         "and --pseudo's masks as written have none")
    schedule: list[list[int]] = []
    if last is not None:  # refuse a mismatched resume before minutes of setup
        if cfg.iters is None:  # not given: the resumed run's own plan
            cfg = replace(cfg, iters=saved_schedule(last)[-1][1])
        schedule = check_resumable(cfg, last, out / LAST)
    corrections = find_corrections(Path(cfg.pseudo), labelset) if cfg.pseudo else None  # a person's masks
    scan = scan_pairs(Path(cfg.images), None if spec else masks, len(labelset), labelset.ignore_index,
                      scores=_score_folder(cfg, masks), exclude=(out,), corrections=corrections)
    if cfg.iters is None:
        cfg = replace(cfg, iters=default_iters(len(scan.pairs), cfg.batch_size))
    levels = scale_levels(cfg.scale_min, cfg.scale_max) if mode == "cached" else []
    return Plan(cfg, device, rank, world, labelset, clip_spec, device_defaults(device.type), scan,
                schedule or [[0, cfg.iters]], run, recipe, mode, levels, last)


def _check_numbers(cfg: DistillConfig, world: int) -> None:
    if cfg.arch != "deeplabv2":
        raise UsageError(f"--arch {cfg.arch}: only deeplabv2 is available")
    if cfg.batch_size < 1 or cfg.batch_size % world:
        raise UsageError(f"--batch-size {cfg.batch_size} does not split across {world} processes")
    if (cfg.iters is not None and cfg.iters < 1) or (cfg.crop and cfg.crop % 8):
        raise UsageError(f"--iters must be positive and --crop a multiple of 8 (got {cfg.iters}, {cfg.crop})")
    if not 0 < cfg.scale_min <= cfg.scale_max:
        raise UsageError(f"--scale-min {cfg.scale_min} / --scale-max {cfg.scale_max}: need 0 < min <= max")
    if not math.isfinite(cfg.lr) or cfg.lr < 0:
        raise UsageError(f"--lr {cfg.lr}: must be a finite number, at least 0")
    if cfg.teacher_labels not in TEACHER_LABELS:
        raise UsageError(f"--teacher-labels {cfg.teacher_labels}: choose {', '.join(TEACHER_LABELS)}")
    if cfg.upsample is not None and cfg.upsample not in UPSAMPLE:
        raise UsageError(f"--upsample {cfg.upsample}: choose {' or '.join(UPSAMPLE)}")
    if bool(cfg.val_images) != bool(cfg.val_masks):
        raise UsageError("--val-images and --val-masks go together")


def read_pseudo_record(cfg: DistillConfig) -> tuple[Path | None, dict[str, Any]]:
    """(mask folder or None, annotate's run record of --pseudo or {})."""
    if not cfg.pseudo:
        if cfg.teacher in (None, "auto", "none"):
            raise UsageError("give --pseudo (annotate's output or a mask folder) or --teacher KIND:NAME")
        return None, {}
    pseudo = Path(cfg.pseudo)
    if not pseudo.is_dir():
        raise DataError(f"{pseudo}: no such folder (--pseudo)")
    masks = pseudo / "masks" if (pseudo / "masks").is_dir() else pseudo
    run: dict[str, Any] = {}
    if (pseudo / RUN_FILE).is_file():
        try:
            run = json.loads((pseudo / RUN_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise DataError(f"{pseudo / RUN_FILE}: unreadable run record ({e})") from None
        if not isinstance(run, dict):
            raise DataError(f"{pseudo / RUN_FILE}: not a run record (a JSON object)")
    return masks, run


def resolve_labels(cfg: DistillConfig, run: dict[str, Any], teacher: str | None) -> tuple[LabelSet, dict[str, Any]]:
    """(label set, CLIP text encoder spec of the student's classifier) from --pseudo's run record
    and flags."""
    import open_clip

    source = f"{cfg.pseudo}/{RUN_FILE}"
    if cfg.labels:
        labelset = load_labelset(cfg.labels)
    elif "labelset" in run:
        labelset = parse_labelset(run["labelset"], source=source)
    else:
        raise UsageError(f"{cfg.pseudo or cfg.teacher}: no run.json with a label set here; pass --labels FILE")
    if "labelset" in run and cfg.labels and parse_labelset(run["labelset"]).names != labelset.names:
        raise UsageError(f"{cfg.labels}: its classes differ from those that made {cfg.pseudo} "
                         f"({', '.join(parse_labelset(run['labelset']).names[:5])}...)")
    weights = run.get("weights") or {}
    model_config = cfg.model_config or weights.get("model_config") or argv_value(run.get("argv") or [], "--model-config")
    teacher_name = teacher.partition(":")[2] if teacher and teacher.startswith("maskclip:") else None
    name = cfg.clip or weights.get("model") or teacher_name or "ViT-B-16"
    pretrained = cfg.pretrained or weights.get("pretrained") or "openai"
    if model_config:
        from ..models.clip import register_model_config

        if not Path(model_config).is_file():
            raise UsageError(f"{model_config}: no such model config (recorded in {source}); pass --model-config")
        register_model_config(model_config)
    config = open_clip.get_model_config(name)
    if config is None:
        raise UsageError(f"unknown open_clip model '{name}' for the text encoder; pass --model-config FILE.json")
    if Path(pretrained).is_file():  # student.pt must find it from any working folder
        pretrained = str(Path(pretrained).resolve())
    return labelset, {"model": name, "pretrained": pretrained, "config": config}


def base_size(cfg: DistillConfig, run: dict[str, Any]) -> int:
    """--base-size, else the short side --pseudo's labels were made at, else 512 (the official)."""
    protocol = (run.get("settings") or {}).get("protocol") or {}
    side = protocol.get("short_side")
    recorded = side if isinstance(side, int) and not isinstance(side, bool) and side > 0 else None
    return cfg.base_size or recorded or 512


def resolve_settings(cfg: DistillConfig, run: dict[str, Any], embed_dim: int, device_type: str,
                     teacher_labels: str | None) -> DistillConfig:
    """``cfg`` with every automatic default made concrete; what last.pt and config.json record and
    what a resumed run is compared with.

    - Student: by device (config.device_defaults): on CUDA MaskCLIP+'s ResNet-101 from ImageNet,
      elsewhere a ResNet-18 of half width from random init. Backbone weights keep the standard width.
    - Base size: the short side the teacher labelled at (--pseudo's run record), so the student
      learns at the scale of its labels and, by default, labels at it; 512 when unknown. Crop: the
      base size, at most 512.
    - Photometric distortion: only with an online teacher, which labels the distorted crop (labels
      made from the photo would teach that colour does not matter, where classes may differ by
      colour), and not with the colour-affinity loss, whose colour distances it would rescale.
    - Colour-affinity loss and ignoring the teacher's least sure pixels: from random init, in place
      of the image prior an ImageNet backbone brings (loss.py); off with backbone weights, which is
      MaskCLIP+'s own recipe.
    """
    defaults = device_defaults(device_type)
    weights = cfg.backbone_weights or defaults.backbone_weights
    pretrained = weights != "none"
    depth = cfg.depth or defaults.depth
    width = cfg.width or (64 if pretrained or device_type == "cuda" else defaults.width)
    upsample = cfg.upsample or defaults.upsample
    if cfg.student:  # tests: a whole architecture
        arch = StudentArch.from_dict({**cfg.student, "embed_dim": embed_dim, "upsample": upsample})
    else:
        arch = StudentArch.resnet(depth, embed_dim, width=width, stem_width=width, upsample=upsample)
    base = base_size(cfg, run)
    crop = cfg.crop or min(512, -(-base // 8) * 8)
    affinity = cfg.affinity_weight if cfg.affinity_weight is not None else (0.0 if pretrained else AFFINITY_WEIGHT)
    online = teacher_labels == "online"
    photometric = online and not affinity if cfg.photometric is None else cfg.photometric
    unsure = cfg.ignore_unsure if cfg.ignore_unsure is not None else (IGNORE_UNSURE if teacher_labels and affinity else 0.0)
    return replace(cfg, depth=arch.depth, width=arch.width, student=arch.to_dict(), base_size=base, crop=crop,
                   backbone_weights=weights, upsample=upsample,
                   photometric=photometric, affinity_weight=affinity, ignore_unsure=unsure,
                   teacher_labels=teacher_labels or "none")


def _score_folder(cfg: DistillConfig, masks: Path | None) -> Path | None:
    """Where the teacher's per-pixel confidence is (annotate --save-scores), when it is needed."""
    if not cfg.min_confidence or cfg.teacher or masks is None:
        return None
    scores = Path(cfg.pseudo) / SCORES
    if not scores.is_dir():
        raise DataError(f"{cfg.pseudo}: no {SCORES}/ folder: --min-confidence needs the teacher's confidence; "
                        f"annotate with --save-scores, or use --min-confidence 0")
    return scores
