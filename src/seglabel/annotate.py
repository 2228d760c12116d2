"""The labelling pipeline: inputs -> batches -> segmenter -> writers, resumable.

An image is done when its record exists (written last, atomically) beside every other output
the command asks for and its photo is still the one it labelled, so a rerun of the same command
skips what is done and labels the rest (a rerun that adds ``--overlay`` relabels what lacks one,
a photo replaced since is labelled again); ``overwrite`` relabels everything, except masks a
person corrected: those are never overwritten (``plan``, records.py). Nothing is written before
every check passed: a refused run leaves ``out`` as it was.
"""
from __future__ import annotations

import contextlib
import logging
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from . import __version__, exitcodes
from .errors import interrupt_exit_code
from .images import DEFAULT_MAX_PIXELS, ImageError, ImageItem, printable
from .interrupts import held
from .labelset import LabelSet, parse_labelset
from .loader import Loaded, decode_device, default_workers, load_images
from .memory import MemoryCheck
from .models.base import Segmenter
from .predict import Prediction, Predictor, Protocol, check_protocol, to_mask
from .outputs import FolderOut, Out, open_out
from .records import (HEAD_BYTES, current_record, mask_rel, parse_record_head, photo_change, read_record, record_rel,
                      write_coco, write_labelled)
from .runs import (RUNS, RunError, SettingsMismatch, check_settings, read_records, record_path, run_lock,
                   run_settings, settings_id, unfinished_shards)
from .writers import (MASKS, OVERLAYS, PER_IMAGE, RECORDS, RUN_FILE, SCORES, BackgroundWriter, OutputError,
                      encode_overlay_jpg, encode_scores_png, remove_stale_temporaries)

__all__ = ["AnnotateConfig", "Plan", "SettingsMismatch", "Summary", "annotate", "merge", "outputs_of", "plan",
           "settings_of"]

log = logging.getLogger("seglabel")
BUCKET_WRITER_THREADS = 8  # writing into a bucket, each PUT waits on the network: more in flight


@dataclass
class AnnotateConfig:
    out: str | Path  # a folder, or a bucket prefix (s3://bucket/labels): outputs.open_out
    overwrite: bool = False
    overlay: bool = False
    save_scores: bool = False
    min_confidence: float | None = None  # None: the label set's ignore.min_confidence
    batch_size: int = 1
    max_pixels: int = DEFAULT_MAX_PIXELS
    protocol: Protocol = field(default_factory=Protocol)  # used as given (predict.resolve_protocol decides it)
    workers: int | None = None  # loader processes; None: loader.default_workers(device)
    writer_threads: int = 2  # into a bucket at least BUCKET_WRITER_THREADS: each PUT waits on the network
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
    kept: int = 0  # masks corrected by a person, never relabelled
    failures: list[tuple[str, str]] = field(default_factory=list)
    skipped_outputs: list[str] = field(default_factory=list)  # seglabel output folders under the inputs
    seconds: float = 0.0
    interrupted: bool = False
    interrupt_code: int | None = None  # 130 after Ctrl-C, 143 after SIGTERM

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return self.interrupt_code or exitcodes.INTERRUPTED
        return exitcodes.FAILURES if self.failures else exitcodes.OK

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["failures"] = [{"path": p, "reason": r} for p, r in self.failures]
        d["images_per_second"] = round(self.labelled / self.seconds, 3) if self.seconds else None
        d["exit_code"] = self.exit_code
        return d


def outputs_of(item: ImageItem, config: AnnotateConfig) -> list[str]:
    """Every file an image gets from this command (relative to the output); its record, written
    last, comes last."""
    paths = [mask_rel(item.key)]
    if config.save_scores:
        paths.append(f"{SCORES}/{item.key}.png")
    if config.overlay:
        paths.append(f"{OVERLAYS}/{item.key}.jpg")
    return paths + [record_rel(item.key)]


@dataclass
class Plan:
    todo: list[ImageItem] = field(default_factory=list)
    done: list[ImageItem] = field(default_factory=list)
    kept: list[ImageItem] = field(default_factory=list)  # corrected by a person: never relabelled
    failures: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    rewrites: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # records to bring up to date
    stale: set[str] = field(default_factory=set)  # keys of corrected masks whose photo changed: not in coco.json


