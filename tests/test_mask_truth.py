"""Which file is the truth (issue 22, items 3 and 4): the mask PNG. A hand-edited mask is what
coco.json, merge, preview and every export show; a rerun records it as corrected and never
overwrites it; a photo replaced since it was labelled is relabelled (or, corrected, reported), and
no export ships a mask of another size than its photo."""
from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import write_images
from test_annotate_cli import annotate, run
from test_export import decode_brush_rle

CLASSES = ["sky", "grass", "road"]  # small_labelset


def coco_label_maps(coco: dict) -> dict[str, np.ndarray]:
    """file_name -> label map (255 where no annotation), decoded with pycocotools."""
    from pycocotools import mask as mask_util

    maps = {}
    for image in coco["images"]:
        label = np.full((image["height"], image["width"]), 255, np.uint8)
        for a in coco["annotations"]:
            if a["image_id"] == image["id"]:
                rle = {**a["segmentation"], "counts": a["segmentation"]["counts"].encode()}
                label[mask_util.decode(rle).astype(bool)] = a["category_id"] - 1
        maps[image["file_name"]] = label
    return maps


def masks_on_disk(out: Path) -> dict[str, np.ndarray]:
    return {p.relative_to(out / "masks").with_suffix("").as_posix(): np.asarray(Image.open(p))
            for p in sorted((out / "masks").rglob("*.png"))}


def what_every_reader_shows(out: Path, tmp_path: Path) -> dict[str, dict[str, np.ndarray]]:
    """reader -> key -> label map: coco.json, CVAT's two zips, Label Studio's tasks, FiftyOne's
    labels, and the class areas preview draws from."""
    from seglabel.exports import export
    from seglabel.exports.run_output import read_output

    shown: dict[str, dict[str, np.ndarray]] = {}
    shown["coco.json"] = {k.rsplit(".", 1)[0]: v for k, v in
                          coco_label_maps(json.loads((out / "coco.json").read_text())).items()}
    export(out, "cvat", tmp_path / "cvat")
    with zipfile.ZipFile(tmp_path / "cvat" / "coco_1.0.zip") as z:
        coco = json.loads(z.read("annotations/instances_default.json"))
        shown["cvat coco"] = {k.rsplit(".", 1)[0]: v for k, v in coco_label_maps(coco).items()}
    with zipfile.ZipFile(tmp_path / "cvat" / "segmentation_mask_1.1.zip") as z:
        ignore_id = len(CLASSES)
        shown["cvat masks"] = {}
        for name in z.namelist():
            if name.startswith("SegmentationClass/"):
                m = np.asarray(Image.open(io.BytesIO(z.read(name))))
                shown["cvat masks"][name[len("SegmentationClass/"):-4]] = np.where(m == ignore_id, 255, m)
    export(out, "labelstudio", tmp_path / "ls")
    shown["label studio"] = {}
    for task in json.loads((tmp_path / "ls" / "tasks.json").read_text()):
        [prediction] = task["predictions"]
        label = None
        for result in prediction["result"]:
            h, w = result["original_height"], result["original_width"]
            label = np.full((h, w), 255, np.uint8) if label is None else label
            painted = decode_brush_rle(result["value"]["rle"]).reshape(h, w, 4)[..., 3] > 0
            label[painted] = CLASSES.index(result["value"]["brushlabels"][0])
        shown["label studio"][task["data"]["seglabel_key"]] = label
    export(out, "fiftyone", tmp_path / "fo")
    shown["fiftyone"] = {p.relative_to(tmp_path / "fo" / "labels").with_suffix("").as_posix():
                         np.asarray(Image.open(p)) for p in (tmp_path / "fo" / "labels").rglob("*.png")}
    areas = {e.key: dict(e.areas) for e in read_output(out).entries}  # what preview draws its bars from
    shown["preview areas"] = areas  # compared separately (counts, not maps)
    return shown


def assert_every_reader_agrees_with_the_masks(out: Path, tmp_path: Path) -> None:
    masks = masks_on_disk(out)
    shown = what_every_reader_shows(out, tmp_path)
    areas = shown.pop("preview areas")
    for reader, maps in shown.items():
        assert sorted(maps) == sorted(masks), reader
        for key, mask in masks.items():
            if reader == "label studio" and maps[key] is None:
                continue
            np.testing.assert_array_equal(maps[key], mask, err_msg=f"{reader}: {key}")
    for key, mask in masks.items():
        values, counts = np.unique(mask[mask != 255], return_counts=True)
        assert areas[key] == dict(zip(values.tolist(), counts.tolist())), key


