"""``seglabel distill``: flags -> ``distill.plan`` -> ``distill.train`` (or, with --dry-run, the
plan printed); errors -> one line and an exit code (cli_handler.py, as for every command; SIGTERM
saves last.pt like Ctrl-C, then exit 143). The library's messages (logging "seglabel") are printed
on stderr: progress unless --quiet, skipped and failed files always.

Registered in cli.py with ``app.command("distill")(distill)``; ``python -m seglabel distill``
is what torchrun runs (``torchrun --nproc_per_node 4 -m seglabel distill ...``).
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from . import exitcodes
from .cli_handler import (
    INPUTS,
    OUTPUTS,
    RUN,
    STUDENT,
    TEACHER,
    TRAINING,
    flag,
    guarded,
    local_folder,
    option,
)
from .errors import UsageError
from .writers import check_output_folder


@guarded
def distill(
    # Inputs
    pseudo: Optional[str] = option(None, "--pseudo", panel=INPUTS, help="annotate's output folder (masks/ + "
                                   "run.json) or a folder of mask PNGs; or a run in a bucket (s3://..., copied into "
                                   "OUT/pseudo first)."),
    images_text: str = option(..., "--images", panel=INPUTS, help="Folder of the images the pseudo-labels were made "
                              "from (local)."),
    labels: Optional[Path] = option(None, "--labels", "-l", panel=INPUTS, help="Label set YAML (default: the one "
                                    "in --pseudo's run.json)."),
    # Teacher
    teacher: str = option("auto", "--teacher", panel=TEACHER, help="Who labels the training crops: auto = the "
                          "model that made --pseudo, rebuilt from its run.json with every option annotate used, "
                          "none = nobody (train on --pseudo's masks as written, e.g. after you corrected them), or "
                          "a model spec (maskclip:ViT-B-16)."),
    teacher_labels: str = option("auto", "--teacher-labels", panel=TEACHER, help="online (the teacher labels every "
                                 "augmented crop, MaskCLIP+), cached (every photo once per scale level, kept in "
                                 "OUT/teacher/) or auto (cached for teachers with a second model, regions, windows "
                                 "or TTA; else online)."),
    proxy_weights: Optional[str] = option(None, "--proxy-weights", panel=TEACHER, help="The teacher's second-model "
                                          "weights file, where the one in run.json has moved."),
    regions: Optional[str] = option(None, "--regions", panel=TEACHER, help="The teacher's region source "
                                    "(sam2:FILE, sam:FILE), where the file in run.json has moved."),
    clip: Optional[str] = option(None, "--clip", panel=TEACHER, help="open_clip text encoder of the student's "
                                 "classifier (default: from --pseudo's run.json)."),
    pretrained: Optional[str] = option(None, "--pretrained", panel=TEACHER, help="Its pretrained tag or weights "
                                       "file (default: from run.json)."),
    model_config: Optional[Path] = option(None, "--model-config", panel=TEACHER, help="open_clip model config JSON "
                                          "to register."),
    cache_dir: Optional[str] = option(None, "--cache-dir", panel=TEACHER, help="CLIP weights cache."),
    min_confidence: float = option(0.0, "--min-confidence", panel=TEACHER, min=0.0, max=1.0, help="Ignore "
                                   "pseudo-label pixels the teacher gave a lower probability (needs annotate "
                                   "--save-scores, or --teacher)."),
    ignore_unsure: Optional[float] = option(None, "--ignore-unsure", panel=TEACHER, min=0.0, max=0.99, help="With "
                                            "a teacher: in every class, ignore this fraction of each batch's pixels, "
                                            "those the teacher is least sure of (default: 0.2 with the affinity "
                                            "loss, else 0)."),
    # Student
    arch: str = option("deeplabv2", "--arch", panel=STUDENT, help="Student architecture (deeplabv2)."),
    depth: Optional[int] = option(None, "--depth", panel=STUDENT, help="ResNet depth of the student: 18, 34, 50 "
                                  "or 101 (default: 101 on CUDA, 18 on a CPU)."),
    width: Optional[int] = option(None, "--width", panel=STUDENT, min=8, help="Channels of the first ResNet "
                                  "stage; 64 is the standard ResNet (default: 64 on CUDA or with "
                                  "--backbone-weights, else 16 on a CPU)."),
    upsample: Optional[str] = option(None, "--upsample", panel=STUDENT, help="How the student labels its 8x8 "
                                     "cells' logits at every pixel: guided (by the photo's colours: boundaries "
                                     "follow colour edges) or bilinear (MaskCLIP+) (default: bilinear on CUDA, "
                                     "guided on a CPU)."),
    backbone_weights: Optional[str] = option(None, "--backbone-weights", panel=STUDENT, help="ResNet weights file "
                                             "(torchvision, timm or mmseg), imagenet (downloaded on first use, "
                                             "then cached), or none (default: imagenet on CUDA, none on a CPU)."),
    # Training
    iters: Optional[int] = option(None, "--iters", panel=TRAINING, min=1, help="Training iterations (default: 13 "
                                  "passes over the images, 1000-8000, as the paper's 2k-8k; a larger value on a "
                                  "finished or interrupted run continues it)."),
    batch_size: int = option(16, "--batch-size", panel=TRAINING, min=1, help="Global batch, split across processes."),
    base_size: Optional[int] = option(None, "--base-size", panel=TRAINING, min=8, help="Short side before the "
                                      "random rescale (default: the short side the pseudo-labels were made at, "
                                      "else 512); the student labels at it unless annotate gets --short-side."),
    crop: Optional[int] = option(None, "--crop", panel=TRAINING, min=8, help="Training crop side, a multiple of 8 "
                                 "(default: the base size, at most 512)."),
    lr: float = option(0.01, "--lr", panel=TRAINING, min=0.0, help="Base learning rate (poly decay, power 0.9, "
                       "floor 1e-4)."),
    affinity_weight: Optional[float] = option(None, "--affinity-weight", panel=TRAINING, min=0.0, help="Weight of "
                                              "the colour-affinity loss: neighbouring pixels of similar colour get "
                                              "the same class (default: 2.5 from random init, 0 with "
                                              "--backbone-weights)."),
    affinity_sigma: float = option(0.1, "--affinity-sigma", panel=TRAINING, min=1e-3, help="Its colour scale "
                                   "(RGB in 0-1)."),
    self_train_after: int = option(0, "--self-train-after", panel=TRAINING, min=0, help="From this iteration the "
                                   "student labels itself (0: never)."),
    photometric: Optional[bool] = flag("--photometric/--no-photometric", panel=TRAINING, default=None,
                                       help="Random brightness, contrast, saturation and hue (default: on with an "
                                       "online teacher and no affinity loss, which it would mislead)."),
    scale_min: float = option(0.5, "--scale-min", panel=TRAINING, min=0.01, help="Random rescale factor, low end."),
    scale_max: float = option(2.0, "--scale-max", panel=TRAINING, min=0.01, help="Random rescale factor, high end."),
    seed: int = option(0, "--seed", panel=TRAINING, help="Seed of initialisation, data order and augmentation."),
    # Outputs
    out_text: str = option(..., "--out", "-o", panel=OUTPUTS, help="Run folder (local): last.pt (resume), "
                           "student.pt, log.jsonl."),
    save_every: int = option(500, "--save-every", panel=OUTPUTS, min=1, help="Write last.pt every N iterations."),
    log_every: int = option(10, "--log-every", panel=OUTPUTS, min=1, help="Progress line and log.jsonl record "
                            "every N iterations."),
    val_images_text: Optional[str] = option(None, "--val-images", panel=OUTPUTS, help="Validation images."),
    val_masks_text: Optional[str] = option(None, "--val-masks", panel=OUTPUTS, help="Their ground-truth masks "
                                           "(class ids of the label set)."),
    val_every: int = option(500, "--val-every", panel=OUTPUTS, min=1, help="Validation mIoU every N iterations."),
    # Run
    device: str = option("auto", "--device", panel=RUN, help="auto, cpu or cuda."),
    workers: int = option(2, "--workers", panel=RUN, min=0, help="Data loading processes per training process."),
    amp: bool = flag("--amp/--no-amp", panel=RUN, default=True, help="Mixed precision on CUDA (default: on)."),
    dry_run: bool = flag("--dry-run", panel=RUN, help="Resolve and check every setting, list the images (and "
                         "the masks skipped and why), print the plan; train nothing, write nothing."),
    quiet: bool = flag("--quiet", "-q", panel=RUN, help="No progress on stderr (log.jsonl is still written); "
                       "skipped and failed files are still named."),
) -> int:
    """Train a DeepLabv2 student on pseudo-labels (MaskCLIP+); label new folders with --model student:OUT/student.pt."""
    from .distill import DistillConfig, plan, train

    images, out = local_folder("--images", images_text, "the photos"), local_folder("--out", out_text, "the run")
    val_images = local_folder("--val-images", val_images_text, "the photos") if val_images_text else None
    val_masks = local_folder("--val-masks", val_masks_text, "the masks") if val_masks_text else None
    check_output_folder(out)
    pseudo = _local_pseudo(pseudo, out, dry_run)
    cfg = DistillConfig(
        images=str(images), out=str(out), pseudo=str(pseudo) if pseudo else None,
        labels=str(labels) if labels else None, teacher=teacher, teacher_labels=teacher_labels, clip=clip,
        pretrained=pretrained, model_config=str(model_config) if model_config else None,
        proxy_weights=proxy_weights, regions=regions, cache_dir=cache_dir, arch=arch, depth=depth,
        width=width, backbone_weights=backbone_weights, upsample=upsample, iters=iters, batch_size=batch_size, crop=crop,
        base_size=base_size, lr=lr, self_train_after=self_train_after, photometric=photometric,
        scale_min=scale_min, scale_max=scale_max, min_confidence=min_confidence, ignore_unsure=ignore_unsure,
        affinity_weight=affinity_weight, affinity_sigma=affinity_sigma, save_every=save_every,
        log_every=log_every, val_images=str(val_images) if val_images else None,
        val_masks=str(val_masks) if val_masks else None, val_every=val_every, workers=workers, device=device,
        amp=amp, seed=seed, quiet=quiet, argv=list(sys.argv))
    if int(os.environ.get("RANK", 0)) != 0:  # one process reports progress; guarded restores the level
        logging.getLogger("seglabel").setLevel(logging.WARNING)
    ready = plan(cfg)  # every refusal comes here, before anything is built or written
    if dry_run:
        for line in ready.lines():
            typer.echo(line)
        return exitcodes.OK
    train(ready, progress_bar=False)  # on Ctrl-C or SIGTERM it saves last.pt before the interrupt reaches the handler
    return exitcodes.OK


_DRY_RUN_COPY: list = []  # a dry run's copy of a bucket's run lives (in a temporary folder) until the process ends


def _local_pseudo(pseudo: str | None, out: Path, dry_run: bool = False) -> str | None:
    """--pseudo as a local folder: a run in a bucket is copied (run.json, masks/, records/, scores/;
    on a rerun only what changed) into OUT/pseudo, which distill then reads as any run folder (a
    dry run, which writes nothing in OUT, into a temporary folder)."""
    import tempfile

    from . import storage

    if pseudo is None or not storage.is_url(pseudo):
        return pseudo
    local = storage.local_path(pseudo)
    if local is not None:
        return local
    from .outputs import copy_down, open_out

    run = open_out(pseudo)
    if run.stat("run.json") is None and not run.holds("masks"):
        raise UsageError(f"--pseudo {run.shown()}: no run.json and no masks/ there (not a seglabel run)")
    if dry_run:
        _DRY_RUN_COPY.append(tempfile.TemporaryDirectory(prefix="seglabel-pseudo-"))
        return str(copy_down(run, _DRY_RUN_COPY[-1].name))
    return str(copy_down(run, out / "pseudo"))
