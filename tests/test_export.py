"""`seglabel export`: CVAT, Label Studio and FiftyOne files, checked against each format's rules
(how each importer reads them). The real tools load them in test_labelstudio.py and
test_export_real_tools.py."""
from __future__ import annotations

import json
import os
import subprocess
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from PIL import Image

from seglabel.exports.brush_rle import encode, encode_mask
from seglabel.labelset import parse_labelset
from seglabel.records import write_coco
from seglabel.writers import MASKS, RECORDS, RUN_FILE, encode_mask_png, image_record, write_bytes, write_json
from conftest import write_images
from test_annotate_cli import annotate, run

STREET = {"name": "street", "templates": "none",
          "classes": [{"name": "background", "color": [10, 20, 30]}, {"name": "road", "color": [128, 64, 128]},
                      {"name": "person", "color": [220, 20, 60]}]}


def make_output(root: Path, masks: dict[str, np.ndarray], labelset: dict = STREET, confidence: dict | None = None,
                palette_masks: bool = False, photos: bool = True) -> Path:
    """An annotate output written with annotate's own writers: photos in root/photos, labels in
    root/labels. ``palette_masks`` writes masks the way seglabel did before grayscale masks."""
    ls = parse_labelset(labelset)
    out = root / "labels"
    rng = np.random.default_rng(0)
    for key, mask in masks.items():
        rel = f"{key}.jpg"
        if photos:
            photo = root / "photos" / rel
            photo.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (*mask.shape, 3), dtype=np.uint8)).save(photo)
        if palette_masks:
            img = Image.fromarray(mask)
            img.putpalette([v for c in ls.palette for v in c] + [0] * (768 - 3 * len(ls)))
            path = out / MASKS / f"{key}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            img.save(path)
        else:
            write_bytes(out / MASKS / f"{key}.png", encode_mask_png(mask))
        conf = (confidence or {}).get(key, 0.5)
        record = image_record(rel, mask, np.full(mask.shape, conf, dtype=np.float32), ls)
        write_json(out / RECORDS / f"{key}.json", record)
    write_json(out / RUN_FILE, {"argv": ["seglabel", "annotate", str(root / "photos"), "--labels", "x.yaml",
                                         "--out", str(out)], "input_roots": [str(root / "photos")],
                                "model": "maskclip:test", "labelset": ls.to_dict(), "labelset_source": "x.yaml"})
    write_coco(out, ls)
    return out


def street_masks() -> dict[str, np.ndarray]:
    a = np.zeros((6, 8), dtype=np.uint8)
    a[:, 4:] = 1
    a[0, 0] = 255
    b = np.full((5, 7), 2, dtype=np.uint8)
    b[2:, :3] = 255
    return {"a": a, "sub/b": b}


def export(out: Path, fmt: str, *extra: str) -> subprocess.CompletedProcess:
    """The command, in a subprocess (exit code and messages)."""
    return run("export", str(out), "--format", fmt, *extra)


def export_files(out: Path, fmt: str, **options):
    """The library call behind the command (faster: no interpreter start)."""
    from seglabel.exports import export as run_export

    return run_export(out, fmt, **options)


# -- Label Studio brush RLE, decoded by the format's definition -----------------------------------
def decode_brush_rle(data: list[int]) -> np.ndarray:
    """rle-pack as Label Studio's frontend reads it: header, then repeat/literal chunks."""
    bits = "".join(f"{b:08b}" for b in data)
    pos = 0

    def read(n: int) -> int:
        nonlocal pos
        assert pos + n <= len(bits), "stream ended early"
        value = int(bits[pos:pos + n], 2) if n else 0
        pos += n
        return value

    count, word = read(32), read(5) + 1
    sizes = [read(4) + 1 for _ in range(4)]
    out = np.zeros(count, dtype=np.uint32)
    i = 0
    while i < count:
        repeat = read(1)
        j = i + 1 + read(sizes[read(2)])
        assert j <= count, "a run past the end"
        if repeat:
            out[i:j] = read(word)
        else:
            for k in range(i, j):
                out[k] = read(word)
        i = j
    assert len(bits) - pos < 8 and set(bits[pos:]) <= {"0"}, "only zero padding may follow"
    return out