def edit(mask_path: Path) -> np.ndarray:
    """What a person does in an image editor: paint the top in class 2 and erase a corner."""
    mask = np.asarray(Image.open(mask_path)).copy()
    mask[:15] = 2
    mask[30:, :10] = 255
    Image.fromarray(mask).save(mask_path)
    return mask


# -- 3: the mask is the truth ---------------------------------------------------------------------------
@pytest.mark.slow
def test_a_hand_edited_mask_is_what_every_reader_shows_and_a_rerun_keeps_it(tmp_path, tiny_weights, small_labelset):
    photos, out = tmp_path / "photos", tmp_path / "labels"
    write_images(photos, ["a.jpg", "x/b.jpg"])
    assert annotate([photos], out, small_labelset, tiny_weights).returncode == 0
    edited = edit(out / "masks" / "a.png")
    edited_bytes = (out / "masks" / "a.png").read_bytes()

    # The readers of the run (not coco.json, written before the edit) agree with the masks at once.
    from seglabel.exports.run_output import read_output

    [a] = [e for e in read_output(out).entries if e.key == "a"]
    assert a.corrected["by"] == "person" and a.corrected["tool"] == "edited by hand" and a.confidence is None

    # A rerun records the edit, keeps the mask, and writes coco.json from it.
    r = annotate([photos], out, small_labelset, tiny_weights, "tiny-vit", "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert (summary["labelled"], summary["skipped"], summary["kept"]) == (0, 1, 1)
    record = json.loads((out / "records" / "a.json").read_text())
    assert record["corrected"]["by"] == "person" and record["corrected"]["tool"] == "edited by hand"
    assert record["confidence"] is None
    assert_every_reader_agrees_with_the_masks(out, tmp_path)

    # Not even --overwrite (nor a rerun asking for overlays) relabels a corrected image.
    r = annotate([photos], out, small_labelset, tiny_weights, "tiny-vit", "--json", "--overwrite", "--overlay")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert (summary["labelled"], summary["kept"]) == (1, 1)
    assert (out / "masks" / "a.png").read_bytes() == edited_bytes
    np.testing.assert_array_equal(masks_on_disk(out)["a"], edited)
    r = annotate([photos], out, small_labelset, tiny_weights)
    assert r.returncode == 0 and "1 kept as corrected" in r.stderr, r.stderr


def test_readers_agree_with_an_edited_mask_before_any_rerun(tmp_path):
    from seglabel.exports import export
    from seglabel.labelset import parse_labelset
    from seglabel.records import write_coco, write_labelled

    out = tmp_path / "labels"
    ls = parse_labelset({"name": "small", "templates": "none", "classes": CLASSES})
    rng = np.random.default_rng(0)
    for key in ("a", "x/b"):
        photo = tmp_path / "photos" / f"{key}.jpg"
        photo.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(photo)
        write_labelled(out, key, f"{key}.jpg", rng.integers(0, 3, (40, 56)).astype(np.uint8), ls,
                       settings_id="0123456789abcdef", confidence=np.full((40, 56), 0.5, np.float32))
    (out / "run.json").write_text(json.dumps({"seglabel_version": "0", "labelset": ls.to_dict(), "model": "m",
                                              "input_roots": [str(tmp_path / "photos")]}))
    write_coco(out, ls)
    edit(out / "masks" / "x" / "b.png")
    write_coco(out, ls)  # what merge and annotate's end do: from the records as the masks now are
    assert_every_reader_agrees_with_the_masks(out, tmp_path)
    assert export(out, "cvat", tmp_path / "again").left_out == []


def test_a_resaved_mask_with_equal_pixels_is_not_an_edit(tmp_path):
    from seglabel.labelset import parse_labelset
    from seglabel.records import current_record, write_labelled

    ls = parse_labelset({"name": "small", "templates": "none", "classes": CLASSES})
    mask = np.random.default_rng(1).integers(0, 3, (30, 20)).astype(np.uint8)
    stored = write_labelled(tmp_path, "a", "a.jpg", mask, ls, settings_id="0123456789abcdef", confidence=0.7)
    path = tmp_path / "masks" / "a.png"
    assert current_record(tmp_path, "a", ls).record == stored
    Image.fromarray(mask).save(path, optimize=True, compress_level=9)  # other bytes, other mtime, same pixels
    now = current_record(tmp_path, "a", ls)
    assert now.record == stored and not now.edited and now.problem is None
    Image.fromarray(mask.astype(np.uint16) * 1).convert("I;16").save(path)  # even at 16 bits
    assert not current_record(tmp_path, "a", ls).edited
    mask[0, 0] = (mask[0, 0] + 1) % 3
    Image.fromarray(mask).save(path)
    now = current_record(tmp_path, "a", ls)
    assert now.edited and now.record["corrected"]["tool"] == "edited by hand" and now.record["confidence"] is None
    assert now.record["settings_id"] == stored["settings_id"] and now.record["file_name"] == "a.jpg"


def test_the_record_writer_for_imports_marks_corrections(tmp_path):
    """What `seglabel import` calls: a mask array in, the mask file and its record out (record last)."""
    from seglabel.labelset import parse_labelset
    from seglabel.records import current_record, write_labelled

    ls = parse_labelset({"name": "small", "templates": "none", "classes": CLASSES})
    mask = np.zeros((4, 6), np.uint8)
    mask[:, 3:] = 1
    corrected = {"by": "person", "tool": "label-studio", "source": "export.json", "when": "2026-01-02T03:04:05+00:00"}
    record = write_labelled(tmp_path, "sub/a", "sub/a.jpg", mask, ls, settings_id="0123456789abcdef",
                            corrected=corrected)
    assert json.loads((tmp_path / "records" / "sub" / "a.json").read_text()) == record
    assert record["corrected"] == corrected and record["confidence"] is None
    assert [(a["category_id"], a["area"]) for a in record["annotations"]] == [(1, 12), (2, 12)]
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "masks" / "sub" / "a.png")), mask)
    assert current_record(tmp_path, "sub/a", ls).record == record


