"""`seglabel annotate` end to end on generated images with a tiny random CLIP."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import TINY_CONFIGS, write_images


def run(*args: str, cwd: Path | None = None, stdin: str | None = None, env: dict | None = None,
        preexec_fn=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "seglabel", *args], capture_output=True, text=True,
                          cwd=cwd, input=stdin, env=env, timeout=600, preexec_fn=preexec_fn)


def annotate(photos, out, labels, weights, name="tiny-vit", *extra, **options):
    return run("annotate", *map(str, photos), "--labels", str(labels), "--out", str(out),
               "--model", f"maskclip:{name}", "--model-config", str(TINY_CONFIGS[name]),
               "--pretrained", str(weights[name]), "--short-side", "64", *extra, **options)


def read_mask(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny-vit", "tiny-rn"])
def test_folder_to_masks_and_coco(tmp_path, tiny_weights, small_labelset, name):
    from pycocotools import mask as mask_util
    from pycocotools.coco import COCO

    photos = tmp_path / "photos"
    write_images(photos, ["a.jpg", "x/b.png", "x/y/c.webp"], size=(45, 70))
    out = tmp_path / "labels"
    r = annotate([photos], out, small_labelset, tiny_weights, name, "--overlay", "--save-scores", "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["labelled"] == 3 and summary["failures"] == [] and summary["exit_code"] == 0

    keys = ["a", "x/b", "x/y/c"]
    for key in keys:
        img = Image.open(out / "masks" / f"{key}.png")
        assert img.mode == "L" and img.size == (70, 45)  # grayscale: indices for PIL and OpenCV alike
        assert read_mask(out / "masks" / f"{key}.png").max() < 3
        assert (out / "overlays" / f"{key}.jpg").is_file()
        scores = np.asarray(Image.open(out / "scores" / f"{key}.png"))
        assert scores.dtype == np.uint16 and scores.shape == (45, 70) and scores.min() >= 65535 // 3

    coco = COCO(str(out / "coco.json"))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["sky", "grass", "road"]
    assert [c["id"] for c in coco.loadCats(coco.getCatIds())] == [1, 2, 3]
    images = coco.loadImgs(coco.getImgIds())
    assert [i["file_name"] for i in images] == ["a.jpg", "x/b.png", "x/y/c.webp"]
    for info, key in zip(images, keys):
        decoded = np.full((info["height"], info["width"]), 255, dtype=np.uint8)
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=info["id"])):
            m = coco.annToMask(ann).astype(bool)
            assert ann["area"] == m.sum() and ann["iscrowd"] == 0
            assert ann["bbox"] == list(mask_util.toBbox(ann["segmentation"]))
            assert not (decoded[m] != 255).any()  # annotations of one image do not overlap
            decoded[m] = ann["category_id"] - 1
        np.testing.assert_array_equal(decoded, read_mask(out / "masks" / f"{key}.png"))

    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "done" and record["model"] == f"maskclip:{name}"
    assert record["labelset"]["classes"][1]["prompts"] == ["grass", "lawn"]
    assert record["weights"]["weights_file"] == str(tiny_weights[name])


@pytest.mark.slow
def test_rerun_resumes_and_overwrite_relabels(tmp_path, tiny_weights, small_labelset):
    photos = tmp_path / "photos"
    write_images(photos, ["a.jpg", "b.jpg"])
    out = tmp_path / "labels"
    assert annotate([photos], out, small_labelset, tiny_weights).returncode == 0
    first = (out / "masks" / "a.png").read_bytes()
    (out / "records" / "b.json").unlink()  # as if the run had died before b was finished
    write_images(photos, ["c.jpg"], seed=5)
    r = annotate([photos], out, small_labelset, tiny_weights, "tiny-vit", "--json")
    summary = json.loads(r.stdout)
    assert (summary["labelled"], summary["skipped"]) == (2, 1)
    assert (out / "masks" / "a.png").read_bytes() == first
    coco = json.loads((out / "coco.json").read_text())
    assert [i["file_name"] for i in coco["images"]] == ["a.jpg", "b.jpg", "c.jpg"]
    r = annotate([photos], out, small_labelset, tiny_weights, "tiny-vit", "--json", "--overwrite")
    assert json.loads(r.stdout)["labelled"] == 3
    assert (out / "masks" / "a.png").read_bytes() == first  # deterministic
    assert not list(out.rglob("*.tmp"))


@pytest.mark.slow
def test_other_settings_into_the_same_out_are_refused(tmp_path, tiny_weights, small_labelset):
    photos = tmp_path / "photos"
    write_images(photos, ["a.jpg"])
    out = tmp_path / "labels"
    assert annotate([photos], out, small_labelset, tiny_weights).returncode == 0
    other = tmp_path / "other.yaml"
    other.write_text("classes: [cat, dog]\n")
    r = annotate([photos], out, other, tiny_weights)
    assert r.returncode == 2
    assert "other settings" in r.stderr and "labelset" in r.stderr and "Traceback" not in r.stderr


def test_bad_images_are_reported_and_the_run_goes_on(tmp_path, tiny_weights, small_labelset):
    photos = tmp_path / "photos"
    write_images(photos, ["good.jpg"])
    (photos / "empty.jpg").write_bytes(b"")
    (photos / "text.png").write_text("not an image")
    good = (photos / "good.jpg").read_bytes()
    (photos / "cut.jpg").write_bytes(good[: len(good) // 2])
    out = tmp_path / "labels"
    r = annotate([photos], out, small_labelset, tiny_weights, "tiny-vit", "--json")
    assert r.returncode == 3, r.stderr
    summary = json.loads(r.stdout)
    failed = {Path(f["path"]).name: f["reason"] for f in summary["failures"]}
    assert set(failed) == {"empty.jpg", "text.png", "cut.jpg"}
    assert summary["labelled"] == 1
    assert (out / "masks" / "good.png").is_file() and not (out / "masks" / "empty.png").exists()


def test_colliding_outputs_and_from_list(tmp_path, tiny_weights, small_labelset):
    photos = tmp_path / "data"
    write_images(photos, ["s1/a.jpg", "s1/a.png", "s2/b.jpg"])
    listing = "\n".join(str(p) for p in sorted(photos.rglob("*.*"))) + "\n" + str(photos / "gone.jpg") + "\n"
    out = tmp_path / "labels"
    r = run("annotate", "--from-list", "-", "--labels", str(small_labelset), "--out", str(out),
            "--model", "maskclip:tiny-vit", "--model-config", str(TINY_CONFIGS["tiny-vit"]),
            "--pretrained", str(tiny_weights["tiny-vit"]), "--short-side", "64", "--json", "--root", str(photos),
            stdin=listing)
    assert r.returncode == 3, r.stderr
    summary = json.loads(r.stdout)
    reasons = {Path(f["path"]).name: f["reason"] for f in summary["failures"]}
    assert "s1/a.png" in reasons["a.png"] and "listed but not found" in reasons["gone.jpg"]
    assert sorted(p.relative_to(out / "masks").as_posix() for p in (out / "masks").rglob("*.png")) == \
        ["s1/a.png", "s2/b.png"]


@pytest.mark.slow
def test_output_folder_inside_input_is_not_input(tmp_path, tiny_weights, small_labelset):
    photos = tmp_path / "photos"
    write_images(photos, ["a.jpg"])
    out = photos / "labels"
    assert annotate([photos], out, small_labelset, tiny_weights, "tiny-vit", "--overlay").returncode == 0
    r = annotate([photos], out, small_labelset, tiny_weights, "tiny-vit", "--overlay", "--json")
    summary = json.loads(r.stdout)
    assert summary["total"] == 1 and summary["skipped"] == 1


def test_dry_run_loads_no_model(tmp_path, small_labelset):
    photos = tmp_path / "photos"
    write_images(photos, ["a.jpg", "b.jpg"])
    r = run("annotate", str(photos), "--labels", str(small_labelset), "--out", str(tmp_path / "o"),
            "--model", "maskclip:no-such-model", "--dry-run", "--json")
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    assert [Path(p).name for p in plan["todo"]] == ["a.jpg", "b.jpg"] and plan["done"] == []
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args, message", [
    (["--model", "maskclip:ViT-B-16"], "not cached and the model hub cannot be reached"),
    (["--model", "maskclip:nope"], "unknown open_clip model 'nope'"),
    (["--model", "nope:x"], "unknown model kind 'nope'"),
    (["--model", "maskclip:ViT-B-16", "--pretrained", "/no/such.bin"], "neither a weight file nor a pretrained tag"),
])
@pytest.mark.slow
def test_config_errors_are_one_line_exit_2(tmp_path, small_labelset, args, message):
    photos = tmp_path / "photos"
    write_images(photos, ["a.jpg"])
    r = run("annotate", str(photos), "--labels", str(small_labelset), "--out", str(tmp_path / "o"), *args)
    assert r.returncode == 2
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_weights_that_do_not_fit_the_model(tmp_path, tiny_weights, small_labelset):
    photos = tmp_path / "photos"
    write_images(photos, ["a.jpg"])
    r = run("annotate", str(photos), "--labels", str(small_labelset), "--out", str(tmp_path / "o"),
            "--model", "maskclip:tiny-rn", "--model-config", str(TINY_CONFIGS["tiny-rn"]),
            "--pretrained", str(tiny_weights["tiny-vit"]))
    assert r.returncode == 2 and "does not fit tiny-rn" in r.stderr and str(tiny_weights["tiny-vit"]) in r.stderr


def test_bad_labelset_is_exit_2_naming_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("classes:\n  - sky\n  - name: sky\n")
    r = run("labelsets", "check", str(bad))
    assert r.returncode == 2 and f"{bad}:3: duplicate class 'sky'" in r.stderr
    r = run("labelsets", "check", str(Path(__file__).parent.parent / "labelsets" / "street.yaml"))
    assert r.returncode == 0 and "19 classes" in r.stdout


@pytest.mark.slow
def test_sliding_window_and_min_confidence(tmp_path, tiny_weights, small_labelset):
    photos = tmp_path / "photos"
    write_images(photos, ["a.jpg"], size=(50, 130))
    out = tmp_path / "labels"
    r = annotate([photos], out, small_labelset, tiny_weights, "tiny-vit", "--window", "32", "--window-stride", "16",
                 "--min-confidence", "0.99")
    assert r.returncode == 0, r.stderr
    mask = read_mask(out / "masks" / "a.png")
    assert mask.shape == (50, 130) and (mask == 255).any()
