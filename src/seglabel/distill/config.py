"""What a user gives ``seglabel distill`` (``DistillConfig``: None means "choose for me") and the
rules that choose: the defaults by device, the schedule's length and the poly learning rate.

``plan.py`` applies these rules once; everything after it reads concrete values.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class DistillConfig:
    images: str
    out: str
    pseudo: str | None = None  # annotate's output folder (masks/ + run.json) or a plain mask folder
    labels: str | None = None  # label set YAML; required with a plain mask folder
    # Who labels the training crops: "auto" = the model that made --pseudo, rebuilt from its run.json
    # as annotate built it; "none" = no one (train on --pseudo's masks as written); or a model spec
    teacher: str | None = "auto"
    # How the teacher's labels reach the crops: "online" (each augmented crop labelled as it is
    # drawn, MaskCLIP+), "cached" (each photo labelled once per scale level, kept in OUT/teacher/),
    # or "auto" (see teacher_labels_for)
    teacher_labels: str = "auto"
    clip: str | None = None  # CLIP text encoder (open_clip name); default: the pseudo-labels' run.json
    pretrained: str | None = None
    model_config: str | None = None
    proxy_weights: str | None = None  # the teacher's second-model weights file, where run.json's has moved
    regions: str | None = None  # the teacher's region source (sam2:FILE...), where run.json's file has moved
    cache_dir: str | None = None
    arch: str = "deeplabv2"
    depth: int | None = None  # None: by device (device_defaults)
    width: int | None = None  # channels of the first ResNet stage (64 = the standard ResNet)
    student: dict[str, Any] | None = None  # the full StudentArch; filled in by the plan
    backbone_weights: str | None = None  # file | imagenet | none; None: by device
    upsample: str | None = None  # how the student labels: guided | bilinear; None: by device
    iters: int | None = None  # None: default_iters (by the number of images), or a resumed run's own
    batch_size: int = 16  # global, split across ranks
    crop: int | None = None  # None: the base size, at most 512
    base_size: int | None = None  # None: the short side the pseudo-labels were made at, else 512
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    power: float = 0.9
    min_lr: float = 1e-4
    self_train_after: int = 0  # 0: never
    photometric: bool | None = None  # mmseg's PhotoMetricDistortion; None: with an online teacher only
    scale_min: float = 0.5  # random rescale range around base_size
    scale_max: float = 2.0
    min_confidence: float = 0.0  # pseudo-label pixels the teacher was less sure of are ignored
    # With a teacher: this fraction of each batch's pixels, the least sure, ignored; None: by device
    ignore_unsure: float | None = None
    affinity_weight: float | None = None  # colour-affinity loss (loss.py); None: by backbone
    affinity_sigma: float = 0.1  # its colour scale (RGB in [0, 1])
    save_every: int = 500
    log_every: int = 10
    val_images: str | None = None
    val_masks: str | None = None
    val_every: int = 500
    workers: int = 2
    device: str = "auto"
    amp: bool = True
    seed: int = 0
    quiet: bool = False  # the Python API: no progress bar
    argv: list[str] = field(default_factory=list)


# Settings a resumed run must share with the run that wrote last.pt (the rest may change: logging,
# workers). ``iters`` may grow (training continues, the schedule stretched); see state.check_resumable.
RESUME_KEYS = ("batch_size", "crop", "base_size", "lr", "momentum", "weight_decay", "power", "min_lr",
               "arch", "student", "seed", "self_train_after", "teacher", "teacher_labels", "photometric",
               "scale_min", "scale_max", "min_confidence", "ignore_unsure", "affinity_weight", "affinity_sigma",
               "backbone_weights")
# What a last.pt written before a setting existed was trained with
BEFORE = {"photometric": True, "scale_min": 0.5, "scale_max": 2.0, "min_confidence": 0.0, "ignore_unsure": 0.0,
          "affinity_weight": 0.0, "affinity_sigma": 0.1}

TEACHER_LABELS = ("auto", "online", "cached")
# Without an image prior (random init): chosen on validation scenes of the toy world (docs/distill.md)
AFFINITY_WEIGHT, IGNORE_UNSURE = 2.5, 0.2
EPOCHS, MIN_ITERS, MAX_ITERS = 13, 1000, 8000  # default_iters


@dataclass(frozen=True)
class DeviceDefaults:
    """The student a device gets when --depth, --width, --backbone-weights and --upsample are not given."""

    depth: int
    width: int
    backbone_weights: str  # imagenet | none
    upsample: str  # guided | bilinear
    measured: str  # where these defaults were measured (config.json records it)


# CUDA: MaskCLIP+'s own recipe, a ResNet-101 from ImageNet weights trained with cross-entropy alone.
# Elsewhere: a ResNet-18 of a quarter width from random init, which trains in minutes on a CPU and
# labels ten times faster than a CorrCLIP teacher, with the colour prior standing in for ImageNet's,
# in training (the affinity loss) and in labelling (guided upsampling); measured on the toy world
# and its shifted version (docs/distill.md).
CUDA_DEFAULTS = DeviceDefaults(101, 64, "imagenet", "bilinear",
                               "MaskCLIP+ (PASCAL Context, COCO-Stuff; ImageNet ResNet-101)")
CPU_DEFAULTS = DeviceDefaults(18, 16, "none", "guided",
                              "seglabel's toy world and its shifted version on a CPU (benchmarks/toyworld/distill_quality.py)")
UPSAMPLE = ("guided", "bilinear")


def device_defaults(device_type: str) -> DeviceDefaults:
    return CUDA_DEFAULTS if device_type == "cuda" else CPU_DEFAULTS


def default_iters(images: int, batch_size: int) -> int:
    """MaskCLIP+'s schedules scale with the data: 4k iterations of batch 16 for PASCAL Context's
    4,996 images (13 passes), 8k for COCO-Stuff's 118k. Here: 13 passes, at least 1000 iterations
    (what a few hundred images need; measured on the toy world) and at most 8000."""
    return int(min(MAX_ITERS, max(MIN_ITERS, round(EPOCHS * images / batch_size))))


def poly_lr(it: int, total: int, base: float, power: float = 0.9, floor: float = 1e-4) -> float:
    """mmseg's poly schedule with a floor: (base - floor) * (1 - it/total)^power + floor."""
    return (base - floor) * (1 - min(it, total) / total) ** power + floor


def scheduled_lr(it: int, schedule: list[list[int]], cfg: DistillConfig) -> float:
    """The lr of iteration ``it`` (0-based). ``schedule`` lists [first iteration, planned end] per
    stretch of training: one entry for a run trained in one go; a rerun with a larger ``--iters``
    appends [where it continued, the new end], so from there the poly curve is the one of a run
    planned for the new end from the start (it rises again if the old run had decayed)."""
    end = next(end for first, end in reversed(schedule) if first <= it)
    return poly_lr(it, end, cfg.lr, cfg.power, cfg.min_lr)
