"""Evaluation against hand-computed numbers (never recomputed with the code under test)."""
from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from rich.console import Console

from seglabel.evaluate import EvalError, evaluate_folders, load_id_map, render_table
from seglabel.labelset import LabelSet

ABC = LabelSet.from_names(["a", "b", "c"])


def save_palette(path: Path, rows) -> None:
    """8-bit palette PNG, as annotate writes for sets of up to 254 classes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(np.array(rows, dtype=np.uint8), mode="L").convert("P")
    im.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
    im.save(path)


def save_gray(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.array(rows, dtype=np.uint8), mode="L").save(path)


def save_16bit(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.array(rows, dtype=np.uint16)).save(path)


def write_three_class_case(pred: Path, gt: Path) -> None:
    # one.png pairs (gt, pred): (0,0) (0,1) (1,1) (1,1) (2,2) (2,0)
    save_palette(pred / "one.png", [[0, 1, 1], [1, 2, 0]])
    save_gray(gt / "one.png", [[0, 0, 1], [1, 2, 2]])
    # two.png: (0,0) (0,0) (0,2) (2,2) (2,ignore) (ignore,1) -- the last one is not scored
    save_palette(pred / "two.png", [[0, 0, 2], [2, 255, 1]])
    save_palette(gt / "two.png", [[0, 0, 0], [2, 2, 255]])


# -- scoring ----------------------------------------------------------------------------------
def test_confusion_iou_and_accuracies_by_hand(tmp_path):
    write_three_class_case(tmp_path / "pred", tmp_path / "gt")
    r = evaluate_folders(tmp_path / "pred", tmp_path / "gt", ABC)

    assert r.images == 2
    assert r.names == ["a", "b", "c"]
    assert r.confusion.dtype == np.int64
    assert r.confusion.tolist() == [[3, 1, 1],
                                    [0, 2, 0],
                                    [1, 0, 2]]
    # the predicted-ignore pixel on GT 'c' is a miss for 'c', not a prediction of any class
    assert r.ignored.tolist() == [0, 0, 1]
    # IoU = tp / (gt + pred - tp): a 3/(5+4-3), b 2/(2+3-2), c 2/(4+3-2)
    assert r.iou.tolist() == pytest.approx([0.5, 2 / 3, 0.4])
    assert r.miou == pytest.approx(47 / 90)
    assert r.pixel_accuracy == pytest.approx(7 / 11)
    assert r.mean_accuracy == pytest.approx((3 / 5 + 2 / 2 + 2 / 4) / 3)
    assert (r.missing_pred, r.missing_gt, r.skipped, r.warnings) == ([], [], [], [])


def test_absent_classes_are_nan_and_left_out_of_the_mean(tmp_path):
    labels = LabelSet.from_names(["a", "b", "c", "d"])
    save_palette(tmp_path / "pred" / "x.png", [[0, 0], [0, 1]])
    save_palette(tmp_path / "gt" / "x.png", [[0, 0], [0, 0]])
    r = evaluate_folders(tmp_path / "pred", tmp_path / "gt", labels)

    assert r.iou[0] == pytest.approx(0.75)   # 3 / (4 + 3 - 3)
    assert r.iou[1] == 0.0                   # predicted only: present, scores 0
    assert math.isnan(r.iou[2]) and math.isnan(r.iou[3])
    assert r.miou == pytest.approx(0.375)    # (0.75 + 0) / 2, not / 4
    assert r.mean_accuracy == pytest.approx(0.75)  # only 'a' is in the ground truth


def test_gt_ignore_pixels_are_not_scored(tmp_path):
    # every wrong prediction sits on GT 255: a perfect score
    save_palette(tmp_path / "pred" / "x.png", [[0, 1], [2, 2]])
    save_palette(tmp_path / "gt" / "x.png", [[0, 1], [255, 255]])
    r = evaluate_folders(tmp_path / "pred", tmp_path / "gt", ABC)
    assert r.confusion.tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 0]]
    assert r.pixel_accuracy == 1.0
    assert math.isnan(r.iou[2])  # predicted only on ignored GT pixels: absent
    assert r.miou == 1.0


def test_pred_ignore_and_out_of_range_ids_count_as_misses(tmp_path):
    save_palette(tmp_path / "pred" / "x.png", [[255, 7, 7], [0, 1, 2]])
    save_palette(tmp_path / "gt" / "x.png", [[0, 0, 1], [0, 1, 2]])
    r = evaluate_folders(tmp_path / "pred", tmp_path / "gt", ABC)
    assert r.confusion.tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 1]]
    assert r.ignored.tolist() == [2, 1, 0]
    assert r.iou.tolist() == pytest.approx([1 / 3, 1 / 2, 1.0])
    assert r.pixel_accuracy == pytest.approx(3 / 6)
    # reported once for the file, however many pixels
    assert len(r.warnings) == 1
    assert r.warnings[0][0] == "x.png" and "7" in r.warnings[0][1]


def test_16bit_masks_with_a_large_label_set(tmp_path):
    big = LabelSet.from_names([f"c{i}" for i in range(300)])  # 255 is a real class here
    save_16bit(tmp_path / "pred" / "x.png", [[0, 255], [255, 0]])
    save_16bit(tmp_path / "gt" / "x.png", [[0, 299], [255, 65535]])
    r = evaluate_folders(tmp_path / "pred", tmp_path / "gt", big)

    assert r.confusion.shape == (300, 300)
    assert r.confusion[0, 0] == 1 and r.confusion[255, 255] == 1 and r.confusion[299, 255] == 1
    assert r.confusion.sum() == 3  # the 65535 pixel is ignored
    assert r.iou[0] == 1.0
    assert r.iou[255] == pytest.approx(0.5)  # 1 / (1 + 2 - 1)
    assert r.iou[299] == 0.0
    assert np.isnan(r.iou).sum() == 297
    assert r.miou == pytest.approx(0.5)
    assert r.pixel_accuracy == pytest.approx(2 / 3)


def test_16bit_masks_with_a_small_label_set(tmp_path):
    # 255 and 65535 are both ignore here, on either side, and neither is worth a warning
    save_16bit(tmp_path / "pred" / "x.png", [[0, 1, 2, 2, 255, 65535]])
    save_16bit(tmp_path / "gt" / "x.png", [[0, 1, 255, 65535, 2, 2]])
    r = evaluate_folders(tmp_path / "pred", tmp_path / "gt", ABC)
    assert r.confusion.tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 0]]
    assert r.ignored.tolist() == [0, 0, 2]
    assert r.pixel_accuracy == pytest.approx(2 / 4)
    assert r.warnings == []


def test_8bit_255_is_ignore_even_with_a_large_label_set(tmp_path):
    big = LabelSet.from_names([f"c{i}" for i in range(300)])
    save_palette(tmp_path / "pred" / "x.png", [[0, 255, 1]])
    save_palette(tmp_path / "gt" / "x.png", [[0, 1, 255]])
    r = evaluate_folders(tmp_path / "pred", tmp_path / "gt", big)
    assert r.confusion.sum() == 1 and r.ignored[1] == 1
    assert r.pixel_accuracy == pytest.approx(1 / 2)
    assert r.warnings == []


def test_gt_ids_outside_the_label_set_warn(tmp_path):
    save_palette(tmp_path / "pred" / "x.png", [[0, 0]])
    save_gray(tmp_path / "gt" / "x.png", [[0, 33]])
    r = evaluate_folders(tmp_path / "pred", tmp_path / "gt", ABC)
    assert r.confusion.sum() == 1
    assert len(r.warnings) == 1 and "33" in r.warnings[0][1] and "id map" in r.warnings[0][1]


# -- id maps ----------------------------------------------------------------------------------
STREET = LabelSet.from_names(["road", "sidewalk", "car"])


def write_cityscapes_like(tmp_path: Path) -> tuple[Path, Path]:
    # gt ids: 7 road, 8 sidewalk, 26 car, 0 mapped to null, 3 and 255 not in the map
    save_palette(tmp_path / "pred" / "x.png", [[0, 1, 1], [2, 2, 2]])
    save_gray(tmp_path / "gt" / "x.png", [[7, 8, 26], [0, 3, 255]])
    return tmp_path / "pred", tmp_path / "gt"


@pytest.mark.parametrize("name, text", [
    ("ids.yaml", "7: 0\n8: 1\n'26': 2\n0: null\n"),
    ("ids.yml", "7: road\n8: Sidewalk\n26: car\n0: ~\n"),
    ("ids.json", '{"7": 0, "8": 1, "26": 2, "0": null}'),
    ("ids.json", '{"7": "road", "8": "sidewalk", "26": "CAR", "0": null}'),
])
def test_id_map_files(tmp_path, name, text):
    (tmp_path / name).write_text(text)
    assert load_id_map(tmp_path / name, STREET) == {7: 0, 8: 1, 26: 2, 0: 255}

    pred, gt = write_cityscapes_like(tmp_path)
    r = evaluate_folders(pred, gt, STREET, id_map=tmp_path / name)
    # scored pairs: (road, road) (sidewalk, sidewalk) (car, sidewalk)
    assert r.confusion.tolist() == [[1, 0, 0], [0, 1, 0], [0, 1, 0]]
    assert r.iou.tolist() == pytest.approx([1.0, 0.5, 0.0])
    assert r.miou == pytest.approx(0.5)
    assert r.pixel_accuracy == pytest.approx(2 / 3)
    assert r.warnings == []  # unmapped ids are ignored on purpose, not worth a warning


def test_id_map_to_255_means_ignore(tmp_path):
    pred, gt = write_cityscapes_like(tmp_path)
    r = evaluate_folders(pred, gt, STREET, id_map={7: 0, 8: 1, 26: 255})
    assert r.confusion.tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 0]]
    assert math.isnan(r.iou[2])
    assert r.miou == 1.0


@pytest.mark.parametrize("text, problem", [
    ("7: lamp\n", "unknown class 'lamp'"),
    ("7: 3\n", "maps to 3"),
    ("7: -1\n", "maps to -1"),
    ("7: 1.5\n", "maps to 1.5"),
    ("road: 0\n", "not a gt id"),
    ("70000: 0\n", "not a gt id"),
    ("7: 0\n'7': 1\n", "mapped twice"),
    ("- 7\n- 8\n", "non-empty mapping"),
    ("7: [0, 1\n", "invalid YAML"),
])
def test_bad_id_maps(tmp_path, text, problem):
    path = tmp_path / "ids.yaml"
    path.write_text(text)
    with pytest.raises(EvalError, match=problem) as e:
        load_id_map(path, STREET)
    msg = str(e.value)
    assert msg.startswith(str(path)) and "\n" not in msg


def test_id_map_errors_for_json_missing_files_and_names_without_labelset(tmp_path):
    (tmp_path / "bad.json").write_text('{"7": 0,}')
    with pytest.raises(EvalError, match=r"bad\.json:1: invalid JSON"):
        load_id_map(tmp_path / "bad.json")
    with pytest.raises(EvalError, match="no such id map file"):
        load_id_map(tmp_path / "nope.yaml")
    (tmp_path / "names.yaml").write_text("7: road\n")
    with pytest.raises(EvalError, match="needs a label set"):
        load_id_map(tmp_path / "names.yaml")
    assert isinstance(EvalError("x"), ValueError)


# -- matching files ---------------------------------------------------------------------------
def test_missing_files_are_reported_not_fatal(tmp_path):
    save_palette(tmp_path / "pred" / "a.png", [[0]])
    save_palette(tmp_path / "pred" / "b.png", [[1]])
    save_palette(tmp_path / "gt" / "a.png", [[0]])
    save_palette(tmp_path / "gt" / "c.png", [[2]])
    r = evaluate_folders(tmp_path / "pred", tmp_path / "gt", ABC)
    assert r.images == 1
    assert r.missing_gt == ["b.png"]
    assert r.missing_pred == ["c.png"]
    assert r.confusion.sum() == 1  # c.png's pixel is not counted as a miss


def test_size_mismatch_and_rgb_ground_truth_are_skipped(tmp_path):
    save_palette(tmp_path / "pred" / "ok.png", [[0, 1]])
    save_palette(tmp_path / "gt" / "ok.png", [[0, 0]])
    save_palette(tmp_path / "pred" / "small.png", [[0, 0]])
    save_palette(tmp_path / "gt" / "small.png", [[0, 0, 0]])
    save_palette(tmp_path / "pred" / "rgb.png", [[0, 0]])
    Image.new("RGB", (2, 1), (128, 64, 128)).save(tmp_path / "gt" / "rgb.png")
    r = evaluate_folders(tmp_path / "pred", tmp_path / "gt", ABC)

    assert r.images == 1
    assert r.confusion.tolist() == [[1, 1, 0], [0, 0, 0], [0, 0, 0]]
    reasons = dict(r.skipped)
    assert list(reasons) == ["rgb.png", "small.png"]
    assert "RGB" in reasons["rgb.png"]
    assert "2x1" in reasons["small.png"] and "3x1" in reasons["small.png"]


def test_nothing_matching_raises(tmp_path):
    save_palette(tmp_path / "pred" / "a.png", [[0]])
    save_palette(tmp_path / "gt" / "b.png", [[0]])
    with pytest.raises(EvalError, match="^no predicted mask matches a ground-truth mask: "):
        evaluate_folders(tmp_path / "pred", tmp_path / "gt", ABC)


def test_all_matches_skipped_raises(tmp_path):
    save_palette(tmp_path / "pred" / "a.png", [[0]])
    save_palette(tmp_path / "gt" / "a.png", [[0, 0]])
    with pytest.raises(EvalError, match="no image could be scored.*a.png: size mismatch"):
        evaluate_folders(tmp_path / "pred", tmp_path / "gt", ABC)


def test_missing_folder_raises(tmp_path):
    (tmp_path / "gt").mkdir()
    with pytest.raises(EvalError, match="no such folder"):
        evaluate_folders(tmp_path / "pred", tmp_path / "gt", ABC)


def test_nested_folders_match_by_relative_path(tmp_path):
    # same file name in two cities; crossing the pairs would score 0
    save_palette(tmp_path / "pred" / "bonn" / "x.png", [[0, 0]])
    save_palette(tmp_path / "pred" / "ulm" / "deep" / "x.png", [[1, 1]])
    save_gray(tmp_path / "gt" / "bonn" / "x.png", [[0, 0]])
    save_gray(tmp_path / "gt" / "ulm" / "deep" / "x.PNG", [[1, 1]])
    save_palette(tmp_path / "gt" / "ulm" / "x.png", [[2, 2]])  # no prediction for this one
    r = evaluate_folders(tmp_path / "pred", tmp_path / "gt", ABC)
    assert r.images == 2
    assert r.pixel_accuracy == 1.0
    assert r.confusion.tolist() == [[2, 0, 0], [0, 2, 0], [0, 0, 0]]
    assert r.missing_pred == ["ulm/x.png"]


def test_annotate_output_folder_uses_masks_subfolder(tmp_path):
    out = tmp_path / "out"
    save_palette(out / "masks" / "scene" / "a.png", [[0, 1]])
    save_palette(out / "overlays" / "scene" / "a.png", [[2, 2]])  # must not be read
    save_palette(tmp_path / "gt" / "scene" / "a.png", [[0, 1]])
    seen = []
    r = evaluate_folders(out, tmp_path / "gt", ABC, progress=lambda done, total: seen.append((done, total)))
    assert r.images == 1 and r.pixel_accuracy == 1.0
    assert r.missing_gt == []
    assert seen == [(1, 1)]


# -- output -----------------------------------------------------------------------------------
def test_to_dict_is_json_with_nulls(tmp_path):
    labels = LabelSet.from_names(["a", "b", "c", "d"])
    write_three_class_case(tmp_path / "pred", tmp_path / "gt")
    d = evaluate_folders(tmp_path / "pred", tmp_path / "gt", labels).to_dict()
    json.dumps(d, allow_nan=False)  # raises on NaN
    assert d["images"] == 2
    assert d["pixel_accuracy"] == pytest.approx(7 / 11)
    assert d["classes"][3] == {"name": "d", "iou": None, "gt_pixels": 0, "pred_pixels": 0,
                               "ignored_pixels": 0}
    assert d["classes"][2]["gt_pixels"] == 4 and d["classes"][2]["pred_pixels"] == 3
    assert d["classes"][0]["iou"] == pytest.approx(0.5)
    assert "confusion" not in d


def test_render_table(tmp_path):
    labels = LabelSet.from_names(["a", "b", "c", "d"])
    write_three_class_case(tmp_path / "pred", tmp_path / "gt")
    r = evaluate_folders(tmp_path / "pred", tmp_path / "gt", labels)
    console = Console(file=io.StringIO(), width=120, record=True, color_system=None)
    console.print(render_table(r))
    text = console.export_text()
    assert "50.00" in text and "66.67" in text and "40.00" in text
    assert "—" in text  # class d
    assert "mIoU 52.22%" in text
    assert "pixel accuracy 63.64%" in text
