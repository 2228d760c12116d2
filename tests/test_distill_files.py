"""distill and the files around it (issue 22 items 2, 8, 9; issue 23 item 2): seglabel's own run
folders under --images are skipped and counted, --quiet still names every skipped file, --dry-run
prints the plan and writes nothing, and a write that fails (a file-size limit) names the file and
the cause in one line for every file a run writes."""
from __future__ import annotations

import json
import os
import resource

import pytest

from conftest import TINY_CONFIGS, write_images
from test_annotate_cli import annotate, run
from test_distill import write_masks


@pytest.fixture
def masks_args(tmp_path, tiny_weights, small_labelset):
    """Photos with a plain mask folder (two of them without a mask): distill without a teacher."""
    photos, masks = tmp_path / "photos", tmp_path / "masks"
    names = [f"{i}.jpg" for i in range(4)]
    write_images(photos, names, size=(48, 64))
    write_masks(masks, names[:2], size=(48, 64))

    def args(out, *extra: str) -> list[str]:
        return ["distill", "--pseudo", str(masks), "--labels", str(small_labelset), "--images", str(photos),
                "--clip", "tiny-vit", "--model-config", str(TINY_CONFIGS["tiny-vit"]),
                "--pretrained", str(tiny_weights["tiny-vit"]), "--out", str(out), "--depth", "18", "--width", "8",
                "--iters", "2", "--batch-size", "2", "--crop", "32", "--base-size", "48", "--workers", "0",
                "--device", "cpu", *extra]

    return args


def files_under(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


@pytest.mark.slow
def test_run_folders_under_images_are_skipped_and_quiet_still_names_every_skip(tmp_path, tiny_weights, small_labelset):
    """annotate photos -o photos/labels, then distill --images photos: the first run's masks are not
    photos (issue 22 item 2); under --quiet every skipped file is still named (item 8)."""
    photos = tmp_path / "photos"
    write_images(photos, [f"{i}.jpg" for i in range(3)], size=(48, 64))
    labels = photos / "labels"
    assert annotate([photos], labels, small_labelset, tiny_weights, "tiny-vit", "--overlay").returncode == 0
    (labels / "masks" / "0.png").unlink()  # one photo without its pseudo-label
    r = run("distill", "--pseudo", str(labels), "--images", str(photos), "--out", str(tmp_path / "run"),
            "--teacher", "none", "--width", "8", "--iters", "1", "--batch-size", "2", "--workers", "0", "--quiet")
    assert r.returncode == 0, r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines == [f"seglabel: warning: {labels / folder}: a seglabel run's output (masks, overlays...), not "
                     f"training photos: skipped" for folder in ("masks", "overlays", "records")] + \
        [f"seglabel: warning: skipped: {photos / '0.jpg'}: no mask 0.png in {labels / 'masks'}"], r.stderr
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["teacher"] is None and config["teacher_labels"] == "none"


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, masks_args):
    out = tmp_path / "run"
    r = run(*masks_args(out, "--dry-run"))
    assert r.returncode == 0, r.stderr
    text = r.stdout
    for words in ("student: DeepLabv2, ResNet-18 width 8, from random init", "device: cpu",
                  "teacher: none; training on the masks in", "iterations: 2 of batch 2 (2 passes over 2 images)",
                  "scale: base size 48, random rescale 0.5-2, crop 32, photometric distortion off",
                  "loss: cross-entropy + colour affinity x2.5", "images: 2 to train on",
                  f"  skipped: {tmp_path / 'photos' / '2.jpg'}: no mask 2.png in {tmp_path / 'masks'}"):
        assert words in text, text
    assert not out.exists()
    # a refusal is the same one line as the run's, and still writes nothing
    r = run(*masks_args(out, "--dry-run", "--ignore-unsure", "0.2"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--ignore-unsure ranks the teacher's pixels" in r.stderr
    assert not out.exists()


def limited(size: int):
    """A child process whose files cannot grow beyond ``size`` bytes (``ulimit -f``); CPython ignores
    SIGXFSZ, so a write past it fails with EFBIG."""
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))


@pytest.mark.slow
def test_a_write_that_fails_names_the_file_and_the_cause(tmp_path, masks_args):
    reference = tmp_path / "reference"
    long_log = ("--iters", "60", "--log-every", "1", "--save-every", "1000")
    r = run(*masks_args(reference, *long_log))
    assert r.returncode == 0, r.stderr
    size = {name: (reference / name).stat().st_size for name in ("config.json", "student.pt", "last.pt", "log.jsonl")}
    assert size["config.json"] < size["log.jsonl"] < size["student.pt"] < size["last.pt"], size
    cases = {  # the file that fails first, under a limit each earlier file fits in
        "config.json": (size["config.json"] // 2, ()),
        "log.jsonl": ((size["config.json"] + size["log.jsonl"]) // 2, long_log),
        "last.pt": (size["student.pt"] // 2, ("--save-every", "1")),
        "student.pt": (size["student.pt"] // 2, ()),
    }
    for name, (limit, extra) in cases.items():
        out = tmp_path / name.replace(".", "-")
        r = run(*masks_args(out, *extra), preexec_fn=limited(limit))
        assert r.returncode == 1, (name, r.returncode, r.stderr)
        assert r.stderr.strip().splitlines()[-1] == f"seglabel: error: {out / name}: cannot write (File too large)", \
            (name, r.stderr)
        assert "inline_container" not in r.stderr and "Traceback" not in r.stderr
        assert not [p for p in out.iterdir() if p.name.endswith(".tmp")], name  # no temporary left behind
    assert os.path.exists(tmp_path / "student-pt" / "config.json")
