"""``seglabel distill`` given a broken run folder (issue 15, item 15): one line naming the file,
exit 2, no traceback, and nothing on disk changed."""
from __future__ import annotations

import pytest
import torch
from conftest import TINY_CONFIGS, write_images
from test_annotate_cli import run
from test_distill import write_masks


@pytest.fixture
def distill_cmd(tmp_path, tiny_weights, small_labelset):
    photos, masks = tmp_path / "photos", tmp_path / "masks"
    write_images(photos, [f"{i}.jpg" for i in range(2)], size=(48, 64))
    write_masks(masks, [f"{i}.jpg" for i in range(2)], size=(48, 64))

    def cmd(out, *extra: str) -> list[str]:
        return ["distill", "--pseudo", str(masks), "--labels", str(small_labelset), "--images", str(photos),
                "--clip", "tiny-vit", "--model-config", str(TINY_CONFIGS["tiny-vit"]),
                "--pretrained", str(tiny_weights["tiny-vit"]), "--out", str(out), "--depth", "18", "--width", "8",
                "--iters", "2", "--batch-size", "2", "--crop", "32", "--base-size", "48", "--workers", "0",
                "--device", "cpu", *extra]

    return cmd


def assert_one_line_exit_2(r, path, *words):
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("seglabel: error: ") and str(path) in lines[0], lines[0]
    assert "Traceback" not in r.stderr
    for word in words:
        assert word in lines[0], lines[0]


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("content, words", [
    (torch.zeros(3), ["not a distill checkpoint", "Tensor"]),  # was: AttributeError
    ({"config": {"iters": 2}, "iteration": 1}, ["not a whole distill checkpoint", "model"]),  # was: KeyError
    ({"model": {}, "optimizer": {}, "iteration": "1", "rng": {}, "config": {}}, ["malformed"]),
    ([1, 2, 3], ["not a distill checkpoint", "list"]),
])
def test_broken_last_pt_is_one_line(tmp_path, distill_cmd, content, words):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    torch.save(content, run_dir / "last.pt")
    before = snapshot(run_dir)
    r = run(*distill_cmd(run_dir))
    assert_one_line_exit_2(r, run_dir / "last.pt", *words)
    assert snapshot(run_dir) == before


def test_out_naming_a_file_is_one_line(tmp_path, distill_cmd):
    """--out naming a file: refused before any model is built (was: FileExistsError after setup)."""
    out = tmp_path / "run.txt"
    out.write_text("my notes\n")
    r = run(*distill_cmd(out))
    assert_one_line_exit_2(r, out, "not a folder")
    assert out.read_text() == "my notes\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["masks", "photos", "run.txt", "small.yaml"]


def test_student_without_weights_is_one_line(tmp_path, small_labelset):
    """A student.pt whose weights are missing (only the architecture and labels): one line, exit 2."""
    from seglabel.labelset import load_labelset
    from seglabel.models.deeplab import STUDENT_FORMAT, StudentArch

    student = tmp_path / "student.pt"
    torch.save({"format": STUDENT_FORMAT, "arch": StudentArch.resnet(18, 32, width=8, stem_width=8).to_dict(),
                "labelset": load_labelset(small_labelset).to_dict()}, student)
    photos = tmp_path / "photos"
    write_images(photos, ["a.png"], size=(48, 64))
    r = run("annotate", str(photos), "--labels", str(small_labelset), "--out", str(tmp_path / "out"),
            "--model", f"student:{student}")
    assert_one_line_exit_2(r, student, "state_dict")