def plan(items: Sequence[ImageItem], config: AnnotateConfig, labelset: LabelSet, out: Out | None = None) -> Plan:
    """What a run does with each input (reads only; ``annotate`` applies ``rewrites``):

    - no record, or no mask: label it;
    - a mask a person corrected (its record says so, or the mask changed since its record: the
      record is rewritten as corrected): kept, even with ``overwrite``; if its photo changed
      since, a failure (the corrected mask is not overwritten);
    - else label it when its photo changed since it was labelled (``records.photo_change``),
      with ``overwrite``, or when an output the command asks for is missing; else it is done.
    ``out``: the output opened already (default: ``config.out``)."""
    out = out if out is not None else open_out(config.out)
    present: dict[str, Any] = {}
    for sub in (MASKS, RECORDS) + ((SCORES,) if config.save_scores else ()) + ((OVERLAYS,) if config.overlay else ()):
        present.update(out.listing(sub))  # one walk (one listing in a bucket), not a look per file
    labelled = [item for item in items if record_rel(item.key) in present and mask_rel(item.key) in present]
    heads = dict(out.read_heads([record_rel(item.key) for item in labelled], HEAD_BYTES))
    result = Plan()
    decide = lambda item: _plan_image(out, item, config, labelset, present, heads)  # noqa: E731
    if out.local and not any(item.remote for item in items):
        decisions = list(map(decide, items))
    else:  # the photos' and records' reads overlap (each a request)
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(16) as pool:
            decisions = list(pool.map(decide, items))
    for item, (kind, detail, rewrite) in zip(items, decisions):
        if kind == "failed":
            result.failures.append(detail)
            if rewrite == "stale":
                result.stale.add(item.key)
            continue
        getattr(result, kind).append(item)
        if rewrite is not None:
            result.rewrites.append((record_rel(item.key), rewrite))
    return result


def _plan_image(out: Out, item: ImageItem, config: AnnotateConfig, labelset: LabelSet, present: dict[str, Any],
                heads: dict[str, bytes | None]) -> tuple[str, Any, Any]:
    """(kind: todo, done, kept or failed; the failure; the record to write back, or "stale")."""
    record_file, mask_file = record_rel(item.key), mask_rel(item.key)
    head = heads.get(record_file)
    if head is None:  # not labelled yet, or a record or mask gone: label it (again)
        return "todo", None, None
    try:
        record = parse_record_head(head) or read_record(out, record_file)
    except OutputError:
        return "todo", None, None
    st = present[mask_file]
    rewrite = None
    known = record.get("mask") or {}
    if (known.get("bytes"), known.get(out.version_key)) != (st.size, st.version):  # the mask changed?
        now = current_record(out, item.key, labelset, stat=st)
        if now.problem:
            return "failed", now.problem, None
        record, rewrite = now.record, (now.record if now.edited else now.refresh)
    change, photo = photo_change(record, item)
    if record.get("corrected"):
        if change:
            return "failed", (printable(item.path), f"{change}, but its mask was corrected by hand and is kept; to "
                                                    f"label it again, delete {out.shown(mask_file)} and "
                                                    f"{out.shown(record_file)}"), "stale"
        kind = "kept"
    elif change or config.overwrite or not all(rel in present for rel in outputs_of(item, config)):
        return "todo", None, None
    else:
        kind = "done"
    if photo is not None:  # only touched: remember its new time, so the next rerun need not read it
        rewrite = {**(rewrite or read_record(out, record_file)), "photo": photo}
    return kind, None, rewrite


def settings_of(labelset: LabelSet, segmenter: Segmenter, config: AnnotateConfig) -> dict[str, Any]:
    """What decides the labels (``runs.run_settings``); a rerun into the same ``--out`` must have the same."""
    return run_settings(labelset, getattr(segmenter, "spec", type(segmenter).__name__),
                        getattr(segmenter, "weights_info", {}).get("pretrained"), config.protocol,
                        config.min_confidence, method=segmenter.describe())


