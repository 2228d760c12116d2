"""`seglabel import` (issue 21, item 2): corrections come back from each tool's export format into
the run they were exported from (or a new run), as masks with records saying a person made them;
what the annotators skipped stays as it was; labels the run lacks refuse the whole import before
anything is written; images not in the run or of another size are one line each. The exports
written here are the formats as the tools write them; tests/test_import_real_tools.py makes them
with the real tools."""
from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from importing import STREET, SETTINGS_ID, corrected, make_run, read_mask, snapshot, street_masks
from seglabel.corrections import import_corrections
from seglabel.corrections.writer import ImportRefused
from seglabel.errors import UsageError
from seglabel.exports import export
from seglabel.exports.brush_rle import BrushError, decode_mask, encode_mask
from seglabel.writers import encode_mask_png
from test_annotate_cli import run

NAMES = [c["name"] for c in STREET["classes"]]


def brush_result(mask: np.ndarray, k: int, name: str | None = None) -> dict:
    h, w = mask.shape
    return {"id": f"r{k}", "type": "brushlabels", "from_name": "label", "to_name": "image", "original_width": w,
            "original_height": h, "image_rotation": 0,
            "value": {"format": "rle", "rle": encode_mask(mask == k), "brushlabels": [name or NAMES[k]]}}


def labelstudio_export(out: Path, annotated: dict[str, np.ndarray], dest: Path, **extra) -> Path:
    """Label Studio's JSON export of a project made from seglabel's export: every task with its
    prediction, and an annotation (one brush per class) for the images in ``annotated``."""
    tasks = json.loads((export(out, "labelstudio").dest / "tasks.json").read_text())
    for n, task in enumerate(tasks):
        task["id"] = n + 1
        key = task["data"]["seglabel_key"]
        if key in annotated:
            mask = annotated[key]
            result = [brush_result(mask, k) for k in sorted(set(np.unique(mask).tolist()) - {255})]
            task["annotations"] = [{"id": 10 + n, "result": result, "was_cancelled": False,
                                    "updated_at": "2026-05-01T10:00:00.000000Z", **extra.get(key, {})}]
        else:
            task["annotations"] = []
    dest.write_text(json.dumps(tasks))
    return dest


def task_of(tasks: list[dict], key: str) -> dict:
    return next(t for t in tasks if t["data"].get("seglabel_key") == key)


# -- Label Studio -------------------------------------------------------------------------------------
def test_labelstudio_corrections_come_back_and_skipped_images_stay(tmp_path):
    masks = street_masks()
    out = make_run(tmp_path, masks)
    changed, accepted = corrected(masks["a"]), masks["c"]
    source = labelstudio_export(out, {"a": changed, "c": accepted}, tmp_path / "ls.json")
    untouched = {k: v for k, v in snapshot(out).items() if "sub/b" in k}

    result = import_corrections(source, out)
    assert sorted(result.imported) == ["a", "c"] and result.changed == 1 and not result.problems
    assert result.skipped == [("photos/sub/b.jpg", "no annotation (only predictions)")]
    np.testing.assert_array_equal(read_mask(out / "masks/a.png"), changed)
    np.testing.assert_array_equal(read_mask(out / "masks/c.png"), accepted)
    record = json.loads((out / "records/a.json").read_text())
    assert record["corrected"] == {"by": "person", "tool": "label-studio", "source": str(source.resolve()),
                                   "when": "2026-05-01T10:00:00.000000Z",
                                   "changed_pixels": int((changed != masks["a"]).sum())}
    assert record["settings_id"] == SETTINGS_ID and record["confidence"] is None  # the run's settings stay
    assert json.loads((out / "records/c.json").read_text())["corrected"]["changed_pixels"] == 0  # accepted as is
    assert {k: v for k, v in snapshot(out).items() if "sub/b" in k} == untouched  # byte for byte
    coco = json.loads((out / "coco.json").read_text())  # rewritten from the records
    assert [i["confidence"] for i in coco["images"]] == [None, None, 0.6]

    # a rerun of the same import writes nothing
    before = snapshot(out)
    again = import_corrections(source, out)
    assert again.imported == [] and sorted(again.unchanged) == ["a", "c"]
    assert snapshot(out) == {k: v for k, v in before.items()}


