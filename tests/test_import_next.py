"""What happens to corrections after `seglabel import` (issue 21, item 2): annotate reruns never
overwrite them, `eval --gt RUN` scores against them, `preview` marks them and shows them apart."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from conftest import write_images
from importing import STREET, corrected, make_run, read_mask, street_masks
from seglabel.corrections import import_corrections
from seglabel.evaluate import EvalError, evaluate_folders
from seglabel.exports.brush_rle import encode_mask
from seglabel.preview import build_preview
from test_annotate_cli import annotate
from test_import import labelstudio_export


def import_one(out: Path, key: str, mask: np.ndarray, tmp_path: Path) -> None:
    result = import_corrections(labelstudio_export(out, {key: mask}, tmp_path / f"ls-{key.replace('/', '_')}.json"), out)
    assert result.imported == [key] and not result.problems


@pytest.mark.slow
def test_annotate_reruns_never_overwrite_an_imported_correction(tmp_path, tiny_weights, small_labelset):
    photos = tmp_path / "photos"
    write_images(photos, ["p1.png", "p2.png", "p3.png"])
    out = tmp_path / "labels"
    assert annotate([photos], out, small_labelset, tiny_weights).returncode == 0
    mask = read_mask(out / "masks/p2.png")
    fixed = np.zeros_like(mask)
    fixed[: mask.shape[0] // 2] = 2  # a person says: road above, sky below
    tasks = json.loads((labelstudio_export(out, {}, tmp_path / "ls.json")).read_text())
    task = next(t for t in tasks if t["data"]["seglabel_key"] == "p2")
    h, w = fixed.shape
    task["annotations"] = [{"id": 1, "result": [
        {"type": "brushlabels", "original_width": w, "original_height": h,
         "value": {"format": "rle", "rle": encode_mask(fixed == k), "brushlabels": [name]}}
        for k, name in ((0, "sky"), (2, "road"))]}]
    (tmp_path / "ls.json").write_text(json.dumps(tasks))
    assert import_corrections(tmp_path / "ls.json", out).imported == ["p2"]
    record = (out / "records/p2.json").read_bytes()

    r = annotate([photos], out, small_labelset, tiny_weights, "tiny-vit", "--overwrite", "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["kept"] == 1 and summary["labelled"] == 2
    np.testing.assert_array_equal(read_mask(out / "masks/p2.png"), fixed)
    assert (out / "records/p2.json").read_bytes() == record
    coco = json.loads((out / "coco.json").read_text())
    [image] = [i for i in coco["images"] if i["file_name"] == "p2.png"]
    assert image["confidence"] is None  # coco.json shows the correction


def test_eval_scores_against_the_corrected_images_of_a_run(tmp_path):
    masks = street_masks()
    pred = make_run(tmp_path / "pred", masks)
    gt = make_run(tmp_path / "gt", masks)
    truth = corrected(masks["a"])
    import_one(gt, "a", truth, tmp_path)

    result = evaluate_folders(pred, gt)  # the label set: the runs'
    assert result.images == 1 and result.gt_uncorrected == 2 and not result.missing_gt
    valid = truth != 255
    for k in range(3):
        assert result.gt_pixels[k] == (truth == k).sum()
        assert result.confusion[k, k] == ((truth == k) & (masks["a"] == k) & valid).sum()
    assert evaluate_folders(pred, gt, gt_all=True).images == 3

    # another label set's run: scored by name when asked
    other = {**STREET, "classes": list(reversed(STREET["classes"]))}
    flipped = make_run(tmp_path / "flipped", {"a": np.where(truth == 255, 255, 2 - truth).astype(np.uint8)}, other)
    import_one(flipped, "a", truth, tmp_path)  # brushes named as in STREET: mapped to the run's classes by name
    np.testing.assert_array_equal(read_mask(flipped / "masks/a.png"), np.where(truth == 255, 255, 2 - truth))
    with pytest.raises(EvalError, match="--map-by-name"):
        evaluate_folders(pred, flipped)
    by_name = evaluate_folders(pred, flipped, map_by_name=True)
    np.testing.assert_array_equal(by_name.confusion, result.confusion)
    with pytest.raises(EvalError, match="leave --id-map out"):
        evaluate_folders(pred, gt, id_map={0: 0})


def test_eval_of_a_run_nobody_corrected_says_so(tmp_path):
    masks = street_masks()
    pred, gt = make_run(tmp_path / "pred", masks), make_run(tmp_path / "gt", masks)
    with pytest.raises(EvalError, match="none of its 3 images was corrected by a person"):
        evaluate_folders(pred, gt)


def test_preview_marks_corrected_images_and_shows_them_apart(tmp_path):
    masks = street_masks()
    out = make_run(tmp_path, masks)
    import_one(out, "a", corrected(masks["a"]), tmp_path)
    result = build_preview(out, jobs=1)
    page = result.index.read_text()
    cards = re.findall(r'<article class="card( corrected)?" data-key="([^"]+)"', page)
    assert cards == [("", "c"), ("", "sub/b"), (" corrected", "a")]  # the model's first, corrections apart
    badge = re.search(r'<span class="badge" title="([^"]+)">corrected</span>', page)
    assert badge and badge[1] == "corrected by a person in label-studio, 2026-05-01T10:00:00.000000Z"
    assert page.count('class="badge"') == 1
    assert "then the 1 corrected by a person" in page
