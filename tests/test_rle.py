"""COCO RLE of a label map in one pass (writers.image_record) against the per-class encoder it
replaced, byte for byte, and against pycocotools' own decoding."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from pycocotools import mask as mask_util

from seglabel.labelset import LabelSet
from seglabel.writers import class_run_lengths, image_record

# pycocotools' decode (used here only to check) warns under NumPy 2; encoding does not.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

STREET = LabelSet.from_names([f"c{i}" for i in range(19)])  # ignore index 255
ADE = LabelSet.from_names([f"c{i}" for i in range(150)])
WIDE = LabelSet.from_names([f"c{i}" for i in range(300)])  # 16-bit masks, ignore index 65535


def per_class_record(rel, mask, confidence, labelset):
    """The encoder image_record used before: one pycocotools.encode per class, each of a full
    binary mask. The reference every record must equal."""
    height, width = mask.shape
    present = np.unique(mask)
    annotations = []
    for k in present[present != labelset.ignore_index].tolist():
        rle = mask_util.encode(np.asfortranarray(mask == k, dtype=np.uint8))
        annotations.append({
            "category_id": int(k) + 1,
            "segmentation": {"size": [height, width], "counts": rle["counts"].decode("ascii")},
            "area": int(mask_util.area(rle)),
            "bbox": [float(v) for v in mask_util.toBbox(rle)],
            "iscrowd": 0,
        })
    return {"file_name": rel, "width": width, "height": height,
            "confidence": round(float(confidence.mean()), 6), "annotations": annotations}


def assert_same_record(mask, labelset):
    confidence = np.linspace(0, 1, mask.size, dtype=np.float32).reshape(mask.shape)
    new = image_record("a/b.jpg", mask, confidence, labelset)
    old = per_class_record("a/b.jpg", mask, confidence, labelset)
    assert new == old
    assert json.dumps(new) == json.dumps(old)  # the bytes a record file holds
    for ann in new["annotations"]:  # and each RLE decodes to exactly its class's pixels
        decoded = mask_util.decode({"size": [mask.shape[0], mask.shape[1]],
                                    "counts": ann["segmentation"]["counts"].encode()})
        np.testing.assert_array_equal(decoded, mask == ann["category_id"] - 1)
    return new


def blobs(height, width, classes, present, seed=0, ignore=255, dtype=np.uint8):
    """A map like a model's: argmax of smooth random logits (blobs), low-confidence pixels ignored."""
    rng = np.random.default_rng(seed)
    chosen = rng.choice(classes, size=present, replace=False)
    logits = torch.from_numpy(rng.normal(size=(1, present, max(2, height // 40), max(2, width // 40)))).float()
    probs = F.interpolate(logits * 3, size=(height, width), mode="bilinear", align_corners=False)[0].softmax(0)
    conf, idx = probs.max(0)
    mask = chosen[idx.numpy()].astype(dtype)
    mask[conf.numpy() < 0.3] = ignore
    return mask


@pytest.mark.parametrize("size", [(480, 640), (97, 131), (31, 1), (1, 29)])
@pytest.mark.parametrize("labelset,present", [(STREET, 13), (ADE, 25)])
def test_blob_maps(size, labelset, present):
    mask = blobs(*size, len(labelset), present)
    rec = assert_same_record(mask, labelset)
    assert rec["annotations"]  # not a vacuous comparison


@pytest.mark.parametrize("seed", range(4))
def test_noise_maps(seed):
    rng = np.random.default_rng(seed)
    mask = rng.choice(np.array([0, 3, 7, 18, 255], dtype=np.uint8), size=(37, 53))
    assert_same_record(mask, STREET)


def test_sixteen_bit_maps():
    mask = blobs(120, 160, 300, 20, ignore=65535, dtype=np.uint16)
    mask[:5] = 299  # the last class; values above 255 must not wrap
    mask[5:10, :7] = 256
    rec = assert_same_record(mask, WIDE)
    assert {a["category_id"] for a in rec["annotations"]} >= {300, 257}


def test_edge_cases():
    # one class everywhere, and one class with some ignored pixels
    assert len(assert_same_record(np.full((6, 4), 5, np.uint8), STREET)["annotations"]) == 1
    m = np.full((6, 4), 5, np.uint8)
    m[2, 1] = 255
    assert_same_record(m, STREET)
    # all ignored: no annotations; a single pixel; a 1x1 ignored pixel
    assert assert_same_record(np.full((6, 4), 255, np.uint8), STREET)["annotations"] == []
    assert_same_record(np.array([[3]], np.uint8), STREET)
    assert assert_same_record(np.array([[255]], np.uint8), STREET)["annotations"] == []
    # a class only at the last pixel, only at the first, at both (runs at the ends of the order)
    for where in ([(-1, -1)], [(0, 0)], [(0, 0), (-1, -1)], [(-1, 0)], [(0, -1)]):
        m = np.zeros((5, 7), np.uint8)
        for y, x in where:
            m[y, x] = 9
        assert_same_record(m, STREET)
    # a run that wraps from the bottom of one column to the top of the next
    m = np.zeros((5, 7), np.uint8)
    m[3:, 2] = 4
    m[:2, 3] = 4
    assert_same_record(m, STREET)
    # stripes along rows and along columns: many runs per class
    assert_same_record(np.tile(np.arange(8, dtype=np.uint8)[:, None], (3, 11)), STREET)
    assert_same_record(np.tile(np.arange(8, dtype=np.uint8)[None, :], (11, 3)), STREET)
    # 1xN and Nx1 with every pixel its own run
    assert_same_record(np.array([[1, 2, 1, 255, 1, 2]], np.uint8), STREET)
    assert_same_record(np.array([[1], [2], [1], [255], [1], [2]], np.uint8), STREET)


def test_layouts_and_dtypes():
    mask = blobs(60, 90, 19, 8)
    base = assert_same_record(mask, STREET)
    assert assert_same_record(np.asfortranarray(mask), STREET) == base  # column-major memory
    big = np.zeros((120, 180), np.uint8)
    big[::2, ::2] = mask
    assert assert_same_record(big[::2, ::2], STREET) == base  # a strided view
    assert assert_same_record(mask.astype(np.int64), STREET) == base  # class indices as int64


def test_run_lengths_are_those_of_encode():
    mask = blobs(40, 50, 19, 6)
    classes, counts = class_run_lengths(mask, 255)
    assert classes == sorted(set(np.unique(mask).tolist()) - {255})
    for k, c in zip(classes, counts):
        assert c.sum() == mask.size
        assert c[1::2].sum() == (mask == k).sum()  # odd entries are the class's runs
        assert (c[1:] > 0).all()  # only the first run (zeros before the class) may be empty


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 12), st.integers(1, 12), st.lists(st.sampled_from([0, 1, 2, 17, 255]), min_size=144,
                                                        max_size=144))
def test_fuzz_small_maps(height, width, values):
    mask = np.array(values[:height * width], dtype=np.uint8).reshape(height, width)
    assert_same_record(mask, STREET)