def test_labelstudio_which_annotation_and_what_is_skipped(tmp_path):
    masks = street_masks()
    out = make_run(tmp_path, masks)
    tasks = json.loads(labelstudio_export(out, {}, tmp_path / "ls.json").read_text())
    a, b, c = (task_of(tasks, k) for k in ("a", "sub/b", "c"))
    first, later = corrected(masks["a"]), np.zeros_like(masks["a"])
    later[:, :4] = 2
    a["annotations"] = [  # the latest annotation that was not cancelled wins
        {"id": 1, "result": [brush_result(first, k) for k in (0, 1, 2)], "updated_at": "2026-05-01T10:00:00Z"},
        {"id": 2, "result": [brush_result(later, k) for k in (0, 2)], "updated_at": "2026-05-02T10:00:00Z"},
        {"id": 3, "result": [], "was_cancelled": True, "updated_at": "2026-05-03T10:00:00Z"}]
    b["annotations"] = [{"id": 4, "result": [brush_result(masks["sub/b"], 2)],
                         "updated_at": "2026-05-01T10:00:00Z"} | {"was_cancelled": True}]
    c["annotations"] = [{"id": 5, "result": [brush_result(masks["c"], 1),
                                             {"type": "choices", "from_name": "review", "to_name": "image",
                                              "value": {"choices": ["discard"]}}]}]
    (tmp_path / "ls.json").write_text(json.dumps(tasks))
    result = import_corrections(tmp_path / "ls.json", out)
    assert result.imported == ["a"]
    np.testing.assert_array_equal(read_mask(out / "masks/a.png"), later)
    assert sorted(why for _, why in result.skipped) == [
        "its annotations were cancelled (skipped by the annotator)", "marked 'discard' in the review"]


def test_labelstudio_overlapping_regions_polygons_and_literal_rle(tmp_path):
    """Later regions paint over earlier ones; a polygon is rasterised as COCO does; a brush of
    literal chunks and colour bytes (as Label Studio's own encoder writes) reads by its alpha."""
    from pycocotools import mask as mask_util

    masks = street_masks()
    out = make_run(tmp_path, masks)
    tasks = json.loads(labelstudio_export(out, {}, tmp_path / "ls.json").read_text())
    h, w = masks["a"].shape
    everything = np.ones((h, w), bool)
    rgba = np.zeros((h, w, 4), np.uint8)
    rgba[4:9, 2:12] = (220, 20, 60, 255)  # a person painted in its colour
    literal = [{"type": "brushlabels", "original_width": w, "original_height": h,
                "value": {"format": "rle", "rle": literal_chunks(rgba.reshape(-1)),
                          "brushlabels": ["person"]}}]
    points = [[12.5, 25.0], [75.0, 25.0], [75.0, 75.0], [12.5, 75.0]]  # percent of the image
    polygon = {"type": "polygonlabels", "original_width": w, "original_height": h,
               "value": {"points": points, "polygonlabels": ["background"], "closed": True}}
    road = {**brush_result(everything.astype(np.uint8), 1, "road")}
    task_of(tasks, "a")["annotations"] = [{"id": 1, "result": [road, polygon] + literal}]
    (tmp_path / "ls.json").write_text(json.dumps(tasks))
    import_corrections(tmp_path / "ls.json", out)
    expected = np.ones((h, w), np.uint8)
    flat = [c for x, y in points for c in (x * w / 100, y * h / 100)]
    expected[mask_util.decode(mask_util.frPyObjects([flat], h, w))[..., 0].astype(bool)] = 0
    expected[4:9, 2:12] = 2
    np.testing.assert_array_equal(read_mask(out / "masks/a.png"), expected)