def test_brush_rle_header_and_one_chunk_by_hand():
    # 4 values of 255: count 4 | word size 8 -> 7 | field sizes 3,4,8,16 -> 2,3,7,15 |
    # one repeat chunk: flag 1, size #0 (3 bits), length-1 = 3, value 255; then zero padding
    expected = "0" * 29 + "100" + "00111" + "0010" + "0011" + "0111" + "1111" + "1" + "00" + "011" + "11111111"
    expected += "0" * (-len(expected) % 8)
    assert encode(np.full(4, 255, np.uint8)) == list(int(expected, 2).to_bytes(len(expected) // 8, "big"))


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40), st.integers(1, 40), st.floats(0, 1), st.integers(0, 2 ** 32 - 1))
def test_brush_rle_round_trips_any_mask(h, w, density, seed):
    rng = np.random.default_rng(seed)
    mask = rng.random((h, w)) < density
    rgba = decode_brush_rle(encode_mask(mask)).reshape(h, w, 4)
    assert (rgba[..., 3] == 255).tolist() == mask.tolist()
    assert set(np.unique(rgba).tolist()) <= {0, 255} and (rgba == rgba[..., :1]).all()


def test_brush_rle_splits_runs_longer_than_the_widest_length_field():
    mask = np.ones((300, 300), dtype=bool)  # 360,000 equal values; a chunk holds at most 65,536
    mask[299, 299] = False
    rgba = decode_brush_rle(encode_mask(mask)).reshape(300, 300, 4)
    assert (rgba[..., 3] == 255).tolist() == mask.tolist()


