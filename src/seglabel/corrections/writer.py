"""The common writer of ``seglabel import``: the whole import checked, then each corrected mask
written with its record (``records.write_labelled``: the mask, then the record, each atomically).

The check reads every image of the source before anything is written:

- a label that is no class of the run's label set (in any image) refuses the whole import, in
  one line naming each such label: nothing is written (exit 2);
- an image that is not in the run, whose size differs from its photo's (or the size it was
  labelled at), that two entries of the source name, or that cannot be read: one line each, not
  imported; the others are (exit 3).

An image whose mask already holds exactly these pixels, marked corrected, is left as it is (a
rerun of the same import writes nothing). So is one whose mask the tool gives back unchanged,
unless the tool says a person submitted it (Label Studio's annotations) or ``all_reviewed``: CVAT,
FiftyOne and COCO exports hold every image, reviewed or not. coco.json is then rewritten from the
records.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .. import exitcodes
from ..images import printable
from ..interrupts import held
from ..labelset import LabelSet, name_key
from ..layout import COCO_FILE, MASKS
from ..records import write_coco, write_labelled
from ..writers import OutputFolderError, read_mask
from .source import NO_LABEL, Item, ItemProblem, Source, size_of
from .target import Placed, Target, now, write_run_of_imports

log = logging.getLogger("seglabel")


class ImportRefused(OutputFolderError):
    """Labels that are no class of the run's label set: the import was refused, nothing written."""


@dataclass
class Planned:
    item: Item
    placed: Placed
    photo: dict[str, Any] | None  # the photo's fingerprint for the record


@dataclass
class ImportResult:
    into: Path
    source: str
    tool: str
    new_run: bool
    dry_run: bool = False
    imported: list[str] = field(default_factory=list)  # keys written (to write, in a dry run)
    changed: int = 0  # of those, masks that differ from the ones they replace (new images too)
    unchanged: list[str] = field(default_factory=list)  # already held these pixels, as corrected
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (ref, why): left as they were
    problems: list[tuple[str, str]] = field(default_factory=list)  # (ref, why): not imported
    left_out: list[tuple[str, str]] = field(default_factory=list)  # (path, why): other masks coco.json leaves out

    @property
    def exit_code(self) -> int:
        return exitcodes.FAILURES if self.problems or self.left_out else exitcodes.OK

    def to_dict(self) -> dict[str, Any]:
        return {"into": str(self.into), "source": self.source, "tool": self.tool, "new_run": self.new_run,
                "dry_run": self.dry_run, "imported": self.imported, "changed": self.changed,
                "unchanged": self.unchanged,
                "skipped": [{"image": r, "reason": w} for r, w in self.skipped],
                "problems": [{"image": r, "reason": w} for r, w in self.problems],
                "left_out": [{"path": p, "reason": w} for p, w in self.left_out]}


def check(source: Source, target: Target) -> tuple[list[Planned], "Lookup", ImportResult]:
    """Every image read and placed; returns what to write, the lookup table source id -> class
    index, and the result so far (problems, skipped). ``ImportRefused`` for labels the run's label
    set lacks."""
    result = ImportResult(target.out, source.path, source.tool, target.created, skipped=list(source.skipped),
                          problems=list(source.problems))
    planned, claimed, used = [], {}, {}
    for item in source.items:
        try:
            placed = target.place(item.names)
            if placed.key in claimed:
                raise ItemProblem(f"the same image of the run ({placed.file_name}) as {claimed[placed.key]}; "
                                  "only that one is imported")
            photo, unreadable = target.photo_fingerprint(placed.file_name)
            if unreadable:
                raise ItemProblem(unreadable)
            expected = _expected_size(placed, photo)
            if item.size and expected and item.size != expected:
                raise ItemProblem(_other_size(item.size, expected, placed, photo))
            ids = item.read()
            if expected and size_of(ids) != expected:
                raise ItemProblem(_other_size(size_of(ids), expected, placed, photo))
        except ItemProblem as e:
            result.problems.append((item.ref, str(e)))
            continue
        claimed[placed.key] = item.ref
        for v in used_ids(ids).tolist():
            used.setdefault(v, []).append(item.ref)
        planned.append(Planned(item, placed, photo))
    return planned, _lookup(source, target.labelset, used), result


def used_ids(ids: np.ndarray) -> np.ndarray:
    """The source ids a label map holds, ascending (counted in one pass where they are small)."""
    if ids.size == 0:
        return np.zeros(0, np.int64)
    top = int(ids.max())
    if top < 1 << 20:
        return np.flatnonzero(np.bincount((ids.reshape(-1) + 1).astype(np.intp), minlength=1)) - 1
    return np.unique(ids).astype(np.int64)


def _expected_size(placed: Placed, photo: dict[str, Any] | None) -> tuple[int, int] | None:
    """The photo's size now when it is found, else the size its record says it was labelled at."""
    known = photo or (placed.record or {}).get("photo") or placed.record
    if not known or known.get("width") is None:
        return None
    return int(known["width"]), int(known["height"])


def _other_size(got: tuple[int, int], expected: tuple[int, int], placed: Placed, photo) -> str:
    what = "its photo is" if photo else "it was labelled at"
    return (f"the corrected mask is {got[0]}x{got[1]}, but {what} {expected[0]}x{expected[1]} (run image "
            f"{placed.file_name}); not imported")