def test_a_rerun_keeps_an_imported_correction_and_relabels_a_changed_photo(tmp_path):
    """The plan of a rerun, from the records alone: no model needed."""
    from seglabel.annotate import AnnotateConfig, plan
    from seglabel.images import ImageItem, file_fingerprint
    from seglabel.labelset import parse_labelset
    from seglabel.records import write_labelled

    ls = parse_labelset({"name": "small", "templates": "none", "classes": CLASSES})
    photos, out = tmp_path / "photos", tmp_path / "labels"
    [a, b, c] = [ImageItem(p, p.name) for p in write_images(photos, ["a.jpg", "b.jpg", "c.jpg"])]
    mask = np.zeros((40, 56), np.uint8)
    imported = {"by": "person", "tool": "cvat", "source": "task.zip", "when": "2026-01-02T03:04:05+00:00"}
    write_labelled(out, "a", "a.jpg", mask, ls, settings_id="0123456789abcdef", corrected=imported)  # no photo
    for item in (b, c):
        photo = {"width": 56, "height": 40, **file_fingerprint(item.path)}
        write_labelled(out, item.key, item.rel, mask, ls, settings_id="0123456789abcdef", confidence=0.5, photo=photo)
    replace_photo(c.path, size=(40, 56))
    planned = plan([a, b, c], AnnotateConfig(out=out, overwrite=False), ls)
    assert (planned.kept, planned.done, planned.todo, planned.failures) == ([a], [b], [c], [])
    planned = plan([a, b, c], AnnotateConfig(out=out, overwrite=True), ls)
    assert (planned.kept, planned.todo) == ([a], [b, c])


@pytest.mark.slow
def test_merge_writes_coco_json_from_the_masks_as_they_are(tmp_path, tiny_weights, small_labelset):
    photos, out = tmp_path / "photos", tmp_path / "labels"
    write_images(photos, ["a.jpg", "b.jpg", "c.jpg"])
    for shard in ("0/2", "1/2"):
        assert annotate([photos], out, small_labelset, tiny_weights, "tiny-vit", "--shard", shard).returncode == 0
    edit(out / "masks" / "b.png")
    r = run("merge", str(out))
    assert r.returncode == 0, r.stderr
    maps = coco_label_maps(json.loads((out / "coco.json").read_text()))
    for key, mask in masks_on_disk(out).items():
        np.testing.assert_array_equal(maps[f"{key}.jpg"], mask)