# -- CVAT ---------------------------------------------------------------------------------------------
def read_labelmap(text: str) -> list[tuple[str, tuple[int, ...]]]:
    """labelmap.txt as Datumaro's VOC parser reads it: 4 ':'-fields, '#' lines skipped."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            fields = line.split(":")
            assert len(fields) == 4, line
            out.append((fields[0], tuple(int(v) for v in fields[1].split(","))))
    return out


def png_from_zip(z: zipfile.ZipFile, name: str, tmp_path: Path) -> np.ndarray:
    path = tmp_path / name.replace("/", "_")
    path.write_bytes(z.read(name))
    return cv2.imread(str(path), cv2.IMREAD_UNCHANGED)


def test_cvat_segmentation_mask_zip(tmp_path):
    masks = street_masks()
    out = make_output(tmp_path, masks)
    export_files(out, "cvat", dest=tmp_path / "cvat")
    with zipfile.ZipFile(tmp_path / "cvat" / "segmentation_mask_1.1.zip") as z:
        text = z.read("labelmap.txt").decode()
        assert text.splitlines()[0] == "# label:color_rgb:parts:actions"
        assert text.splitlines()[1:] == ["background:0,0,0::", "road:128,64,128::", "person:220,20,60::",
                                         "ignore:224,224,192::"]
        labels = read_labelmap(text)
        assert z.read("ImageSets/Segmentation/default.txt").decode().split() == ["a", "sub/b"]
        for key, mask in masks.items():
            got = png_from_zip(z, f"SegmentationClass/{key}.png", tmp_path)
            assert got.ndim == 2 and got.dtype == np.uint8  # indices, as Datumaro uses them
            assert got.max() < len(labels)  # every id has a labelmap line (else CVAT rejects it)
            expected = np.where(mask == 255, 3, mask)
            np.testing.assert_array_equal(got, expected)
    assert [(d["name"], d["type"]) for d in json.loads((tmp_path / "cvat" / "cvat_labels.json").read_text())] == [
        ("background", "mask"), ("road", "mask"), ("person", "mask"), ("ignore", "mask")]


def test_cvat_coco_zip_category_ids_start_at_one(tmp_path):
    from pycocotools import mask as mask_util

    masks = street_masks()
    out = make_output(tmp_path, masks)
    export_files(out, "cvat")
    with zipfile.ZipFile(out / "export" / "cvat" / "coco_1.0.zip") as z:
        coco = json.loads(z.read("annotations/instances_default.json"))
    assert [(c["id"], c["name"]) for c in coco["categories"]] == [(1, "background"), (2, "road"), (3, "person")]
    assert all(a["category_id"] >= 1 for a in coco["annotations"])
    images = {i["id"]: i for i in coco["images"]}
    for key, mask in masks.items():
        [image] = [i for i in images.values() if i["file_name"] == f"{key}.jpg"]
        decoded = np.full(mask.shape, 255, np.uint8)
        for a in coco["annotations"]:
            if a["image_id"] == image["id"]:
                rle = {**a["segmentation"], "counts": a["segmentation"]["counts"].encode()}
                decoded[mask_util.decode(rle).astype(bool)] = a["category_id"] - 1
        np.testing.assert_array_equal(decoded, mask)


def test_cvat_ignore_label_does_not_clash_with_a_class_named_ignore(tmp_path):
    labelset = {"name": "x", "templates": "none", "classes": ["ignore", "cat"]}
    out = make_output(tmp_path, {"a": np.array([[0, 1, 255]], np.uint8)}, labelset)
    export_files(out, "cvat")
    with zipfile.ZipFile(out / "export" / "cvat" / "segmentation_mask_1.1.zip") as z:
        names = [n for n, _ in read_labelmap(z.read("labelmap.txt").decode())]
    assert names[:2] == ["ignore", "cat"] and names[2] not in ("ignore", "cat") and len(names) == 3


def test_cvat_over_255_classes_writes_coco_only(tmp_path):
    labelset = {"name": "big", "templates": "none", "classes": [f"c{i}" for i in range(300)]}
    mask = np.array([[0, 299, 65535]], np.uint16)
    out = make_output(tmp_path, {"a": mask}, labelset)
    notes = export_files(out, "cvat").notes
    assert any("segmentation_mask_1.1.zip not written" in n and "300 classes" in n for n in notes)
    assert not (out / "export" / "cvat" / "segmentation_mask_1.1.zip").exists()
    assert (out / "export" / "cvat" / "coco_1.0.zip").is_file()


def test_cvat_refuses_a_class_name_its_labelmap_cannot_hold(tmp_path):
    labelset = {"name": "x", "templates": "none", "classes": ["a:b", "c"]}
    out = make_output(tmp_path, {"a": np.zeros((2, 2), np.uint8)}, labelset)
    r = export(out, "cvat")
    assert r.returncode == 2 and "'a:b'" in r.stderr and len(r.stderr.strip().splitlines()) == 1


# -- Label Studio -------------------------------------------------------------------------------------
def test_labelstudio_config_and_tasks(tmp_path):
    masks = street_masks()
    out = make_output(tmp_path, masks, confidence={"a": 0.9, "sub/b": 0.4})
    export_files(out, "labelstudio")
    dest = out / "export" / "labelstudio"
    view = ET.fromstring((dest / "label_config.xml").read_text())
    brush = view.find("BrushLabels")
    assert brush.get("toName") == view.find("Image").get("name")
    assert [(lb.get("value"), lb.get("background")) for lb in brush.findall("Label")] == [
        ("background", "#0a141e"), ("road", "#804080"), ("person", "#dc143c")]
    assert [c.get("value") for c in view.find("Choices").findall("Choice")] == ["ok", "fix", "discard"]

    tasks = json.loads((dest / "tasks.json").read_text())
    assert [t["data"]["image"] for t in tasks] == ["/data/local-files/?d=photos/a.jpg",
                                                   "/data/local-files/?d=photos/sub/b.jpg"]
    for task, (key, mask) in zip(tasks, masks.items()):
        [prediction] = task["predictions"]
        assert prediction["score"] == {"a": 0.9, "sub/b": 0.4}[key]
        present = sorted(set(np.unique(mask).tolist()) - {255})
        assert len(prediction["result"]) == len(present)  # one result per class present
        for result, k in zip(prediction["result"], present):
            assert result["type"] == "brushlabels" and result["from_name"] == brush.get("name")
            assert result["to_name"] == "image" and result["value"]["format"] == "rle"
            assert result["value"]["brushlabels"] == [STREET["classes"][k]["name"]]
            h, w = mask.shape
            assert (result["original_width"], result["original_height"]) == (w, h)
            rgba = decode_brush_rle(result["value"]["rle"]).reshape(h, w, 4)
            np.testing.assert_array_equal(rgba[..., 3] > 0, mask == k)


def test_labelstudio_document_root(tmp_path):
    """Label Studio serves files only from a Local files storage strictly inside its document
    root: by default the root is the photos folder's parent, and the storage that folder."""
    out = make_output(tmp_path, street_masks())
    notes = " ".join(export_files(out, "labelstudio").notes)
    assert f"LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT={tmp_path};" in notes and f"path {tmp_path / 'photos'} " in notes
    export_files(out, "labelstudio", document_root=tmp_path / "photos")
    tasks = json.loads((out / "export" / "labelstudio" / "tasks.json").read_text())
    assert tasks[1]["data"]["image"] == "/data/local-files/?d=sub/b.jpg"
    r = export(out, "labelstudio", "--document-root", str(tmp_path / "elsewhere"))
    assert r.returncode == 2 and "not inside --document-root" in r.stderr
    (tmp_path / "photos").rename(tmp_path / "moved")
    r = export(out, "labelstudio")
    assert r.returncode == 2 and "photos not found" in r.stderr and "--images" in r.stderr