def annotate(items: Sequence[ImageItem], segmenter: Segmenter, labelset: LabelSet, config: AnnotateConfig,
             problems: Sequence[ImageError] = (), on_image: Callable[[ImageItem, str | None], None] | None = None,
             argv: Sequence[str] | None = None, skipped_outputs: Sequence[str] = ()) -> Summary:
    """Label ``items`` into ``config.out``; returns what happened. ``on_image(item, error)`` is
    called after each image (error None on success) for progress reporting. ``skipped_outputs``:
    seglabel output folders the inputs held (``images.Inputs``), for the summary.

    A pipeline: loader processes decode and resize, the model runs on batches of equal-size
    inputs, writer threads encode and write; an image is done when its record is written (last,
    after its other outputs). Nothing is written before the protocol and settings checks pass."""
    out = open_out(config.out)
    check_protocol(config.protocol, segmenter)  # before anything is written
    settings = settings_of(labelset, segmenter, config)
    with run_lock(out, config.part):
        check_settings(out, settings)
        if config.cleanup and isinstance(out, FolderOut):  # a bucket has none: each object is one PUT
            remove_stale_temporaries(out.folder, None if config.part is None else _owned_by(out.folder, items))
        planned = plan(items, config, labelset, out)
        summary = Summary(out=out.shown(), total=len(items) + len(problems), skipped=len(planned.done),
                          kept=len(planned.kept), skipped_outputs=list(skipped_outputs))
        summary.failures.extend((p.path, p.reason) for p in problems)
        summary.failures.extend(planned.failures)
        previous = next((r for part, r in read_records(out) if part == config.part), {})
        roots = {r for r in previous.get("input_roots") or [] if isinstance(r, str)} | {item.root for item in items}
        record = _run_record(labelset, segmenter, config, settings, argv, sorted(roots))
        out.write_json(record_path(config.part), {**record, "status": "running"})
        start = time.perf_counter()
        status, error = "failed", None
        try:
            for path, rewritten in planned.rewrites:  # edited masks recorded as corrected, touched photos
                out.write_json(path, rewritten)
            _label(out, planned.todo, segmenter, labelset, config, settings_id(settings), summary,
                   on_image or (lambda item, error: None))
            status = "done"
        except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: what was in flight is written
            summary.interrupted, summary.interrupt_code, status = True, interrupt_exit_code(e), "interrupted"
        except BaseException as e:
            error = e
            raise
        finally:
            summary.seconds = time.perf_counter() - start
            _finish_run(out, labelset, config, record, status, summary, error, planned.stale)
    return summary


def _label(out: Out, todo: Sequence[ImageItem], segmenter: Segmenter, labelset: LabelSet, config: AnnotateConfig,
           settings: str, summary: Summary, on_image: Callable[[ImageItem, str | None], None]) -> None:
    device = segmenter.device
    if device.type == "cuda":
        segmenter.to(memory_format=torch.channels_last)  # faster convolutions on tensor cores
    if config.compile and not hasattr(segmenter.forward, "_torchdynamo_orig_callable"):
        segmenter.forward = torch.compile(segmenter.forward, dynamic=True)
    predictor = Predictor(segmenter, config.protocol, config.batch_size)
    remote = any(item.remote for item in todo)
    workers = default_workers(device, remote) if config.workers is None else config.workers
    memory = MemoryCheck.now(config.protocol, len(labelset), segmenter.stride, config.overlay, config.save_scores)
    threads = config.writer_threads if out.local else max(config.writer_threads, BUCKET_WRITER_THREADS)
    writer = BackgroundWriter(threads, limit=2 * config.batch_size + threads)
    buckets: dict[tuple, list[Loaded]] = {}  # equal input shapes batch together

    def finished(items: list[ImageItem]) -> None:
        for item in items:
            summary.labelled += 1
            on_image(item, None)

    def failed(ld: Loaded, reason: str) -> None:
        summary.failures.append((ld.shown_path or str(ld.item.path), reason))
        on_image(ld.item, reason)

    def run(batch: list[Loaded]) -> None:
        for ld, pred in zip(batch, _predict(predictor, batch, config.precision)):
            if isinstance(pred, str):
                failed(ld, pred)
                continue
            if not np.isfinite(pred.confidence).all():
                failed(ld, "the model gave scores that are not finite numbers (NaN or infinity)")
                continue
            if memory.crowded(*ld.size, writer.limit):  # a huge image is written alone
                finished(writer.drain())
            finished(writer.submit(ld.item, _write_image, out, ld.item, ld.rgb, pred, labelset, config, settings,
                                   ld.photo))

    # Signals are held while images are in flight and acted on between them, so a stop never
    # falls between writing an image's record and counting it.
    with held() as stop:
        loaded = load_images(todo, config.protocol, segmenter.mean, segmenter.std, config.max_pixels,
                             keep_rgb=config.overlay, workers=workers, pin_memory=device.type == "cuda", fits=memory,
                             decode_on=decode_device(config.decode, device), decode_batch=max(16, config.batch_size))
        try:
            for ld in _until_stopped(loaded, stop):
                if ld.error is not None:
                    failed(ld, ld.error)
                    continue
                shape = tuple(ld.tensor.shape) if ld.tensor is not None else ()  # () : TTA, raw pixels
                bucket = buckets.setdefault(shape, [])
                bucket.append(ld)
                if len(bucket) >= config.batch_size:
                    run(buckets.pop(shape))
                elif sum(map(len, buckets.values())) > 4 * config.batch_size:  # odd sizes: bound the wait
                    run(buckets.pop(max(buckets, key=lambda k: len(buckets[k]))))
            for key in list(buckets):
                stop.raise_if_stopped()
                run(buckets.pop(key))
            finished(writer.drain())
        except BaseException:
            # A stop or an error: images already predicted are written (finish the images in
            # flight), those not yet predicted are left for the rerun.
            try:
                finished(writer.drain())
            except Exception:  # noqa: BLE001 - the first error is the one to report
                pass
            raise
        finally:
            writer.close()
            loaded.close()  # loader processes shut down now, not at interpreter exit


