"""The labelling pipeline: inputs -> batches -> segmenter -> writers, resumable.

An image is done when its record exists (written last, atomically), so a rerun of the same
command skips what is done and labels the rest; ``overwrite`` relabels everything.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from . import __version__, exitcodes
from .images import DEFAULT_MAX_PIXELS, ImageError, ImageItem
from .labelset import LabelSet, parse_labelset
from .loader import Loaded, decode_device, default_workers, load_images
from .models.base import Segmenter
from .predict import Prediction, Predictor, Protocol, resolve_protocol, to_mask
from .runs import RUNS, RunError, read_records, record_path, run_lock, unfinished_shards
from .writers import (MASKS, OVERLAYS, PER_IMAGE, RECORDS, RUN_FILE, SCORES, BackgroundWriter, OutputError,
                      encode_mask_png, encode_overlay_jpg, encode_scores_png, image_record,
                      remove_stale_temporaries, write_bytes, write_coco, write_json)


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
    workers: int | None = None  # loader processes; None: loader.default_workers(device)
    writer_threads: int = 2
    precision: str = "fp32"  # fp32 | fp16 | bf16 (autocast around the model only)
    compile: bool = False  # torch.compile the model's forward (pays off on long GPU runs)
    decode: str = "auto"  # JPEGs: auto (on the GPU when there is one) | cpu | device (loader.decode_device)
    part: str | None = None  # this run is one part of a job (a shard, a Ray actor): no coco.json
    cleanup: bool = True  # look for temporaries a killed run left (a walk of ``out``)


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
    """What decides the labels; a rerun into the same ``--out`` must have the same. In the form the
    records store (through JSON: tuples become lists), so that it compares equal to a stored one."""
    return json.loads(json.dumps({
        "labelset": labelset.fingerprint(),
        "model": getattr(segmenter, "spec", type(segmenter).__name__),
        "weights": getattr(segmenter, "weights_info", {}).get("pretrained"),
        "method": segmenter.describe(),
        "protocol": asdict(config.protocol),
        "min_confidence": labelset.min_confidence if config.min_confidence is None else config.min_confidence,
    }))


def check_settings(out: Path, settings: dict[str, Any]) -> None:
    """Refuse to mix labels made with other settings into ``out`` (whole runs and shards alike)."""
    for _, record in read_records(out):
        previous = record.get("settings")
        if previous and previous != settings:
            changed = sorted(k for k in settings if previous.get(k) != settings[k])
            raise SettingsMismatch(
                f"{out}: holds labels made with other settings (changed: {', '.join(changed)}); "
                f"use another --out, or delete {out} to start over")


def annotate(items: Sequence[ImageItem], segmenter: Segmenter, labelset: LabelSet, config: AnnotateConfig,
             problems: Sequence[ImageError] = (), on_image: Callable[[ImageItem, str | None], None] | None = None,
             argv: Sequence[str] | None = None) -> Summary:
    """Label ``items`` into ``config.out``; returns what happened. ``on_image(item, error)`` is
    called after each image (error None on success) for progress reporting.

    A pipeline: loader processes decode and resize, the model runs on batches of equal-size
    inputs, writer threads encode and write; an image is done when its record is written."""
    out = Path(config.out)
    config = replace(config, protocol=resolve_protocol(config.protocol, segmenter))  # LSeg: its own evaluation
    with run_lock(out, config.part):
        settings = settings_of(labelset, segmenter, config)
        check_settings(out, settings)
        if config.cleanup:
            remove_stale_temporaries(out, None if config.part is None else _owned_by(out, items))
        todo, done = plan(items, out, config.overwrite)
        summary = Summary(out=str(out), total=len(items) + len(problems), skipped=len(done))
        summary.failures.extend((p.path, p.reason) for p in problems)
        record = _run_record(labelset, segmenter, config, settings, argv)
        write_json(record_path(out, config.part), {**record, "status": "running"})
        start = time.perf_counter()
        status = "failed"
        try:
            _label(todo, segmenter, labelset, config, summary, on_image or (lambda item, error: None))
            status = "done"
        except KeyboardInterrupt:
            summary.interrupted, status = True, "interrupted"
        finally:
            summary.seconds = time.perf_counter() - start
            _finish_run(out, labelset, config, record, status, summary)
    return summary


def _label(todo: Sequence[ImageItem], segmenter: Segmenter, labelset: LabelSet, config: AnnotateConfig,
           summary: Summary, on_image: Callable[[ImageItem, str | None], None]) -> None:
    device = segmenter.device
    if device.type == "cuda":
        segmenter.to(memory_format=torch.channels_last)  # faster convolutions on tensor cores
    if config.compile and not hasattr(segmenter.forward, "_torchdynamo_orig_callable"):
        segmenter.forward = torch.compile(segmenter.forward, dynamic=True)
    predictor = Predictor(segmenter, config.protocol, config.batch_size)
    workers = default_workers(device) if config.workers is None else config.workers
    loaded = load_images(todo, config.protocol, segmenter.mean, segmenter.std, config.max_pixels,
                         keep_rgb=config.overlay, workers=workers, pin_memory=device.type == "cuda",
                         decode_on=decode_device(config.decode, device), decode_batch=max(16, config.batch_size))
    writer = BackgroundWriter(config.writer_threads, limit=2 * config.batch_size + 2)
    buckets: dict[tuple, list[Loaded]] = {}  # equal input shapes batch together
    out = Path(config.out)

    def finished(items: list[ImageItem]) -> None:
        for item in items:
            summary.labelled += 1
            on_image(item, None)

    def run(batch: list[Loaded]) -> None:
        for ld, pred in zip(batch, _predict(predictor, batch, config.precision)):
            finished(writer.submit(ld.item, _write_image, out, ld.item, ld.rgb, pred, labelset, config))

    try:
        for ld in loaded:
            if ld.error is not None:
                summary.failures.append((ld.shown_path or str(ld.item.path), ld.error))
                on_image(ld.item, ld.error)
                continue
            shape = tuple(ld.tensor.shape) if ld.tensor is not None else ()  # () : TTA, raw pixels
            bucket = buckets.setdefault(shape, [])
            bucket.append(ld)
            if len(bucket) >= config.batch_size:
                run(buckets.pop(shape))
            elif sum(map(len, buckets.values())) > 4 * config.batch_size:  # odd sizes: bound the wait
                run(buckets.pop(max(buckets, key=lambda k: len(buckets[k]))))
        for key in list(buckets):
            run(buckets.pop(key))
        finished(writer.drain())
    except BaseException:
        # Ctrl-C or an error: images already predicted are written (finish the image in flight),
        # those not yet predicted are left for the rerun.
        try:
            finished(writer.drain())
        except Exception:  # noqa: BLE001 - the first error is the one to report
            pass
        raise
    finally:
        writer.close()


def _owned_by(out: Path, items: Sequence[ImageItem]) -> Callable[[Path], bool]:
    """Which per-image output files belong to ``items`` (a part's own share of ``out``)."""
    keys = {item.key for item in items}

    def owned(target: Path) -> bool:
        rel = target.relative_to(out)
        return len(rel.parts) > 1 and rel.parts[0] in PER_IMAGE and \
            Path(*rel.parts[1:]).with_suffix("").as_posix() in keys
    return owned


def _predict(predictor: Predictor, batch: list[Loaded], precision: str) -> list[Prediction]:
    """Predictions for a batch; on CUDA out-of-memory the batch size is halved and the batch retried."""
    while True:
        try:
            with _autocast(predictor.device, precision):
                if predictor.protocol.tta:
                    return predictor.predict([ld.rgb for ld in batch])
                return predictor.predict_prepared([ld.tensor for ld in batch], [ld.size for ld in batch])
        except torch.OutOfMemoryError:
            if predictor.batch_size == 1:
                raise
            predictor.batch_size //= 2
            if predictor.device.type == "cuda":
                torch.cuda.empty_cache()
            print(f"seglabel: out of memory: batch size halved to {predictor.batch_size}", file=sys.stderr)


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    return torch.autocast(device.type, dtype=dtype)


def _finish_run(out: Path, labelset: LabelSet, config: AnnotateConfig, record: dict[str, Any], status: str,
                summary: Summary) -> None:
    """coco.json (whole runs only) and the final run record, even after Ctrl-C or an error."""
    try:
        if config.part is None:
            write_coco(out, labelset, info=_coco_info(labelset, record))
        write_json(record_path(out, config.part), {**record, "status": status, "summary": summary.to_dict()})
    except OutputError:
        if status != "failed":  # a write error of its own; else the first error is the one to report
            raise


def merge(out: str | Path) -> int:
    """Assemble ``OUT/coco.json`` from the records of every shard; returns the number of images.
    Refused while shards are missing, unfinished or running."""
    out = Path(out)
    if not (out / RUNS).is_dir():
        raise RunError(f"{out}: no shard records in {out / RUNS}; nothing to merge")
    with run_lock(out, None):
        remove_stale_temporaries(out)  # no part is running: whatever is left is stale
        _, problems = unfinished_shards(out)
        if problems:
            raise RunError(f"{out}: cannot merge: {'; '.join(problems)}")
        parts = {part: rec for part, rec in read_records(out) if part is not None}
        first = parts[sorted(parts)[0]]
        labelset = parse_labelset(first["labelset"], source=first.get("labelset_source") or str(out))
        check_settings(out, first["settings"])
        n = write_coco(out, labelset, info=_coco_info(labelset, first))
        # Each part's record holds its latest run: failures still standing after any reruns.
        write_json(out / RUN_FILE, {**first, "part": None, "status": "done", "merged": sorted(parts), "summary": {
            "out": str(out), "images": n,
            "failures": [f for r in parts.values() for f in r.get("summary", {}).get("failures", [])]}})
    return n


def _write_image(out: Path, item: ImageItem, rgb, pred: Prediction, labelset: LabelSet, config: AnnotateConfig) -> None:
    mask = to_mask(pred, labelset, config.min_confidence)
    write_bytes(out / MASKS / f"{item.key}.png", encode_mask_png(mask))
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
        "cwd": os.getcwd(),  # relative input paths in argv are relative to this
        "model": getattr(segmenter, "spec", None),
        "weights": getattr(segmenter, "weights_info", {}),
        "device": str(segmenter.device),
        "python": platform.python_version(),
        "settings": settings,
        "part": config.part,
        "options": {"overlay": config.overlay, "save_scores": config.save_scores,
                    "batch_size": config.batch_size, "max_pixels": config.max_pixels,
                    "workers": config.workers, "precision": config.precision, "decode": config.decode},
        "labelset": labelset.to_dict(),
        "labelset_source": labelset.source,
    }


def _coco_info(labelset: LabelSet, record: dict[str, Any]) -> dict[str, Any]:
    return {"description": f"seglabel {__version__}: {labelset.name}", "version": __version__,
            "model": record["model"], "date_created": record["started"],
            "settings_id": hashlib.sha256(json.dumps(record["settings"], sort_keys=True).encode()).hexdigest()[:16]}
