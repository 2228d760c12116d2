"""What every reader of a review tool's export gives ``seglabel import``: the images it holds, each
with the names that identify it, its size and a way to read its label map in the source's own
label ids; the labels by name; and the images the annotators skipped.

A label map in source ids is int32 (H, W), ``NO_LABEL`` (-1) where the person painted nothing.
Readers read lazily: ``Item.read`` is called once to check the whole import before anything is
written, and once more to write (so memory does not grow with the number of images).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..errors import SeglabelError, UsageError

NO_LABEL = -1
# Names a tool gives to "no class" that mean ignored pixels when the label set has no class of
# that name: our CVAT export's last label (see exports/cvat.py), and CVAT's own "background",
# which it adds to every Segmentation mask export for the pixels no label covers.
VOID_NAMES = ("ignore", "ignored", "void", "seglabel_ignore", "background")


class SourceError(UsageError):
    """A source that cannot be read at all (not the format it was taken for): nothing was imported."""


class ItemProblem(SeglabelError):
    """One image of a source that cannot be imported; ``str()`` is the reason."""


@dataclass
class Item:
    """One image of the source, as a person left it."""
    ref: str  # how the source names it, in messages
    names: tuple[str, ...]  # what identifies it in a run: a seglabel key, file paths (most specific first)
    size: tuple[int, int] | None  # (width, height) when the source says it without decoding
    read: Callable[[], np.ndarray]  # its label map in source ids; ItemProblem if it cannot be read
    when: str | None = None  # when the person made it, if the tool says (ISO 8601)


@dataclass
class Source:
    tool: str  # the record's corrected.tool: label-studio, cvat, fiftyone, coco
    path: str  # what was imported: a file, a folder, or fiftyone:NAME
    labels: dict[int, str]  # source id -> label name
    items: list[Item]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (ref, why): left as they were
    problems: list[tuple[str, str]] = field(default_factory=list)  # (ref, why): cannot be imported
    ignored: frozenset[int] = frozenset()  # source ids that mean "no class" (ignored pixels)
    unknown: dict[int, str] = field(default_factory=dict)  # source id -> what it is, for ids with no label
    void_names: tuple[str, ...] = VOID_NAMES
    tells_reviewed: bool = False  # every item is what a person submitted (Label Studio's annotations)

    def describe(self, source_id: int) -> str:
        if source_id in self.labels:
            return repr(self.labels[source_id])
        return self.unknown.get(source_id, f"pixel value {source_id}")


def size_of(mask: np.ndarray) -> tuple[int, int]:
    return int(mask.shape[1]), int(mask.shape[0])