def _until_stopped(loaded: Iterator[Loaded], stop) -> Iterator[Loaded]:
    """The loaded images until a held signal asks to stop. A loader process that the same signal
    ended (SIGTERM reaches every process of a Slurm job) fails the fetch, as a RuntimeError or, when
    it dies while handing over a tensor, a ConnectionResetError: that is the stop too."""
    try:
        for ld in loaded:
            stop.raise_if_stopped()
            yield ld
    except Exception:
        stop.raise_if_stopped()
        raise


def _owned_by(out: Path, items: Sequence[ImageItem]) -> Callable[[Path], bool]:
    """Which per-image output files belong to ``items`` (a part's own share of ``out``)."""
    keys = {item.key for item in items}

    def owned(target: Path) -> bool:
        rel = target.relative_to(out)
        return len(rel.parts) > 1 and rel.parts[0] in PER_IMAGE and \
            Path(*rel.parts[1:]).with_suffix("").as_posix() in keys
    return owned


def _predict(predictor: Predictor, batch: list[Loaded], precision: str) -> list[Prediction | str]:
    """Predictions for a batch; out of memory, the batch size is halved and the batch retried.
    At batch size 1, each image that still does not fit gets the reason instead (a per-image
    failure: the next image may be smaller)."""
    while True:
        try:
            return _predict_now(predictor, batch, precision)
        except (torch.OutOfMemoryError, MemoryError, RuntimeError) as e:
            if not _out_of_memory(e):
                raise
            reason = f"not enough memory to label it at these settings ({_first_line(e)})"
        _release(predictor.device)
        if predictor.batch_size == 1:
            break
        predictor.batch_size //= 2
        log.warning("out of memory: batch size halved to %d", predictor.batch_size)
    if len(batch) == 1:
        return [reason]
    out: list[Prediction | str] = []
    for ld in batch:
        out.extend(_predict(predictor, [ld], precision))
    return out


def _predict_now(predictor: Predictor, batch: list[Loaded], precision: str) -> list[Prediction]:
    with _autocast(predictor.device, precision):
        if predictor.protocol.tta:
            return predictor.predict([ld.rgb for ld in batch])
        return predictor.predict_prepared([ld.tensor for ld in batch], [ld.size for ld in batch])


def _out_of_memory(e: BaseException) -> bool:
    """CUDA's and the CPU allocator's (a RuntimeError "can't allocate memory") out-of-memory errors."""
    return isinstance(e, (torch.OutOfMemoryError, MemoryError)) or "can't allocate memory" in str(e)


def _release(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _first_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:200] or type(e).__name__


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    return torch.autocast(device.type, dtype=dtype)


def _finish_run(out: Out, labelset: LabelSet, config: AnnotateConfig, record: dict[str, Any], status: str,
                summary: Summary, error: BaseException | None = None, stale: set[str] = frozenset()) -> None:
    """coco.json (whole runs only; without the ``stale`` keys) and the final run record, even after
    Ctrl-C or ``error`` (which goes on propagating). The run record always ends true: a write that
    fails here (coco.json, or the run record itself) makes it ``failed`` with that error, which is
    then raised."""
    failure, own = (None if error is None else _error_line(error)), None
    if config.part is None:
        left_out: list[tuple[str, str]] = []
        try:
            write_coco(out, labelset, info=_coco_info(labelset, record), left_out=left_out, exclude=stale)
        except OutputError as e:
            if error is None:
                own, failure, status = e, str(e), "failed"
        reported = {path for path, _ in summary.failures}
        summary.failures.extend(p for p in left_out if p[0] not in reported)
    final = {**record, "status": status, **({"error": failure} if failure else {}), "summary": summary.to_dict()}
    try:
        _write_run_record(out, record_path(config.part), final)
    except OutputError:
        if error is None and own is None:
            raise
    if own is not None:
        raise own