@dataclass
class Lookup:
    """Source id + 1 (so NO_LABEL is 0) -> class index or the ignore index; ``known``: the ids checked."""
    table: np.ndarray
    known: np.ndarray


def _lookup(source: Source, labelset: LabelSet, used: dict[int, list[str]]) -> Lookup:
    """Source id (+1, so NO_LABEL is 0) -> class index or the ignore index; refuses the import
    when a used label is no class of the label set (one line naming each, with where it is)."""
    index = {name_key(c.name): i for i, c in enumerate(labelset.classes)}
    ignore = labelset.ignore_index
    top = max([0, *used])
    lut = np.full(top + 2, ignore, dtype=np.uint8 if ignore == 255 else np.uint16)
    missing = []
    for v, refs in sorted(used.items()):
        if v == NO_LABEL or v in source.ignored:
            continue
        name = source.labels.get(v)
        k = index.get(name_key(name)) if name is not None else None
        if k is not None:
            lut[v + 1] = ignore if labelset.classes[k].ignore else k
        elif name is None or name_key(name) not in {name_key(n) for n in source.void_names}:
            where = f"{len(refs)} images, first {printable(refs[0])}" if len(refs) > 1 else printable(refs[0])
            missing.append(f"{source.describe(v)} ({where})")
    known = np.zeros(len(lut), bool)
    known[[v + 1 for v in used]] = True
    if missing:
        raise ImportRefused(f"{source.path}: {len(missing)} labels are no class of the label set "
                            f"{labelset.name!r} ({', '.join(labelset.names[:8])}{', ...' if len(labelset) > 8 else ''}): "
                            f"{'; '.join(missing)}; nothing was imported: rename them in the tool, or import into a "
                            "new run whose --labels has them")
    return Lookup(lut, known)


def write(source: Source, target: Target, planned: list[Planned], lookup: Lookup, result: ImportResult, *,
          all_reviewed: bool = False, dry_run: bool = False, argv: list[str] | None = None,
          on_image: Callable[[str], None] | None = None) -> ImportResult:
    """Write each planned image (the run locked against annotate and other imports), then coco.json;
    ``dry_run``: decide each image the same way, write nothing."""
    if dry_run:
        result.dry_run = True
        for p in planned:
            _apply(source, target, p, lookup, result, all_reviewed, dry_run=True)
        return result
    from ..runs import run_lock  # runs.py imports torch (checkpoints): only when writing

    with run_lock(target.out, None), held() as stop:
        if target.of_imports:
            write_run_of_imports(target, argv, "running")
        status = "failed"
        try:
            for p in planned:
                stop.raise_if_stopped()  # between images: never a mask without its record
                _apply(source, target, p, lookup, result, all_reviewed)
                on_image and on_image(p.item.ref)
            if target.of_imports or (target.out / COCO_FILE).is_file():
                write_coco(target.out, target.labelset, _coco_info(target), left_out=result.left_out)
            status = "done"
        except KeyboardInterrupt:  # Ctrl-C, SIGTERM: the images written are whole; rerun to finish
            status = "interrupted"
            raise
        finally:
            if target.of_imports:
                write_run_of_imports(target, argv, status, {"imported": len(result.imported), "problems": result.problems})
    return result


def _apply(source: Source, target: Target, p: Planned, lookup: Lookup, result: ImportResult, all_reviewed: bool,
           dry_run: bool = False) -> None:
    try:
        ids = p.item.read()
    except ItemProblem as e:  # changed since the check
        result.problems.append((p.item.ref, str(e)))
        return
    present = used_ids(ids)
    lut, known = lookup.table, lookup.known
    if present.size and (present[-1] + 1 >= len(lut) or not known[present + 1].all()):
        result.problems.append((p.item.ref, "changed while it was imported (labels it did not have when checked); "
                                "not imported: run the import again"))
        return
    mask = lut[ids + 1]
    record = p.placed.record or {}
    path = target.out / MASKS / f"{p.placed.key}.png"
    try:
        before = read_mask(path) if path.is_file() else None
    except OutputFolderError:
        before = None
    same = before is not None and before.shape == mask.shape and np.array_equal(before, mask)
    if same and record.get("corrected"):
        result.unchanged.append(p.placed.key)
        return
    if same and not (source.tells_reviewed or all_reviewed):
        result.skipped.append((p.item.ref, "the run's own labels, unchanged in the tool (which does not say whether a "
                               "person reviewed them; --all-reviewed to mark them corrected)"))
        return
    changed = int(mask.size if before is None or before.shape != mask.shape else np.count_nonzero(before != mask))
    result.imported.append(p.placed.key)
    result.changed += changed > 0
    if dry_run:
        return
    corrected = {"by": "person", "tool": source.tool, "source": source.path, "when": p.item.when or now(),
                 "changed_pixels": changed}
    write_labelled(target.out, p.placed.key, p.placed.file_name, mask, target.labelset,
                   settings_id=record.get("settings_id"), photo=p.photo or record.get("photo"), corrected=corrected)
    log.debug("imported %s (%d pixels changed)", p.placed.key, changed)


def _coco_info(target: Target) -> dict[str, Any]:
    from ..runs import settings_id

    settings = target.run.get("settings")
    return {"description": f"seglabel {target.run.get('seglabel_version', '')}: {target.labelset.name}",
            "model": target.run.get("model"), "settings_id": settings_id(settings) if settings else None}
