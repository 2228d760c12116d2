"""The labelling pipeline: inputs -> batches -> segmenter -> writers, resumable.

An image is done when its record exists (written last, atomically), so a rerun of the same
command skips what is done and labels the rest; ``overwrite`` relabels everything.
"""
from __future__ import annotations

import hashlib
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

from . import __version__, exitcodes
from .images import DEFAULT_MAX_PIXELS, ImageError, ImageItem, load_image
from .labelset import LabelSet
from .models.base import Segmenter
from .predict import Prediction, Predictor, Protocol, to_mask
from .writers import (MASKS, OVERLAYS, RECORDS, RUN_FILE, SCORES, encode_mask_png, encode_overlay_jpg,
                      encode_scores_png, image_record, remove_stale_temporaries, write_bytes, write_coco,
                      write_json)


class SettingsMismatch(ValueError):
    """``--out`` holds labels made with other settings; mixing them would corrupt the set."""


@dataclass
class AnnotateConfig:
    out: Path
    overwrite: bool = False
    overlay: bool = False
    save_scores: bool = False
    min_confidence: float | None = None  # None: the label set's ignore.min_confidence
    batch_size: int = 1
    max_pixels: int = DEFAULT_MAX_PIXELS
    protocol: Protocol = field(default_factory=Protocol)


@dataclass
class Summary:
    out: str
    total: int = 0
    labelled: int = 0
    skipped: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    interrupted: bool = False

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return exitcodes.INTERRUPTED
        return exitcodes.FAILURES if self.failures else exitcodes.OK

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["failures"] = [{"path": p, "reason": r} for p, r in self.failures]
        d["images_per_second"] = round(self.labelled / self.seconds, 3) if self.seconds else None
        d["exit_code"] = self.exit_code
        return d


def is_done(out: Path, item: ImageItem) -> bool:
    return (out / RECORDS / f"{item.key}.json").is_file() and (out / MASKS / f"{item.key}.png").is_file()


def plan(items: Sequence[ImageItem], out: Path, overwrite: bool = False) -> tuple[list[ImageItem], list[ImageItem]]:
    """Split inputs into (to label, already done)."""
    if overwrite:
        return list(items), []
    todo, done = [], []
    for item in items:
        (done if is_done(out, item) else todo).append(item)
    return todo, done


def settings_of(labelset: LabelSet, segmenter: Segmenter, config: AnnotateConfig) -> dict[str, Any]:
    """What decides the labels; a rerun into the same ``--out`` must have the same."""
    return {
        "labelset": labelset.fingerprint(),
        "model": getattr(segmenter, "spec", type(segmenter).__name__),
        "weights": getattr(segmenter, "weights_info", {}).get("pretrained"),
        "method": segmenter.describe(),
        "protocol": asdict(config.protocol),
        "min_confidence": labelset.min_confidence if config.min_confidence is None else config.min_confidence,
    }


def check_settings(out: Path, settings: dict[str, Any]) -> None:
    run_file = out / RUN_FILE
    if not run_file.is_file():
        return
    try:
        previous = json.loads(run_file.read_text(encoding="utf-8")).get("settings")
    except (OSError, ValueError):
        return  # unreadable run record: it is rewritten by this run
    if previous and previous != settings:
        changed = sorted(k for k in settings if previous.get(k) != settings[k])
        raise SettingsMismatch(
            f"{out}: holds labels made with other settings (changed: {', '.join(changed)}); "
            f"use another --out, or delete {out} to start over")


def annotate(items: Sequence[ImageItem], segmenter: Segmenter, labelset: LabelSet, config: AnnotateConfig,
             problems: Sequence[ImageError] = (), on_image: Callable[[ImageItem, str | None], None] | None = None,
             argv: Sequence[str] | None = None) -> Summary:
    """Label ``items`` into ``config.out``; returns what happened. ``on_image(item, error)`` is
    called after each image (error None on success) for progress reporting."""
    out = Path(config.out)
    settings = settings_of(labelset, segmenter, config)
    check_settings(out, settings)
    if out.exists():
        remove_stale_temporaries(out)
    todo, done = plan(items, out, config.overwrite)
    summary = Summary(out=str(out), total=len(items) + len(problems), skipped=len(done))
    summary.failures.extend((p.path, p.reason) for p in problems)
    record = _run_record(labelset, segmenter, config, settings, argv)
    write_json(out / RUN_FILE, {**record, "status": "running"})
    predictor = Predictor(segmenter, config.protocol, config.batch_size)
    start = time.perf_counter()
    try:
        for i in range(0, len(todo), config.batch_size):
            batch, images = [], []
            for item in todo[i:i + config.batch_size]:
                try:
                    images.append(load_image(item.path, config.max_pixels))
                    batch.append(item)
                except ImageError as e:
                    summary.failures.append((str(item.path), e.reason))
                    on_image and on_image(item, e.reason)
            for item, rgb, pred in zip(batch, images, predictor.predict(images) if images else []):
                _write_image(out, item, rgb, pred, labelset, config)
                summary.labelled += 1
                on_image and on_image(item, None)
    except KeyboardInterrupt:
        summary.interrupted = True
    finally:
        summary.seconds = time.perf_counter() - start
        write_coco(out, labelset, info=_coco_info(labelset, record))
        status = "interrupted" if summary.interrupted else "done"
        write_json(out / RUN_FILE, {**record, "status": status, "summary": summary.to_dict()})
    return summary


def _write_image(out: Path, item: ImageItem, rgb, pred: Prediction, labelset: LabelSet, config: AnnotateConfig) -> None:
    mask = to_mask(pred, labelset, config.min_confidence)
    write_bytes(out / MASKS / f"{item.key}.png", encode_mask_png(mask, labelset))
    if config.save_scores:
        write_bytes(out / SCORES / f"{item.key}.png", encode_scores_png(pred.confidence))
    if config.overlay:
        write_bytes(out / OVERLAYS / f"{item.key}.jpg", encode_overlay_jpg(rgb, mask, labelset))
    write_json(out / RECORDS / f"{item.key}.json", image_record(item.rel, mask, pred.confidence, labelset))


def _run_record(labelset: LabelSet, segmenter: Segmenter, config: AnnotateConfig,
                settings: dict[str, Any], argv: Sequence[str] | None) -> dict[str, Any]:
    return {
        "seglabel_version": __version__,
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "argv": list(argv if argv is not None else sys.argv),
        "model": getattr(segmenter, "spec", None),
        "weights": getattr(segmenter, "weights_info", {}),
        "device": str(segmenter.device),
        "python": platform.python_version(),
        "settings": settings,
        "options": {"overlay": config.overlay, "save_scores": config.save_scores,
                    "batch_size": config.batch_size, "max_pixels": config.max_pixels},
        "labelset": labelset.to_dict(),
        "labelset_source": labelset.source,
    }


def _coco_info(labelset: LabelSet, record: dict[str, Any]) -> dict[str, Any]:
    return {"description": f"seglabel {__version__}: {labelset.name}", "version": __version__,
            "model": record["model"], "date_created": record["started"],
            "settings_id": hashlib.sha256(json.dumps(record["settings"], sort_keys=True).encode()).hexdigest()[:16]}