# -- FiftyOne -----------------------------------------------------------------------------------------
def test_fiftyone_layout_reads_as_indices(tmp_path):
    masks = street_masks()
    out = make_output(tmp_path, masks, confidence={"a": 0.9, "sub/b": 0.4})
    export_files(out, "fiftyone", dest=tmp_path / "fo")
    dest = tmp_path / "fo"
    data = json.loads((dest / "data.json").read_text())
    # the importer pairs images and labels by path without extension
    labels = {os.path.splitext(p.relative_to(dest / "labels").as_posix())[0]: p for p in (dest / "labels").rglob("*.png")}
    assert {os.path.splitext(k)[0] for k in data} == set(labels) == set(masks)
    for name, path in data.items():
        assert os.path.isabs(path) and Path(path).is_file() and path.endswith(name)
    for key, mask in masks.items():
        got = cv2.imread(str(labels[key]), cv2.IMREAD_UNCHANGED)  # how FiftyOne reads masks
        assert got.ndim == 2
        np.testing.assert_array_equal(got, mask)
    confidence = json.loads((dest / "confidence.json").read_text())
    assert confidence == {data["a.jpg"]: 0.9, data["sub/b.jpg"]: 0.4}


# -- the mask-format trap -----------------------------------------------------------------------------
def test_old_palette_masks_are_exported_as_grayscale_indices(tmp_path):
    masks = street_masks()
    out = make_output(tmp_path, masks, palette_masks=True)
    old = cv2.imread(str(out / "masks" / "a.png"), cv2.IMREAD_UNCHANGED)
    assert old.ndim == 3  # the trap: OpenCV reads a palette PNG as colours, not indices
    export_files(out, "cvat")
    export_files(out, "fiftyone")
    got = cv2.imread(str(out / "export" / "fiftyone" / "labels" / "a.png"), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(got, masks["a"])
    with zipfile.ZipFile(out / "export" / "cvat" / "segmentation_mask_1.1.zip") as z:
        got = png_from_zip(z, "SegmentationClass/a.png", tmp_path)
    np.testing.assert_array_equal(got, np.where(masks["a"] == 255, 3, masks["a"]))


# -- the command on a real annotate run ---------------------------------------------------------------
@pytest.mark.slow
def test_exports_of_a_real_annotate_run(tmp_path, tiny_weights, small_labelset):
    from conftest import write_images

    photos = tmp_path / "photos"
    write_images(photos, ["a.jpg", "x/b.png"], size=(30, 44))
    out = tmp_path / "labels"
    assert annotate([photos], out, small_labelset, tiny_weights).returncode == 0
    for fmt in ("cvat", "labelstudio", "fiftyone"):
        r = export(out, fmt)
        assert r.returncode == 0, (fmt, r.stderr)
        assert r.stdout.strip() == str(out / "export" / fmt)
    data = json.loads((out / "export" / "fiftyone" / "data.json").read_text())
    assert data == {"a.jpg": str((photos / "a.jpg").resolve()), "x/b.png": str((photos / "x/b.png").resolve())}
    tasks = json.loads((out / "export" / "labelstudio" / "tasks.json").read_text())
    assert [t["data"]["seglabel_key"] for t in tasks] == ["a", "x/b"]
    for t, key in zip(tasks, ["a", "x/b"]):
        record = json.loads((out / "records" / f"{key}.json").read_text())
        assert t["predictions"][0]["score"] == record["confidence"]


def test_export_errors_are_one_line(tmp_path):
    out = make_output(tmp_path, street_masks())
    r = export(out, "yolo")
    assert r.returncode == 2 and "unknown export format 'yolo'" in r.stderr
    r = export(tmp_path / "photos", "cvat")
    assert r.returncode == 2 and "run.json" in r.stderr and "Traceback" not in r.stderr
    (out / "records" / "a.json").write_text("{not json")
    r = export(out, "cvat")
    assert r.returncode == 2 and "a.json" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_fiftyone_export_finds_moved_photos_with_images_flag(tmp_path):
    out = make_output(tmp_path, street_masks())
    (tmp_path / "photos").rename(tmp_path / "moved")
    r = export(out, "fiftyone")
    assert r.returncode == 2 and "--images" in r.stderr
    export_files(out, "fiftyone", image_roots=[tmp_path / "moved"])
    data = json.loads((out / "export" / "fiftyone" / "data.json").read_text())
    assert data["sub/b.jpg"] == str(tmp_path / "moved" / "sub" / "b.jpg")


def test_photos_are_found_where_annotate_recorded_them(tmp_path, tiny_weights, small_labelset):
    """run.json's input_roots, written by annotate whatever its flags (here --pamr, which the
    argv parsing of earlier versions took for an option with a value), a folder and a list."""
    from seglabel.exports.run_output import read_output

    photos, more = tmp_path / "photos", tmp_path / "more"
    write_images(photos, ["a.jpg", "sub/b.jpg"], size=(30, 40))
    write_images(more, ["c.jpg"], size=(30, 40))
    out = tmp_path / "labels"
    r = annotate([photos], out, small_labelset, tiny_weights, "tiny-vit", "--pamr", "--from-list", "-",
                 stdin=f"# more photos\n{more / 'c.jpg'}\n")
    assert r.returncode == 0, r.stderr
    images = read_output(out).images
    assert images.find("a.jpg") == photos / "a.jpg" and images.find("sub/b.jpg") == photos / "sub" / "b.jpg"
    assert images.find(str(more / "c.jpg").lstrip("/")) == more / "c.jpg"  # a listed file mirrors its path
    r = run("export", str(out), "--format", "labelstudio")
    assert r.returncode == 0 and "not found" not in r.stderr, r.stderr

    record = json.loads((out / "run.json").read_text())
    del record["input_roots"]  # an output of an earlier version: the photos need --images
    (out / "run.json").write_text(json.dumps(record))
    assert read_output(out).images.find("a.jpg") is None
    assert read_output(out, [photos]).images.find("a.jpg") == photos / "a.jpg"