def literal_chunks(values: np.ndarray) -> list[int]:
    """rle-pack with literal chunks only (of up to 8 values, field size 3), by the format's definition."""
    bits = f"{values.size:032b}{7:05b}" + "".join(f"{s - 1:04b}" for s in (3, 4, 8, 16))
    for start in range(0, values.size, 8):
        words = values[start:start + 8]
        bits += f"000{len(words) - 1:03b}" + "".join(f"{int(v):08b}" for v in words)
    bits += "0" * (-len(bits) % 8)
    return list(int(bits, 2).to_bytes(len(bits) // 8, "big"))


def test_brush_rle_decodes_repeat_and_literal_chunks():
    rng = np.random.default_rng(5)
    for shape in ((1, 1), (3, 70), (37, 53)):
        m = rng.random(shape) < 0.4
        np.testing.assert_array_equal(decode_mask(encode_mask(m), shape[1], shape[0]), m)
    rgba = rng.integers(0, 256, (5, 7, 4)).astype(np.uint8)
    rgba[rng.random((5, 7)) < 0.5, 3] = 0
    np.testing.assert_array_equal(decode_mask(literal_chunks(rgba.reshape(-1)), 7, 5), rgba[..., 3] > 0)
    with pytest.raises(BrushError, match="not 8x5x4"):
        decode_mask(literal_chunks(rgba.reshape(-1)), 8, 5)
    with pytest.raises(BrushError, match="ends early"):
        decode_mask(literal_chunks(rgba.reshape(-1))[:20], 7, 5)


# -- refusals and per-image problems --------------------------------------------------------------------
def test_labels_the_run_lacks_refuse_the_whole_import(tmp_path):
    masks = street_masks()
    out = make_run(tmp_path, masks)
    tasks = json.loads(labelstudio_export(out, {"a": corrected(masks["a"]), "c": masks["c"]},
                                          tmp_path / "ls.json").read_text())
    task_of(tasks, "c")["annotations"][0]["result"].append(brush_result(masks["c"], 2, "unicorn"))
    (tmp_path / "ls.json").write_text(json.dumps(tasks))
    before = snapshot(tmp_path)
    r = run("import", str(tmp_path / "ls.json"), "--into", str(out))
    assert r.returncode == 2, r.stderr
    [line] = r.stderr.strip().splitlines()
    assert "'unicorn' (photos/c.jpg)" in line and "nothing was imported" in line
    assert snapshot(tmp_path) == before  # not a byte written, a being the first image


def test_images_not_in_the_run_and_other_sizes_are_one_line_each(tmp_path):
    masks = street_masks()
    out = make_run(tmp_path, masks)
    tasks = json.loads(labelstudio_export(out, {"a": corrected(masks["a"])}, tmp_path / "ls.json").read_text())
    bigger = np.zeros((20, 20), np.uint8)
    task_of(tasks, "sub/b")["annotations"] = [{"id": 7, "result": [brush_result(bigger, 0)]}]
    stranger = json.loads(json.dumps(task_of(tasks, "a")))
    stranger["data"] = {"image": "/data/local-files/?d=elsewhere/zebra.jpg"}
    tasks.append(stranger)
    (tmp_path / "ls.json").write_text(json.dumps(tasks))
    r = run("import", str(tmp_path / "ls.json"), "--into", str(out))
    assert r.returncode == 3, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("not imported")]
    assert len(lines) == 2
    assert "photos/sub/b.jpg: the corrected mask is 20x20, but its photo is 14x10" in lines[0]
    assert "elsewhere/zebra.jpg: not an image of the run" in lines[1]
    assert "1 imported (1 changed)" in r.stderr
    np.testing.assert_array_equal(read_mask(out / "masks/a.png"), corrected(masks["a"]))
    np.testing.assert_array_equal(read_mask(out / "masks/sub/b.png"), masks["sub/b"])


@pytest.mark.parametrize("args, message", [
    (["--into", "{tmp}/nowhere"], "not a seglabel run (no run.json); to import into a new run there, give --labels"),
    (["--into", "{tmp}/labels", "--format", "cvat"], "not a Segmentation mask 1.1 export (a zip or its folder)"),
    (["--into", "{tmp}/labels", "--format", "dicom"], "--format dicom: unknown"),
    (["--into", "{tmp}/labels", "--field", "x"], "--field is for FiftyOne datasets only"),
])
def test_refusals_are_one_line_exit_2_and_write_nothing(tmp_path, args, message):
    out = make_run(tmp_path, street_masks())
    labelstudio_export(out, {"a": corrected(street_masks()["a"])}, tmp_path / "ls.json")
    before = snapshot(tmp_path)
    r = run("import", str(tmp_path / "ls.json"), *[a.format(tmp=tmp_path) for a in args])
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert snapshot(tmp_path) == before and not (tmp_path / "nowhere").exists()


@pytest.mark.slow
def test_dry_run_lists_and_writes_nothing(tmp_path):
    masks = street_masks()
    out = make_run(tmp_path, masks)
    source = labelstudio_export(out, {"a": corrected(masks["a"])}, tmp_path / "ls.json")
    before = snapshot(tmp_path)
    r = run("import", str(source), "--into", str(out), "--dry-run", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["imported"] == ["a"] and json.loads(r.stdout)["dry_run"]
    assert len(json.loads(r.stdout)["skipped"]) == 2
    r = run("import", str(source), "--into", str(out), "--dry-run")
    assert r.returncode == 0 and r.stderr.splitlines() == [  # the skipped: one line per reason
        "left as it was: 2 images, e.g. photos/c.jpg: no annotation (only predictions)",
        "1 would be imported, 2 skipped by the annotators (left as they were), 0 not imported -> " + str(out)]
    assert snapshot(tmp_path) == before


# -- a new run --------------------------------------------------------------------------------------
def test_into_a_new_run_with_labels(tmp_path):
    masks = street_masks()
    out = make_run(tmp_path, masks)
    source = labelstudio_export(out, {"a": corrected(masks["a"]), "sub/b": masks["sub/b"]}, tmp_path / "ls.json")
    labels = tmp_path / "street.yaml"
    labels.write_text(json.dumps(STREET))
    with pytest.raises(UsageError, match="give --labels"):
        import_corrections(source, tmp_path / "fresh")
    new = tmp_path / "fresh"
    result = import_corrections(source, new, labels=labels, images=[tmp_path / "photos"])
    assert sorted(result.imported) == ["a", "sub/b"] and result.new_run
    run_record = json.loads((new / "run.json").read_text())
    assert run_record["status"] == "done" and run_record["labelset"]["name"] == "street"
    assert run_record["input_roots"] == [str(tmp_path / "photos")]
    record = json.loads((new / "records/sub/b.json").read_text())
    assert record["file_name"] == "sub/b.jpg" and "settings_id" not in record
    assert record["photo"]["sha256"] == json.loads((out / "records/sub/b.json").read_text())["photo"]["sha256"]
    np.testing.assert_array_equal(read_mask(new / "masks/a.png"), corrected(masks["a"]))
    # the new run is a run: eval and export read it
    r = run("export", str(new), "--format", "cvat")
    assert r.returncode == 0, r.stderr


def test_a_new_run_never_writes_outside_itself(tmp_path):
    masks = street_masks()
    coco = {"categories": [{"id": 1, "name": "road"}],
            "images": [{"id": 1, "file_name": "../../escape.jpg", "width": 16, "height": 12}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0,
                             "segmentation": [[0, 0, 8, 0, 8, 8, 0, 8]]}]}
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    labels = tmp_path / "street.yaml"
    labels.write_text(json.dumps(STREET))
    result = import_corrections(tmp_path / "coco.json", tmp_path / "new" / "run", labels=labels)
    assert result.imported == [] and "not a relative file name inside the run" in result.problems[0][1]
    assert not (tmp_path / "escape.png").exists() and not list(tmp_path.glob("new/**/*.png"))
    del masks


# -- CVAT, FiftyOne, COCO ---------------------------------------------------------------------------
def test_cvat_mask_zip_grayscale_and_colour(tmp_path):
    masks = street_masks()
    out = make_run(tmp_path, masks)
    zip_path = export(out, "cvat").dest / "segmentation_mask_1.1.zip"
    with zipfile.ZipFile(zip_path) as z:
        members = {n: z.read(n) for n in z.namelist()}
    labelmap = members["labelmap.txt"].decode()
    colours = {i: tuple(map(int, line.split(":")[1].split(","))) for i, line in
               enumerate(l for l in labelmap.splitlines() if l and not l.startswith("#"))}
    a = corrected(masks["a"])
    a[0, 0] = 255  # ignored again, as CVAT's "ignore" label (our export's last one)
    c = corrected(masks["c"])
    ids = np.where(a == 255, 3, a).astype(np.uint8)
    members["SegmentationClass/a.png"] = encode_mask_png(ids)  # single channel: label ids
    rgb = np.zeros((*c.shape, 3), np.uint8)
    for k, colour in colours.items():
        rgb[c == k] = colour
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")  # colour: as CVAT and Datumaro write them
    members["SegmentationClass/c.png"] = buf.getvalue()
    del members["SegmentationClass/sub/b.png"]  # not annotated
    edited = tmp_path / "cvat.zip"
    with zipfile.ZipFile(edited, "w") as z:
        for n, data in members.items():
            z.writestr(n, data)
    result = import_corrections(edited, out)
    assert sorted(result.imported) == ["a", "c"] and result.skipped == [("sub/b", "no mask in the export (not annotated)")]
    np.testing.assert_array_equal(read_mask(out / "masks/a.png"), a)
    np.testing.assert_array_equal(read_mask(out / "masks/c.png"), c)

    # a colour no label has: the whole import refused
    rgb[0, 0] = (1, 2, 3)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    members["SegmentationClass/c.png"] = buf.getvalue()
    with zipfile.ZipFile(edited, "w") as z:
        for n, data in members.items():
            z.writestr(n, data)
    with pytest.raises(ImportRefused, match=r"colour \(1, 2, 3\) \(no label of labelmap.txt\) \(c\)"):
        import_corrections(edited, out)


def test_fiftyone_export_folder(tmp_path):
    masks = street_masks()
    out = make_run(tmp_path, masks)
    folder = export(out, "fiftyone").dest  # the ImageSegmentationDirectory layout FiftyOne writes too
    b = corrected(masks["sub/b"])
    (folder / "labels/sub/b.png").write_bytes(encode_mask_png(b))
    (folder / "labels/c.png").unlink()
    untouched = snapshot(out / "records")
    result = import_corrections(folder, out)
    assert result.imported == ["sub/b"] and result.changed == 1
    np.testing.assert_array_equal(read_mask(out / "masks/sub/b.png"), b)
    # c has no mask; a came back as it went: FiftyOne does not say whether anyone looked at it
    assert {r: w.split(" (")[0] for r, w in result.skipped} == {
        "a": "the run's own labels, unchanged in the tool", str(tmp_path / "photos/c.jpg"): "no mask in the export"}
    assert snapshot(out / "records")["a.json"] == untouched["a.json"]
    reviewed = import_corrections(folder, out, all_reviewed=True)  # the user says every image was reviewed
    assert reviewed.imported == ["a"] and reviewed.unchanged == ["sub/b"]
    assert json.loads((out / "records/a.json").read_text())["corrected"]["changed_pixels"] == 0
    (folder / "labels/a.png").write_bytes(encode_mask_png(np.full((12, 16), 7, np.uint8)))
    with pytest.raises(ImportRefused, match=r"pixel value 7 \(a\)"):
        import_corrections(folder, out)


def test_coco_rle_and_polygons(tmp_path):
    from pycocotools import mask as mask_util

    masks = street_masks()
    out = make_run(tmp_path, masks)
    a = corrected(masks["a"])
    cats = [{"id": 7, "name": "Road"}, {"id": 9, "name": "person"}, {"id": 3, "name": "background"}]
    rle = mask_util.encode(np.asfortranarray((a == 1).astype(np.uint8)))
    annotations = [{"id": 1, "image_id": 1, "category_id": 3, "iscrowd": 0,  # compressed RLE
                    "segmentation": {"size": rle["size"], "counts": mask_util.encode(
                        np.asfortranarray((a == 0).astype(np.uint8)))["counts"].decode()}},
                   {"id": 2, "image_id": 1, "category_id": 7, "iscrowd": 0,
                    "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()}},
                   {"id": 3, "image_id": 1, "category_id": 9, "iscrowd": 0,  # a polygon over them
                    "segmentation": [[1, 2, 4, 2, 4, 5, 1, 5]]}]
    images = [{"id": 1, "file_name": "a.jpg", "width": 16, "height": 12},
              {"id": 2, "file_name": "c.jpg", "width": 11, "height": 9}]
    (tmp_path / "coco.json").write_text(json.dumps({"images": images, "annotations": annotations, "categories": cats}))
    result = import_corrections(tmp_path / "coco.json", out)
    assert result.imported == ["a"] and result.skipped == [("c.jpg", "no annotation")]
    expected = np.where(a == 0, 0, np.where(a == 1, 1, 255)).astype(np.uint8)
    expected[mask_util.decode(mask_util.frPyObjects([[1, 2, 4, 2, 4, 5, 1, 5]], 12, 16))[..., 0] > 0] = 2
    np.testing.assert_array_equal(read_mask(out / "masks/a.png"), expected)


def test_format_is_told_from_the_source(tmp_path):
    from seglabel.corrections import detect_format

    out = make_run(tmp_path, street_masks())
    assert detect_format(labelstudio_export(out, {}, tmp_path / "ls.json")) == "labelstudio"
    dest = export(out, "cvat").dest
    assert detect_format(dest / "segmentation_mask_1.1.zip") == "cvat"
    assert detect_format(dest / "coco_1.0.zip") == "coco"
    assert detect_format(out / "coco.json") == "coco"
    assert detect_format(export(out, "fiftyone").dest) == "fiftyone"
    assert detect_format("my-dataset") == "fiftyone"


def test_an_interrupted_import_leaves_whole_images_and_a_rerun_finishes(tmp_path):
    masks = street_masks()
    out = make_run(tmp_path, masks)
    fixed = {k: corrected(m) for k, m in masks.items()}
    source = labelstudio_export(out, fixed, tmp_path / "ls.json")
    labels = tmp_path / "street.yaml"
    labels.write_text(json.dumps(STREET))
    new = tmp_path / "new"

    def stop(ref):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        import_corrections(source, new, labels=labels, on_image=stop)
    assert json.loads((new / "run.json").read_text())["status"] == "interrupted"
    written = sorted(p.relative_to(new / "records").with_suffix("").as_posix() for p in (new / "records").rglob("*.json"))
    assert written == ["a"] and not list((new / "records").rglob("*.tmp")) and not list((new / "masks").rglob("*.tmp"))
    np.testing.assert_array_equal(read_mask(new / "masks/a.png"), fixed["a"])
    result = import_corrections(source, new, labels=labels)
    assert sorted(result.imported) == ["c", "sub/b"] and result.unchanged == ["a"]
    assert json.loads((new / "run.json").read_text())["status"] == "done"


def test_an_import_waits_for_no_one_while_annotate_writes(tmp_path):
    from seglabel.runs import RunError, run_lock

    masks = street_masks()
    out = make_run(tmp_path, masks)
    source = labelstudio_export(out, {"a": corrected(masks["a"])}, tmp_path / "ls.json")
    before = snapshot(out)
    with run_lock(out, None), pytest.raises(RunError, match="another seglabel run is writing here"):
        import_corrections(source, out)
    assert snapshot(out) == before
