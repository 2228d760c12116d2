"""eval scores a run under the names it was labelled with (issue 22, item 5): the label set comes
from --pred's run.json; another -l is refused in one line, or mapped by name when asked."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from seglabel.evaluate import EvalError, evaluate_folders
from seglabel.labelset import parse_labelset
from seglabel.records import write_labelled
from test_annotate_cli import run
from test_integrity import one_error_line

RUN_SET = {"name": "street", "templates": "none", "classes": ["road", "sky", "tree"]}


def make_run(folder: Path, masks: dict[str, np.ndarray]) -> Path:
    ls = parse_labelset(RUN_SET)
    for key, mask in masks.items():
        write_labelled(folder, key, f"{key}.jpg", mask, ls, settings_id="0123456789abcdef")
    (folder / "run.json").write_text(json.dumps({"seglabel_version": "0", "labelset": ls.to_dict(),
                                                 "status": "done"}))
    return folder


def case(tmp_path: Path) -> tuple[Path, Path]:
    pred = np.array([[0, 0, 1, 1], [2, 2, 2, 0]], np.uint8)  # road road sky sky / tree tree tree road
    gt = np.array([[0, 0, 1, 2], [2, 2, 1, 0]], np.uint8)
    run_dir = make_run(tmp_path / "labels", {"a": pred})
    (tmp_path / "gt").mkdir()
    Image.fromarray(gt).save(tmp_path / "gt" / "a.png")
    return run_dir, tmp_path / "gt"


def ious(result) -> dict[str, float]:
    return {n: round(float(v), 6) for n, v in zip(result.names, result.iou)}


def test_the_label_set_comes_from_the_run(tmp_path):
    pred, gt = case(tmp_path)
    r = run("eval", "--pred", str(pred), "--gt", str(gt), "--json")
    assert r.returncode == 0, r.stderr
    got = {c["name"]: c["iou"] for c in json.loads(r.stdout)["classes"]}
    # road: tp 3, gt 3, pred 3 -> 1; sky: tp 1, gt 2, pred 2 -> 1/3; tree: tp 2, gt 3, pred 3 -> 2/4
    assert got == {"road": 1.0, "sky": pytest.approx(1 / 3), "tree": 0.5}


def test_another_label_set_is_refused_in_one_line(tmp_path):
    pred, gt = case(tmp_path)
    other = tmp_path / "other.yaml"
    other.write_text("name: other\ntemplates: none\nclasses: [sky, road, tree]\n")  # the same names, reordered
    r = run("eval", "--pred", str(pred), "--gt", str(gt), "-l", str(other))
    assert r.returncode == 2
    line = one_error_line(r)
    assert str(other) in line and "road, sky, tree" in line and "--map-by-name" in line
    with pytest.raises(EvalError, match="--map-by-name"):
        evaluate_folders(pred, gt, parse_labelset({"templates": "none", "classes": ["sky", "road", "tree"]}))
    same = tmp_path / "same.yaml"  # the same classes with other prompts and colours: fine
    same.write_text("templates: none\nclasses: [{name: road, prompts: [street]}, sky, {name: tree, color: '#00ff00'}]\n")
    assert run("eval", "--pred", str(pred), "--gt", str(gt), "-l", str(same)).returncode == 0


def test_map_by_name_scores_each_class_under_its_own_name(tmp_path):
    pred, gt = case(tmp_path)
    # The ground truth is written in the other set's ids: sky 0, road 1, tree 2, bush 3.
    other = parse_labelset({"templates": "none", "classes": ["sky", "road", "tree", "bush"]})
    to_other = np.array([1, 0, 2], np.uint8)
    g = np.asarray(Image.open(gt / "a.png"))
    Image.fromarray(to_other[g]).save(gt / "a.png")
    result = evaluate_folders(pred, gt, other, map_by_name=True)
    got = ious(result)
    assert np.isnan(got.pop("bush"))  # in neither
    assert got == {"sky": round(1 / 3, 6), "road": 1.0, "tree": 0.5}


def test_map_by_name_counts_classes_the_other_set_lacks_as_ignored(tmp_path):
    pred, gt = case(tmp_path)
    other = parse_labelset({"templates": "none", "classes": ["road", "tree"]})
    g = np.asarray(Image.open(gt / "a.png")).copy()
    g = np.where(g == 1, 255, np.where(g == 2, 1, g)).astype(np.uint8)  # sky not in it: ignored
    Image.fromarray(g).save(gt / "a.png")
    result = evaluate_folders(pred, gt, other, map_by_name=True)
    assert result.names == ["road", "tree"]
    # pred sky pixels (2) become ignore: on gt tree one is a miss, on gt ignore one is not scored
    assert result.confusion.tolist() == [[3, 0], [0, 2]] and result.ignored.tolist() == [0, 1]


def test_a_folder_of_masks_still_needs_labels(tmp_path):
    (tmp_path / "p").mkdir()
    Image.fromarray(np.zeros((2, 2), np.uint8)).save(tmp_path / "p" / "a.png")
    r = run("eval", "--pred", str(tmp_path / "p"), "--gt", str(tmp_path / "p"))
    assert r.returncode == 2 and "--labels" in one_error_line(r)