def _write_run_record(out: Out, path: str, final: dict[str, Any]) -> None:
    """The run record; when even that cannot be written (a full disk, a size limit), a compact one
    saying ``failed`` and why, so run.json never stays ``running`` after the run ended."""
    try:
        out.write_json(path, final)
        return
    except OutputError as e:
        first = e
    core = {k: final[k] for k in ("seglabel_version", "started", "argv", "cwd", "input_roots", "model", "settings",
                                  "part", "labelset") if k in final}
    why = final.get("error") or str(first)
    for smaller in ({**core, "status": "failed", "error": why, "summary": final.get("summary")},
                    {**{k: core[k] for k in ("seglabel_version", "settings", "part") if k in core},
                     "status": "failed", "error": why}):
        try:
            out.write_json(path, smaller, indent=None)
            break
        except OutputError:
            continue
    raise first


def _error_line(error: BaseException) -> str:
    return str(error) if isinstance(error, OutputError) else f"{type(error).__name__}: {error}"


def merge(out: str | Path, left_out: list[tuple[str, str]] | None = None) -> int:
    """Assemble ``OUT/coco.json`` from the records of every shard; returns the number of images.
    Refused while shards are missing, unfinished or running, and in a folder seglabel did not
    write. Images whose mask cannot be used are left out and added to ``left_out`` (path, reason)
    (without it: refused). A write error leaves run.json ``failed`` with the error."""
    out = open_out(out)
    if not out.listing(RUNS):
        raise RunError(f"{out.shown()}: no shard records in {out.shown(RUNS)}; nothing to merge")
    if not out.is_run_folder():
        raise RunError(f"{out.shown()}: not written by seglabel (no run.json or shard records of a seglabel run); "
                       "nothing to merge")
    with run_lock(out, None):
        if isinstance(out, FolderOut):
            remove_stale_temporaries(out.folder)  # no part is running: whatever is left is stale
        _, problems = unfinished_shards(out)
        if problems:
            raise RunError(f"{out.shown()}: cannot merge: {'; '.join(problems)}")
        parts = {part: rec for part, rec in read_records(out) if part is not None}
        first = parts[sorted(parts)[0]]
        labelset = parse_labelset(first["labelset"], source=first.get("labelset_source") or out.shown())
        check_settings(out, first["settings"])
        roots = sorted({root for r in parts.values() for root in r.get("input_roots") or []})
        record = {**first, "part": None, "merged": sorted(parts), "input_roots": roots}
        # Each part's record holds its latest run: failures still standing after any reruns.
        failures = [f for r in parts.values() for f in r.get("summary", {}).get("failures", [])]
        summary = {"out": out.shown(), "failures": failures}
        try:
            n = write_coco(out, labelset, info=_coco_info(labelset, first), left_out=left_out)
        except OutputError as e:
            with contextlib.suppress(OutputError):  # the first error is the one to report
                _write_run_record(out, RUN_FILE, {**record, "status": "failed", "error": str(e), "summary": summary})
            raise e
        _write_run_record(out, RUN_FILE, {**record, "status": "done", "summary": {**summary, "images": n}})
    return n


def _write_image(out: Out, item: ImageItem, rgb, pred: Prediction, labelset: LabelSet, config: AnnotateConfig,
                 settings: str, photo: dict[str, Any] | None = None) -> None:
    mask = to_mask(pred, labelset, config.min_confidence)
    if config.save_scores:
        out.write_bytes(f"{SCORES}/{item.key}.png", encode_scores_png(pred.confidence))
    if config.overlay:
        out.write_bytes(f"{OVERLAYS}/{item.key}.jpg", encode_overlay_jpg(rgb, mask, labelset))
    height, width = mask.shape
    write_labelled(out, item.key, item.rel, mask, labelset, settings_id=settings, confidence=pred.confidence,
                   photo=None if photo is None else {"width": width, "height": height, **photo})


def _run_record(labelset: LabelSet, segmenter: Segmenter, config: AnnotateConfig,
                settings: dict[str, Any], argv: Sequence[str] | None, roots: list[str]) -> dict[str, Any]:
    return {
        "seglabel_version": __version__,
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "argv": list(argv if argv is not None else sys.argv),
        "cwd": os.getcwd(),
        # The folders the records' file names are relative to (preview and export find photos there).
        "input_roots": roots,
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
            "model": record["model"], "date_created": record["started"], "settings_id": settings_id(record["settings"])}
