"""The point of distillation (MaskCLIP+): the student labels better than its teacher.

The whole loop on a small toy world, as a user runs it: the teacher (the toy CLIP, the default
method, SCLIP, whose student is taught online; and CorrCLIP with SLIC regions, the strongest,
whose labels are cached per photo and scale) writes pseudo-labels of 120 training scenes with
``seglabel annotate``; their ground truth is deleted unread; ``seglabel distill`` with its defaults
(only a shorter schedule; the teacher rebuilt from run.json); teacher and student label 60 held-out
scenes at the same input size and ``seglabel.evaluate`` scores both. Broken distillation (wrong
targets, a classifier that drifts, labels at the wrong scale, a teacher rebuilt otherwise, lost
guided upsampling, no learning) leaves the student below the bar and fails this test.

Measured (benchmarks/toyworld/distill_quality.py --train-n 120 --train-seed 11 --test-n 60
--test-seed 777 [--teacher-method corrclip] -- --iters 800, about 4 min each on a loaded 2-core
CPU): see MEASURED below; the full benchmark (400 / 200 scenes, plain defaults) gives teacher 0.770,
student 0.956 (SCLIP) and teacher 0.850, student 0.973 (CorrCLIP).
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from test_annotate_cli import run

REPO = Path(__file__).parent.parent
FIXTURE = REPO / "tests" / "fixtures" / "toyclip"
LABELS = REPO / "labelsets" / "toyworld.yaml"
sys.path.insert(0, str(REPO / "benchmarks" / "toyworld"))

ITERS = 800
MEASURED = {"sclip": "teacher 0.765, student 0.942 (+0.177)", "corrclip": "teacher 0.833, student 0.935 (+0.102)"}
# The bar: above what a student without guided upsampling gains (about +0.05 on the full benchmark
# with SCLIP, -0.01 with CorrCLIP; the bar for CorrCLIP is +0.02), about half the measured gain.
MARGIN = {"sclip": 0.10, "corrclip": 0.05}
TEACHERS = {"sclip": [], "corrclip": ["--method", "corrclip", "--regions", "slic", "--proxy", "clip"]}


def teacher_annotate(images: Path, out: Path, flags: list[str]) -> None:
    r = run("annotate", str(images), "--labels", str(LABELS), "--out", str(out), "--model", "maskclip:toyclip-vit",
            "--model-config", str(FIXTURE / "toyclip-vit.json"), "--pretrained",
            str(FIXTURE / "toyclip-vit.safetensors"), "--short-side", "64", "--batch-size", "16", "--quiet", *flags)
    assert r.returncode == 0, r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("method", list(TEACHERS))
def test_the_student_labels_held_out_scenes_better_than_its_teacher(tmp_path, method):
    import scenes

    from seglabel.evaluate import evaluate_folders
    from seglabel.labelset import load_labelset

    if method == "corrclip":
        pytest.importorskip("skimage")
    train, test = tmp_path / "train", tmp_path / "test"
    scenes.write_dataset(train, 120, 11)
    scenes.write_dataset(test, 60, 777)
    shutil.rmtree(train / "gt")  # never used: the student learns from its teacher only

    teacher_annotate(train / "images", tmp_path / "pseudo", TEACHERS[method])
    teacher_annotate(test / "images", tmp_path / "teacher", TEACHERS[method])
    r = run("distill", "--pseudo", str(tmp_path / "pseudo"), "--images", str(train / "images"),
            "--out", str(tmp_path / "run"), "--iters", str(ITERS), "--quiet")
    assert r.returncode == 0, r.stderr
    r = run("annotate", str(test / "images"), "--labels", str(LABELS), "--out", str(tmp_path / "student"),
            "--model", f"student:{tmp_path / 'run' / 'student.pt'}", "--batch-size", "16", "--quiet")
    assert r.returncode == 0, r.stderr

    labelset = load_labelset(LABELS)
    teacher = evaluate_folders(tmp_path / "teacher", test / "gt", labelset)
    student = evaluate_folders(tmp_path / "student", test / "gt", labelset)
    assert teacher.images == student.images == 60
    assert student.miou >= teacher.miou + MARGIN[method], (f"teacher {teacher.miou:.3f}, student {student.miou:.3f} "
                                                           f"(measured {MEASURED[method]})")