@pytest.mark.slow
def test_an_edited_mask_with_a_class_the_label_set_lacks_is_reported_and_left_out(tmp_path, tiny_weights,
                                                                                  small_labelset):
    photos, out = tmp_path / "photos", tmp_path / "labels"
    write_images(photos, ["a.jpg", "b.jpg"])
    assert annotate([photos], out, small_labelset, tiny_weights).returncode == 0
    mask = np.asarray(Image.open(out / "masks" / "a.png")).copy()
    mask[:5] = 9
    Image.fromarray(mask).save(out / "masks" / "a.png")
    before = (out / "masks" / "a.png").read_bytes()
    r = annotate([photos], out, small_labelset, tiny_weights, "tiny-vit", "--json")
    assert r.returncode == 3, r.stderr
    [failure] = json.loads(r.stdout)["failures"]
    assert failure["path"] == str(out / "masks" / "a.png") and "9" in failure["reason"]
    assert (out / "masks" / "a.png").read_bytes() == before
    assert [i["file_name"] for i in json.loads((out / "coco.json").read_text())["images"]] == ["b.jpg"]
    r = run("export", str(out), "--format", "fiftyone")
    assert r.returncode == 3
    assert [line for line in r.stderr.splitlines() if "masks/a.png" in line and "left out" in line], r.stderr
    assert not (out / "export" / "fiftyone" / "labels" / "a.png").exists()
    assert (out / "export" / "fiftyone" / "labels" / "b.png").is_file()


# -- 4: a photo replaced since it was labelled -----------------------------------------------------------
def replace_photo(path: Path, size=(30, 70), seed=9) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)


@pytest.mark.slow
def test_records_know_the_photo_and_a_replaced_photo_is_relabelled(tmp_path, tiny_weights, small_labelset):
    photos, out = tmp_path / "photos", tmp_path / "labels"
    write_images(photos, ["a.jpg", "b.jpg", "c.jpg"])
    assert annotate([photos], out, small_labelset, tiny_weights).returncode == 0
    record = json.loads((out / "records" / "a.json").read_text())
    st = (photos / "a.jpg").stat()
    assert record["photo"] == {"width": 56, "height": 40, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns,
                               "sha256": hashlib.sha256((photos / "a.jpg").read_bytes()).hexdigest()}

    replace_photo(photos / "a.jpg")  # same path, another size
    replace_photo(photos / "b.jpg", size=(40, 56))  # same path and size, other content
    os.utime(photos / "c.jpg", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched only

    # Before any rerun, no export ships the stale mask of the old size.
    r = run("export", str(out), "--format", "fiftyone")
    assert r.returncode == 3, r.stderr
    left = [line for line in r.stderr.splitlines() if "left out" in line]
    assert len(left) == 2 and any("a.jpg" in line and "70x30" in line for line in left), r.stderr
    assert sorted(p.name for p in (out / "export" / "fiftyone" / "labels").iterdir()) == ["c.png"]

    r = annotate([photos], out, small_labelset, tiny_weights, "tiny-vit", "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert (summary["labelled"], summary["skipped"]) == (2, 1)
    assert Image.open(out / "masks" / "a.png").size == (70, 30)
    assert json.loads((out / "records" / "c.json").read_text())["photo"]["mtime_ns"] == st.st_mtime_ns + 10**9
    assert run("export", str(out), "--format", "fiftyone").returncode == 0


@pytest.mark.slow
def test_a_corrected_mask_whose_photo_changed_is_kept_and_reported(tmp_path, tiny_weights, small_labelset):
    photos, out = tmp_path / "photos", tmp_path / "labels"
    write_images(photos, ["a.jpg", "b.jpg"])
    assert annotate([photos], out, small_labelset, tiny_weights).returncode == 0
    edit(out / "masks" / "a.png")
    edited = (out / "masks" / "a.png").read_bytes()
    replace_photo(photos / "a.jpg")
    for extra in ([], ["--overwrite"]):
        r = annotate([photos], out, small_labelset, tiny_weights, "tiny-vit", "-q", *extra)
        assert r.returncode == 3
        [line] = r.stderr.strip().splitlines()
        assert str(photos / "a.jpg") in line and "corrected" in line and "kept" in line
        assert (out / "masks" / "a.png").read_bytes() == edited
        # coco.json does not list a mask that no longer fits its photo
        assert [i["file_name"] for i in json.loads((out / "coco.json").read_text())["images"]] == ["b.jpg"]
