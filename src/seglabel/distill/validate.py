"""Validation during training: the student labels --val-images as annotate would (Predictor at
the training scale) and ``seglabel.evaluate`` scores the masks against --val-masks."""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from ..evaluate import evaluate_folders
from ..images import find_images, load_image
from ..labelset import LabelSet
from ..models.deeplab import DeepLabV2Student
from ..predict import Predictor, Protocol, to_mask
from ..writers import encode_mask_png, write_bytes
from .config import DistillConfig


@torch.no_grad()
def validate(model: DeepLabV2Student, cfg: DistillConfig, labelset: LabelSet) -> float:
    """mIoU on --val-images/--val-masks (masks written to a temporary folder, then scored)."""
    predictor = Predictor(model.eval(), Protocol(short_side=cfg.base_size))
    with tempfile.TemporaryDirectory(prefix="seglabel-val-") as tmp:
        for item in find_images([cfg.val_images]).items:
            pred = predictor.predict([load_image(item.path)])[0]
            write_bytes(Path(tmp) / f"{item.key}.png", encode_mask_png(to_mask(pred, labelset, 0.0)))
        return evaluate_folders(tmp, cfg.val_masks, labelset).miou
