"""The README's distill story through the real command line: annotate -> distill -> annotate
with the student, on a new label set too."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from conftest import write_images
from test_annotate_cli import annotate, run


@pytest.mark.slow
def test_annotate_distill_then_label_with_the_student(tmp_path, tiny_weights, small_labelset):
    photos = tmp_path / "photos"
    write_images(photos, [f"{i}.jpg" for i in range(4)], size=(48, 64))
    labels = tmp_path / "labels"
    assert annotate([photos], labels, small_labelset, tiny_weights).returncode == 0

    r = run("distill", "--pseudo", str(labels), "--images", str(photos), "--arch", "deeplabv2",
            "--out", str(tmp_path / "run"), "--depth", "18", "--iters", "2", "--batch-size", "2",
            "--crop", "32", "--base-size", "48", "--workers", "0", "--quiet")
    assert r.returncode == 0, r.stderr
    student = tmp_path / "run" / "student.pt"
    assert student.is_file() and (tmp_path / "run" / "last.pt").is_file()

    other = tmp_path / "other.yaml"
    other.write_text("templates: none\nclasses: [water, sand, tree, building]\n")
    for labelset, n in ((small_labelset, 3), (other, 4)):
        out = tmp_path / f"student-{n}"
        r = run("annotate", str(photos), "--labels", str(labelset), "--out", str(out),
                "--model", f"student:{student}", "--short-side", "48", "--json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["labelled"] == 4
        mask = np.asarray(Image.open(out / "masks" / "0.png"))
        assert mask.shape == (48, 64) and mask.max() < n
        assert json.loads((out / "run.json").read_text())["model"] == f"student:{student}"
