"""Every label set shipped in ``labelsets/`` loads, and the standard ones have the expected size."""
from __future__ import annotations

from pathlib import Path

import pytest

from seglabel.labelset import load_labelset

LABELSETS_DIR = Path(__file__).parent.parent / "labelsets"
LABELSET_FILES = sorted(LABELSETS_DIR.glob("*.yaml"))

# class counts of the standard evaluation label sets; files added later need no entry here
EXPECTED_COUNTS = {
    "street.yaml": 19,        # Cityscapes
    "voc20.yaml": 20,         # PASCAL VOC without background
    "voc21.yaml": 21,         # PASCAL VOC with background
    "context59.yaml": 59,     # PASCAL Context
    "cocostuff171.yaml": 171,  # COCO-Stuff
    "ade150.yaml": 150,       # ADE20K
}


def test_standard_labelsets_are_shipped():
    shipped = {p.name for p in LABELSET_FILES}
    missing = sorted(set(EXPECTED_COUNTS) - shipped)
    assert not missing, f"missing from {LABELSETS_DIR}: {missing}"


@pytest.mark.parametrize("path", LABELSET_FILES, ids=[p.name for p in LABELSET_FILES])
def test_shipped_labelset(path: Path):
    labels = load_labelset(path)  # raises LabelSetError (file:line: problem) on any error

    if path.name in EXPECTED_COUNTS:
        assert len(labels) == EXPECTED_COUNTS[path.name]

    folded = [n.casefold() for n in labels.names]
    duplicates = sorted({n for n in folded if folded.count(n) > 1})
    assert not duplicates, f"duplicate class names: {duplicates}"

    for c in labels.classes:
        assert c.name and c.name == c.name.strip()
        assert c.prompts, c.name
        assert isinstance(c.color, tuple) and len(c.color) == 3, (c.name, c.color)
        assert all(isinstance(v, int) and 0 <= v <= 255 for v in c.color), (c.name, c.color)
