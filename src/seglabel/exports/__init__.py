"""``seglabel export``: an annotate output as files that CVAT, Label Studio or FiftyOne import.

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

FORMATS = ("cvat", "labelstudio", "fiftyone")


@dataclass
class ExportResult:
    dest: Path
    images: int
    notes: list[str]  # what to do next
    left_out: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): images not exported


def export(out: str | Path, fmt: str, dest: str | Path | None = None, image_roots: Sequence[str | Path] = (),
           document_root: str | Path | None = None, on_image: Callable[[], None] | None = None) -> ExportResult:
    """Write ``fmt`` into ``dest`` (default ``OUT/export/<fmt>``)."""
    if fmt not in FORMATS:
        raise OutputFolderError(f"unknown export format {fmt!r} (known: {', '.join(FORMATS)})")
    if document_root is not None and fmt != "labelstudio":
        raise OutputFolderError("--document-root is for --format labelstudio only")
    run = read_output(out, image_roots)
    dest = Path(dest) if dest is not None else run.out / "export" / fmt
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


__all__ = ["FORMATS", "ExportResult", "OutputFolderError", "export"]
