"""``seglabel export``: an annotate output as files that CVAT, Label Studio or FiftyOne import,
or as a data set for training: a Hugging Face dataset (``hf``) or WebDataset tar shards.

Exported masks are always grayscale PNGs of class indices (never palette PNGs), so OpenCV's
``cv2.imread(path, cv2.IMREAD_UNCHANGED)``, which those tools use, reads indices. Every format is
made from the masks as they are now (run_output.py); an image whose mask cannot be shipped (its
photo changed since, another size, a value that is no class) is left out and listed in ``left_out``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from .run_output import OutputFolderError, read_output

FORMATS = ("cvat", "labelstudio", "fiftyone", "hf", "webdataset")
SHARDED = ("hf", "webdataset")


@dataclass
class ExportResult:
    dest: Path
    images: int
    notes: list[str]  # what to do next
    left_out: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): images not exported


def export(out: str | Path, fmt: str, dest: str | Path | None = None, image_roots: Sequence[str | Path] = (),
           document_root: str | Path | None = None, on_image: Callable[[], None] | None = None,
           shard_size: int | None = None) -> ExportResult:
    """Write ``fmt`` into ``dest`` (default ``OUT/export/<fmt>``; a run in a bucket needs a local
    ``dest``); ``hf`` and ``webdataset`` in shards of at most ``shard_size`` images."""
    if fmt not in FORMATS:
        raise OutputFolderError(f"unknown export format {fmt!r} (known: {', '.join(FORMATS)})")
    if document_root is not None and fmt != "labelstudio":
        raise OutputFolderError("--document-root is for --format labelstudio only")
    if shard_size is not None and fmt not in SHARDED:
        raise OutputFolderError(f"--shard-size is for --format {' or '.join(SHARDED)} only")
    if fmt == "hf":
        from .hf import require_pyarrow

        require_pyarrow()  # before anything is read or written
    from .. import storage

    if storage.is_remote(str(out)) and dest is None:
        raise OutputFolderError(f"{storage.redact(str(out))}: a run in a bucket is exported into a local folder: "
                                "give --dest DIR")
    if dest is not None and storage.is_remote(str(dest)):
        raise OutputFolderError(f"--dest {storage.redact(str(dest))}: give a local folder (then copy it where "
                                "training reads it)")
    if dest is None:
        from ..outputs import open_out

        dest = Path(open_out(out).folder) / "export" / fmt  # a local run: a bucket's needs --dest (above)
    dest = Path(dest)
    # Label Studio and FiftyOne open the photos by path: photos read from a store are copied beside
    # the export (dest/files), where they stay; the others copy them into their own files
    run = read_output(out, image_roots, stage=dest / "files" if fmt in ("labelstudio", "fiftyone") else None)
    if fmt in SHARDED:
        from .shards import DEFAULT_SHARD_IMAGES, plan

        checked = plan(run, DEFAULT_SHARD_IMAGES if shard_size is None else shard_size)
        if fmt == "hf":
            from .hf import write_hf as write
        else:
            from .webdataset_tars import write_webdataset as write
        images, notes = write(run, dest, checked, on_image)
        return ExportResult(dest, images, notes, run.left_out + checked.left_out)
    if fmt == "cvat":
        from .cvat import write_cvat

        notes = write_cvat(run, dest, on_image)
    elif fmt == "labelstudio":
        from .labelstudio import write_labelstudio

        notes = write_labelstudio(run, dest, Path(document_root) if document_root else None, on_image)
    else:
        from .fiftyone_layout import write_fiftyone

        notes = write_fiftyone(run, dest, on_image)
    return ExportResult(dest, len(run.entries), notes, run.left_out)


__all__ = ["FORMATS", "SHARDED", "ExportResult", "OutputFolderError", "export"]
