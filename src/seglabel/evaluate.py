"""Score predicted masks against ground-truth masks: per-class IoU, mIoU, pixel accuracy.

Masks are single-channel PNGs whose pixel values are class indices of the label set: 8-bit
(palette or grayscale) with 255 = ignore, or 16-bit with 65535 = ignore (label sets of more than
254 classes, where 255 is a real class). Predictions and ground truth are matched by relative
path, and one confusion matrix is accumulated over the whole set, one image pair at a time.

When ``pred`` is a seglabel run, its masks are scored under the label set that made them (its
run.json), each through its record as the mask now is (records.py: a mask whose photo changed since
it was labelled, or that holds a value that is no class, is skipped with the reason). Another
label set is refused, unless asked to map the run's classes to it by name (``map_by_name``).

Ground truth that uses other ids (VOC, Cityscapes, COCO-Stuff ...) is translated with an id map,
a YAML or JSON mapping ``gt id -> class index | class name | null``::

    7: road          # or 7: 0
    8: sidewalk
    0: null          # ignore; ids not in the map are ignored too
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

import numpy as np
import yaml

from .errors import UsageError
from .images import printable
from .labelset import IGNORE_INDEX, IGNORE_INDEX_16BIT, LabelSet, LabelSetError, load_labelset, name_key, parse_labelset
from .layout import MASKS, RUN_FILE
from .records import current_record, iter_records, photo_change
from .writers import MaskError, read_mask

if TYPE_CHECKING:
    from rich.table import Table

# Confusion matrices are num_classes^2 int64 counts; past this many entries (1 GiB) refuse
# instead of letting numpy die with an opaque MemoryError halfway through a run.
_MAX_CONFUSION_ENTRIES = 1 << 27

_GT_IGNORED = -1   # lookup-table value: pixel is not scored
_GT_UNKNOWN = -2   # not scored either, but worth a warning (id outside the label set, no id map)


class EvalError(UsageError):
    """Evaluation cannot run; the message is one line naming the file or folder and the problem."""


# -- id maps ----------------------------------------------------------------------------------
def load_id_map(path: str | Path, labelset: LabelSet | None = None) -> dict[int, int]:
    """Read a ``gt id -> class`` map from YAML or JSON.

    Values are class indices, class names (needs ``labelset``; case-insensitive), or null / the
    label set's ignore index (255; 65535 for sets of more than 254 classes) for ignore. Ignore is
    returned as that ignore index. Keys may be ints or strings of ints (JSON keys are strings).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise EvalError(f"{path}: no such id map file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise EvalError(f"{path}: cannot read id map: {e}") from None
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            data = yaml.safe_load(text)  # YAML also reads most JSON
    except json.JSONDecodeError as e:
        raise EvalError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise EvalError(f"{where}: invalid YAML: {problem}") from None
    return parse_id_map(data, labelset, source=str(path))


def parse_id_map(data: Any, labelset: LabelSet | None = None, source: str = "<id map>") -> dict[int, int]:
    """Validate an id map given as plain data (see ``load_id_map``)."""
    if not isinstance(data, dict) or not data:
        raise EvalError(f"{source}: an id map is a non-empty mapping 'gt id: class index or name'")
    ignore = labelset.ignore_index if labelset is not None else IGNORE_INDEX
    by_name = {name_key(n): i for i, n in enumerate(labelset.names)} if labelset is not None else {}
    out: dict[int, int] = {}
    for raw_key, value in data.items():
        key = _id_key(raw_key, source)
        if key in out:
            raise EvalError(f"{source}: gt id {key} is mapped twice")
        if value is None:
            out[key] = ignore
        elif isinstance(value, str):
            if labelset is None:
                raise EvalError(f"{source}: gt id {key} maps to class name {value!r}, "
                                f"which needs a label set to resolve")
            index = by_name.get(name_key(value.strip()))
            if index is None:
                raise EvalError(f"{source}: gt id {key} maps to unknown class {value!r} "
                                f"(label set '{labelset.name}')")
            out[key] = index
        elif isinstance(value, int) and not isinstance(value, bool):
            limit = len(labelset) if labelset is not None else IGNORE_INDEX_16BIT
            if not (0 <= value < limit or value == ignore):
                raise EvalError(f"{source}: gt id {key} maps to {value}, not a class index "
                                f"(0..{limit - 1}) nor ignore ({ignore} or null)")
            out[key] = value
        else:
            raise EvalError(f"{source}: gt id {key} maps to {value!r}; "
                            f"use a class index, a class name or null")
    return out


def _id_key(raw: Any, source: str) -> int:
    if isinstance(raw, bool):  # YAML reads 'yes:' / 'on:' as True
        raise EvalError(f"{source}: key {raw!r} is not a gt id")
    if isinstance(raw, str):
        try:
            raw = int(raw.strip())
        except ValueError:
            raise EvalError(f"{source}: key {raw!r} is not a gt id (an integer)") from None
    if not isinstance(raw, int) or not 0 <= raw <= IGNORE_INDEX_16BIT:
        raise EvalError(f"{source}: key {raw!r} is not a gt id (an integer in 0..65535)")
    return raw


# -- result -----------------------------------------------------------------------------------
@dataclass
class EvalResult:
    names: list[str]
    confusion: np.ndarray          # [gt class, predicted class], int64, valid GT pixels only
    ignored: np.ndarray            # per GT class: pixels predicted as ignore (or out of range)
    iou: np.ndarray                # per class; NaN where the class is in neither pred nor GT
    miou: float                    # mean over classes with an IoU
    pixel_accuracy: float          # correct / valid GT pixels
    mean_accuracy: float           # mean per-class recall over classes present in GT
    images: int                    # image pairs scored
    missing_pred: list[str] = field(default_factory=list)   # GT masks with no prediction
    missing_gt: list[str] = field(default_factory=list)     # predictions with no GT
    skipped: list[tuple[str, str]] = field(default_factory=list)   # (path, reason), not scored
    warnings: list[tuple[str, str]] = field(default_factory=list)  # (path, note), still scored
    gt_uncorrected: int = 0        # --gt a run: its images no person corrected, not ground truth

    @classmethod
    def from_counts(cls, names: list[str], confusion: np.ndarray, ignored: np.ndarray,
                    images: int, **lists: Any) -> "EvalResult":
        tp = np.diag(confusion).astype(np.float64)
        gt_px = (confusion.sum(axis=1) + ignored).astype(np.float64)
        pred_px = confusion.sum(axis=0).astype(np.float64)
        union = gt_px + pred_px - tp
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = np.where(union > 0, tp / union, np.nan)
            recall = np.where(gt_px > 0, tp / gt_px, np.nan)
        total = gt_px.sum()
        return cls(names=list(names), confusion=confusion, ignored=ignored, iou=iou,
                   miou=_nanmean(iou), pixel_accuracy=float(tp.sum() / total) if total else math.nan,
                   mean_accuracy=_nanmean(recall), images=images, **lists)

    @property
    def gt_pixels(self) -> np.ndarray:
        return self.confusion.sum(axis=1) + self.ignored

    @property
    def pred_pixels(self) -> np.ndarray:
        return self.confusion.sum(axis=0)

    def to_dict(self, confusion: bool = False) -> dict[str, Any]:
        """Plain, JSON-able form (NaN -> None). The matrix is left out unless asked for: it has
        num_classes^2 entries."""
        gt_px, pred_px = self.gt_pixels, self.pred_pixels
        out: dict[str, Any] = {
            "images": self.images,
            "miou": _num(self.miou),
            "pixel_accuracy": _num(self.pixel_accuracy),
            "mean_accuracy": _num(self.mean_accuracy),
            "classes": [
                {"name": n, "iou": _num(self.iou[i]), "gt_pixels": int(gt_px[i]),
                 "pred_pixels": int(pred_px[i]), "ignored_pixels": int(self.ignored[i])}
                for i, n in enumerate(self.names)
            ],
            "missing_pred": list(self.missing_pred),
            "missing_gt": list(self.missing_gt),
            "skipped": [{"path": p, "reason": r} for p, r in self.skipped],
            "warnings": [{"path": p, "note": r} for p, r in self.warnings],
            "gt_uncorrected": self.gt_uncorrected,
        }
        if confusion:
            out["confusion"] = self.confusion.tolist()
        return out


def _nanmean(values: np.ndarray) -> float:
    present = values[~np.isnan(values)]
    return float(present.mean()) if present.size else math.nan  # no RuntimeWarning when empty


def _num(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


# -- evaluation -------------------------------------------------------------------------------
def evaluate_folders(pred: str | Path, gt: str | Path, labelset: LabelSet | str | Path | None = None,
                     id_map: Mapping[int, int] | str | Path | None = None, *, map_by_name: bool = False,
                     gt_all: bool = False, progress: Callable[[int, int], None] | None = None) -> EvalResult:
    """Score the masks under ``pred`` against those under ``gt``.

    ``pred`` is an annotate output folder (its masks, under the label set of its run.json) or a
    folder of mask PNGs (then ``labelset`` is needed). A ``labelset`` other than the run's is
    refused unless ``map_by_name``: then each of the run's classes is scored as the class of
    ``labelset`` of the same name (``labelset.name_key``), and classes it lacks count as ignored.
    ``id_map`` translates GT ids (a mapping as ``load_id_map`` returns, or its file).
    ``gt`` may be a seglabel run whose corrections came back (``seglabel import``): its masks as
    they are, under its label set (mapped by name with ``map_by_name``), and only the images a
    person corrected unless ``gt_all``. ``progress(done, total)`` is called after each matched pair.
    """
    made_with, gt_run = run_labelset(pred), _gt_run(gt, id_map)
    if labelset is None:
        if made_with is None and gt_run is None:
            raise EvalError(f"--pred {pred}: not a seglabel run (no {RUN_FILE} with its label set); give --labels, "
                            "the label set the masks use")
        labelset = made_with or gt_run
    elif not isinstance(labelset, LabelSet):
        labelset = load_labelset(labelset)
    pred_lut = None
    if made_with is not None and [name_key(c) for c in made_with.names] != [name_key(c) for c in labelset.names]:
        if not map_by_name:
            raise EvalError(f"-l {labelset.source}: its classes ({_names(labelset)}) are not those {pred} was "
                            f"labelled with ({_names(made_with)}, its {RUN_FILE}); leave -l out to score under the "
                            "run's own, or give --map-by-name to score each class under the name it has in -l")
        pred_lut = _by_name(made_with, labelset)
    n = len(labelset)
    if n * (n + 1) > _MAX_CONFUSION_ENTRIES:
        raise EvalError(f"{labelset.source}: {n} classes is too many for a confusion matrix")
    if isinstance(id_map, (str, Path)):
        id_map = load_id_map(id_map, labelset)
    elif id_map is not None:
        id_map = parse_id_map(dict(id_map), labelset)
    if gt_run is not None and [name_key(c) for c in gt_run.names] != [name_key(c) for c in labelset.names]:
        if not map_by_name:
            raise EvalError(f"--gt {gt}: labelled with other classes ({_names(gt_run)}, its {RUN_FILE}) than those "
                            f"scored ({_names(labelset)}); give --map-by-name to score each by its name")
        index = {name_key(c): i for i, c in enumerate(labelset.names)}
        id_map = {i: index[name_key(c)] for i, c in enumerate(gt_run.names) if name_key(c) in index}
    lut8, lut16 = _gt_luts(labelset, id_map)

    pred_dir, gt_dir = Path(pred), Path(gt)
    skipped: list[tuple[str, str]] = []
    if made_with is not None and (pred_dir / MASKS).is_dir():
        pred_files = _run_masks(pred_dir, made_with, skipped)
        pred_dir = pred_dir / MASKS
    else:
        pred_dir = pred_dir / MASKS if (pred_dir / MASKS).is_dir() else pred_dir
        pred_files = _masks(pred_dir, "predictions")
    uncorrected: list[str] = []
    if gt_run is not None:
        gt_files = _run_masks(gt_dir, gt_run, skipped, None if gt_all else uncorrected, what="ground truth")
        if not gt_files and uncorrected:
            raise EvalError(f"--gt {gt}: none of its {len(uncorrected)} images was corrected by a person (seglabel "
                            "import, or a mask edited by hand); give --gt-all to score against its model labels too")
        gt_dir = gt_dir / MASKS
    else:
        gt_files = _masks(gt_dir, "ground truth")
    matched, not_truth = [k for k in gt_files if k in pred_files], set(uncorrected)
    if not matched:
        raise EvalError(f"no predicted mask matches a ground-truth mask: {pred_dir} has "
                        f"{len(pred_files)} PNGs{_example(pred_files)}, {gt_dir} has "
                        f"{len(gt_files)}{_example(gt_files)} (matched by relative path)")

    # GT class in rows, predicted class in columns; column n collects predicted ignore
    counts = np.zeros(n * (n + 1), dtype=np.int64)
    warnings: list[tuple[str, str]] = []
    images = 0
    for done, key in enumerate(matched, 1):
        try:
            p, g = _read_pair(pred_files[key], gt_files[key])
        except _Skip as e:
            skipped.append((key, str(e)))
        else:
            if pred_lut is not None:
                p = pred_lut[p]
            pair_counts, notes = _score(p, g, lut8, lut16, labelset)
            counts += pair_counts
            warnings += [(key, note) for note in notes]
            images += 1
        if progress is not None:
            progress(done, len(matched))
    if not images:
        path, reason = next((k, r) for k, r in skipped if k in matched)
        raise EvalError(f"no image could be scored: all {len(matched)} matched masks were skipped "
                        f"(first: {path}: {reason})")

    counts = counts.reshape(n, n + 1)
    return EvalResult.from_counts(
        labelset.names, np.ascontiguousarray(counts[:, :n]), counts[:, n].copy(), images,
        missing_pred=[k for k in gt_files if k not in pred_files],
        missing_gt=[k for k in pred_files if k not in gt_files and k not in not_truth],
        skipped=skipped, warnings=warnings, gt_uncorrected=len(uncorrected))


def run_labelset(folder: str | Path) -> LabelSet | None:
    """The label set a seglabel run was labelled with (its run.json), or None for a folder that
    is no run."""
    path = Path(folder) / RUN_FILE
    try:
        run = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise EvalError(f"{path}: unreadable run record ({e})") from None
    if not isinstance(run, dict) or "labelset" not in run:
        return None
    try:
        return parse_labelset(run["labelset"], source=str(path))
    except LabelSetError as e:
        raise EvalError(f"{path}: bad label set ({e})") from None


def _gt_run(gt: str | Path, id_map: Any) -> LabelSet | None:
    """The label set of ``gt`` when it is a seglabel run (its masks then hold its classes)."""
    gt_run = run_labelset(gt)
    if gt_run is None or not (Path(gt) / MASKS).is_dir():
        return None
    if id_map is not None:
        raise EvalError(f"--id-map translates a dataset's ids; --gt {gt} is a seglabel run, whose masks hold the "
                        "classes of its label set: leave --id-map out")
    return gt_run


def _names(labelset: LabelSet, limit: int = 8) -> str:
    names = labelset.names
    return ", ".join(names[:limit]) + (f", ... ({len(names)} classes)" if len(names) > limit else "")


def _by_name(made_with: LabelSet, labelset: LabelSet) -> np.ndarray:
    """Lookup table: the run's class index -> ``labelset``'s index of the same name, else ignore."""
    index = {name_key(c): i for i, c in enumerate(labelset.names)}
    lut = np.full(IGNORE_INDEX_16BIT + 1, IGNORE_INDEX_16BIT, dtype=np.uint16)
    for i, name in enumerate(made_with.names):
        lut[i] = index.get(name_key(name), IGNORE_INDEX_16BIT)
    return lut


def _run_masks(run: Path, labelset: LabelSet, skipped: list[tuple[str, str]], uncorrected: list[str] | None = None,
               what: str = "") -> dict[str, Path]:
    """The masks of a run's labelled images (those with a record), keyed as ``_masks`` keys them;
    a mask that cannot stand for its image (records.current_record), or whose photo changed since
    it was labelled, goes to ``skipped``; with ``uncorrected``, so do the masks no person corrected
    (their keys)."""
    said = f"{what}: " if what else ""
    try:
        record = json.loads((run / RUN_FILE).read_text(encoding="utf-8"))
        roots = [Path(r) for r in record.get("input_roots") or [] if isinstance(r, str)]
    except (OSError, ValueError, AttributeError):
        roots = []
    out: dict[str, Path] = {}
    for key, _ in iter_records(run):
        now = current_record(run, key, labelset)
        name = f"{key}.png"
        if now.problem:
            skipped.append((name, f"{said}{printable(now.problem[0])}: {now.problem[1]}"))
            continue
        if uncorrected is not None and not now.record.get("corrected"):
            uncorrected.append(name)
            continue
        photo = next((r / now.record["file_name"] for r in roots if (r / now.record["file_name"]).is_file()), None)
        change = photo_change(now.record, photo)[0] if photo is not None else ""
        if change:
            skipped.append((name, f"{said}its photo {printable(photo)} {change}: the mask is stale"))
            continue
        out[name] = run / MASKS / name
    return out


def _score(p: np.ndarray, g: np.ndarray, lut8: np.ndarray, lut16: np.ndarray,
           labelset: LabelSet) -> tuple[np.ndarray, list[str]]:
    """Flat (n x n+1) confusion counts of one pair, and notes worth reporting about it."""
    n = len(labelset)
    notes = []
    gt_cls = (lut8 if g.dtype == np.uint8 else lut16)[g]
    if (gt_cls == _GT_UNKNOWN).any():
        notes.append(f"ground truth has ids outside the label set (up to "
                     f"{int(g[gt_cls == _GT_UNKNOWN].max())}); ignored — does it need an id map?")
    # 255 is ignore in any 8-bit mask, and in 16-bit ones unless the label set has a class 255
    eight_bit, p = p.dtype == np.uint8, p.astype(np.int64)
    ignore = p == IGNORE_INDEX_16BIT
    if eight_bit or n < IGNORE_INDEX:
        ignore |= p == IGNORE_INDEX
    out_of_range = (p >= n) & ~ignore
    if out_of_range.any():
        notes.append(f"prediction has ids outside the label set (up to "
                     f"{int(p[out_of_range].max())}); counted as ignore")
    # predicted ignore and out-of-range ids both land in column n: a miss for the GT class
    p_cls = np.where(ignore, n, np.minimum(p, n))
    valid = gt_cls >= 0
    flat = gt_cls[valid].astype(np.int64) * (n + 1) + p_cls[valid]
    return np.bincount(flat, minlength=n * (n + 1)), notes


def _gt_luts(labelset: LabelSet, id_map: Mapping[int, int] | None) -> tuple[np.ndarray, np.ndarray]:
    """Lookup tables gt value -> class index (or _GT_IGNORED / _GT_UNKNOWN), for 8- and 16-bit GT."""
    n = len(labelset)
    if id_map is None:
        lut16 = np.full(IGNORE_INDEX_16BIT + 1, _GT_UNKNOWN, dtype=np.int32)
        lut16[:n] = np.arange(n)
        lut16[labelset.ignore_index] = _GT_IGNORED
        lut16[IGNORE_INDEX_16BIT] = _GT_IGNORED
        lut8 = lut16[:IGNORE_INDEX + 1].copy()
        lut8[IGNORE_INDEX] = _GT_IGNORED  # 255 is ignore in 8-bit GT whatever the label set
        return lut8, lut16
    # with a map, unmapped ids are ignored on purpose (Cityscapes 'unlabeled', 'ego vehicle' ...)
    lut16 = np.full(IGNORE_INDEX_16BIT + 1, _GT_IGNORED, dtype=np.int32)
    for gt_id, cls in id_map.items():
        lut16[gt_id] = cls if cls < n else _GT_IGNORED
    return lut16[:IGNORE_INDEX + 1].copy(), lut16


def _masks(folder: Path, what: str) -> dict[str, Path]:
    """PNG files under ``folder`` keyed by relative path (suffix normalised to .png), sorted."""
    if not folder.is_dir():
        raise EvalError(f"{folder}: no such folder ({what})")
    out: dict[str, Path] = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if path.suffix.lower() != ".png" or any(part.startswith(".") for part in rel.parts):
            continue  # hidden files and folders: .ipynb_checkpoints, editor droppings
        if path.is_file():
            out.setdefault(rel.with_suffix(".png").as_posix(), path)
    return dict(sorted(out.items()))


def _example(files: dict[str, Path]) -> str:
    return f" (e.g. '{next(iter(files))}')" if files else ""


class _Skip(Exception):
    """This pair cannot be scored; the message is the reason."""


def _read_pair(pred: Path, gt: Path) -> tuple[np.ndarray, np.ndarray]:
    p, g = _read(pred, "prediction"), _read(gt, "ground truth")
    if p.shape != g.shape:
        raise _Skip(f"size mismatch: prediction {p.shape[1]}x{p.shape[0]}, ground truth {g.shape[1]}x{g.shape[0]}")
    return p, g


def _read(path: Path, what: str) -> np.ndarray:
    try:
        return read_mask(path)
    except MaskError as e:
        raise _Skip(f"{what} {e.reason}") from None


# -- display ----------------------------------------------------------------------------------
def render_table(result: EvalResult) -> Table:
    """A rich table: one row per class (IoU and accuracy in %), the means in the caption."""
    from rich.table import Table  # only the CLI needs rich; keep the import off the scoring path

    table = Table(title=f"{result.images} images", caption=_summary(result), caption_justify="left")
    table.add_column("class")
    table.add_column("IoU %", justify="right")
    table.add_column("acc %", justify="right")
    table.add_column("GT pixels", justify="right")
    table.add_column("pred pixels", justify="right")
    gt_px, pred_px = result.gt_pixels, result.pred_pixels
    for i, name in enumerate(result.names):
        absent = math.isnan(result.iou[i])
        recall = result.confusion[i, i] / gt_px[i] if gt_px[i] else math.nan
        table.add_row(name, _pct(result.iou[i]), _pct(recall), f"{int(gt_px[i]):,}",
                      f"{int(pred_px[i]):,}", style="dim" if absent else None)
    return table


def _summary(result: EvalResult) -> str:
    parts = [f"mIoU {_pct(result.miou)}%", f"pixel accuracy {_pct(result.pixel_accuracy)}%",
             f"mean accuracy {_pct(result.mean_accuracy)}%"]
    for label, items in (("missing predictions", result.missing_pred),
                         ("without ground truth", result.missing_gt), ("skipped", result.skipped)):
        if items:
            parts.append(f"{len(items)} {label}")
    if result.gt_uncorrected:
        parts.append(f"{result.gt_uncorrected} ground-truth images not corrected by a person (not scored; --gt-all)")
    return " · ".join(parts)


def _pct(x: float) -> str:
    return "—" if math.isnan(x) else f"{100 * x:.2f}"
