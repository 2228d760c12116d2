"""``seglabel distill``: flags -> ``distill.train``; errors -> one line and an exit code
(cli_handler.py, as for every command; SIGTERM saves last.pt like Ctrl-C, then exit 143).

Registered in cli.py with ``app.command("distill")(distill)``; ``python -m seglabel distill``
is what torchrun runs (``torchrun --nproc_per_node 4 -m seglabel distill ...``).
"""
from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Optional

import typer

from . import exitcodes
from .cli_handler import guarded
from .errors import UsageError
from .writers import check_output_folder


@guarded
def distill(
    images: Path = typer.Option(..., "--images", help="Folder of the images the pseudo-labels were made from."),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder: last.pt (resume), student.pt, log.jsonl."),
    pseudo: Optional[Path] = typer.Option(None, "--pseudo", help="annotate's output folder (masks/ + run.json) or a folder of mask PNGs."),
    labels: Optional[Path] = typer.Option(None, "--labels", "-l", help="Label set YAML (default: the one in --pseudo's run.json)."),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="maskclip:NAME: compute labels online on each crop instead of --pseudo."),
    arch: str = typer.Option("deeplabv2", "--arch", help="Student architecture (deeplabv2)."),
    depth: int = typer.Option(101, "--depth", help="ResNet depth of the student: 50 or 101."),
    backbone_weights: Optional[str] = typer.Option(None, "--backbone-weights", help="ResNet weights file (torchvision, timm or mmseg), 'imagenet', or none."),
    clip: Optional[str] = typer.Option(None, "--clip", help="open_clip text encoder (default: from --pseudo's run.json)."),
    pretrained: Optional[str] = typer.Option(None, "--pretrained", help="Its pretrained tag or weights file (default: from run.json)."),
    model_config: Optional[Path] = typer.Option(None, "--model-config", help="open_clip model config JSON to register."),
    cache_dir: Optional[str] = typer.Option(None, "--cache-dir", help="CLIP weights cache."),
    iters: int = typer.Option(2000, "--iters", min=1, help="Training iterations (the paper: 2k-8k)."),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Global batch, split across processes."),
    crop: int = typer.Option(512, "--crop", min=8, help="Training crop side (multiple of 8)."),
    base_size: int = typer.Option(512, "--base-size", min=8, help="Short side before the random 0.5-2x rescale."),
    lr: float = typer.Option(0.01, "--lr", min=0.0, help="Base learning rate (poly decay, power 0.9, floor 1e-4)."),
    self_train_after: int = typer.Option(0, "--self-train-after", min=0, help="From this iteration the student labels itself (0: never)."),
    save_every: int = typer.Option(500, "--save-every", min=1, help="Write last.pt every N iterations."),
    log_every: int = typer.Option(10, "--log-every", min=1, help="Progress line and log.jsonl record every N iterations."),
    val_images: Optional[Path] = typer.Option(None, "--val-images", help="Validation images."),
    val_masks: Optional[Path] = typer.Option(None, "--val-masks", help="Their ground-truth masks (class ids of the label set)."),
    val_every: int = typer.Option(500, "--val-every", min=1, help="Validation mIoU every N iterations."),
    workers: int = typer.Option(2, "--workers", min=0, help="Data loading processes per training process."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    amp: bool = typer.Option(True, "--amp/--no-amp", help="Mixed precision on CUDA."),
    seed: int = typer.Option(0, "--seed", help="Seed of initialisation, data order and augmentation."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress on stderr (log.jsonl is still written)."),
) -> int:
    """Train a DeepLabv2 student on pseudo-labels (MaskCLIP+); label new folders with --model student:OUT/student.pt."""
    from .distill import DistillConfig, train

    if arch != "deeplabv2":
        raise UsageError(f"--arch {arch}: only deeplabv2 is available")
    if bool(val_images) != bool(val_masks):
        raise UsageError("--val-images and --val-masks go together")
    if not math.isfinite(lr):
        raise UsageError(f"--lr {lr}: must be a finite number")
    check_output_folder(out)
    cfg = DistillConfig(
        images=str(images), out=str(out), pseudo=str(pseudo) if pseudo else None,
        labels=str(labels) if labels else None, teacher=teacher, clip=clip, pretrained=pretrained,
        model_config=str(model_config) if model_config else None, cache_dir=cache_dir, depth=depth,
        backbone_weights=backbone_weights, iters=iters, batch_size=batch_size, crop=crop, base_size=base_size,
        lr=lr, self_train_after=self_train_after, save_every=save_every, log_every=log_every,
        val_images=str(val_images) if val_images else None, val_masks=str(val_masks) if val_masks else None,
        val_every=val_every, workers=workers, device=device, amp=amp, seed=seed, quiet=quiet, argv=list(sys.argv))
    train(cfg)  # on Ctrl-C or SIGTERM it saves last.pt before the interrupt reaches the handler
    return exitcodes.OK
