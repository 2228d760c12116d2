"""Weight files crafted to run code when unpickled are refused, through every flag that reads one,
and nothing in them runs: the payload would create a file, and no file appears."""
from __future__ import annotations

import os
import pickle
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_CONFIGS, write_images
from test_annotate_cli import annotate, run


class _Payload:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


class _ExecPayload:
    """The same through builtins.exec (no os module named in the pickle)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def plant(path: Path, marker: Path, how: str = "zip") -> Path:
    """A checkpoint-looking file (tensors and all) with the payload inside."""
    obj = {"state_dict": {"net.weight": torch.zeros(2, 2), "hook": _Payload(marker)},
           "epoch": 3, "callbacks": {"x": _ExecPayload(marker)}}
    if how == "zip":
        torch.save(obj, path)
    elif how == "legacy":
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    else:  # a bare pickle under a weights suffix
        with open(path, "wb") as f:
            pickle.dump(obj, f, protocol=4)
    return path


@pytest.fixture
def marker(tmp_path) -> Path:
    return tmp_path / "PAYLOAD_RAN"


@pytest.mark.parametrize("how", ["zip", "legacy", "raw"])
def test_the_payload_is_real_and_load_weights_refuses_it(tmp_path, marker, how):
    """The planted files do run code when unpickled the unsafe way (so the tests here are not
    empty), and ``load_weights`` refuses each without running it."""
    from seglabel.checkpoints import CheckpointError, load_weights

    path = plant(tmp_path / f"evil-{how}.pt", marker, how)
    with pytest.raises(CheckpointError) as err:
        load_weights(path)
    assert not marker.exists()
    message = str(err.value)
    assert message.startswith(f"{path}: refused") and len(message.splitlines()) == 1
    assert "posix.system" in message or "exec" in message  # names what it refused
    try:
        torch.load(path, weights_only=False)  # the unsafe way: the payload runs
    except RuntimeError:  # a bare pickle: it ran, then torch finds no magic number
        pass
    assert marker.exists()


def assert_refused(r: subprocess.CompletedProcess, path: Path, marker: Path) -> None:
    assert not marker.exists(), "code from the checkpoint ran"
    assert r.returncode == 2, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("seglabel: error:")]
    assert len(errors) == 1, r.stderr
    assert str(path) in errors[0] and "refused" in errors[0] and "could run code" in errors[0], errors[0]
    assert "Traceback" not in r.stderr


def test_pretrained_file_for_maskclip(tmp_path, small_labelset, marker):
    evil = plant(tmp_path / "open_clip_model.bin", marker)
    photos = tmp_path / "photos"
    write_images(photos, ["a.jpg"])
    r = annotate([photos], tmp_path / "out", small_labelset, {"tiny-vit": evil})
    assert_refused(r, evil, marker)
    assert not (tmp_path / "out" / "masks").exists()


@pytest.mark.parametrize("kind, name", [("lseg", "demo_e200.ckpt"), ("student", "student.pt")])
def test_lseg_and_student_checkpoints(tmp_path, small_labelset, marker, kind, name):
    evil = plant(tmp_path / name, marker)
    photos = tmp_path / "photos"
    write_images(photos, ["a.jpg"])
    r = run("annotate", str(photos), "--labels", str(small_labelset), "--out", str(tmp_path / "out"),
            "--model", f"{kind}:{evil}", "--device", "cpu")
    assert_refused(r, evil, marker)


def distill_args(tmp_path, tiny_weights, small_labelset) -> list[str]:
    """A plain mask folder + label set + tiny text encoder: no annotate run needed."""
    photos, masks = tmp_path / "photos", tmp_path / "masks"
    write_images(photos, ["0.jpg"], size=(48, 64))
    masks.mkdir()
    Image.fromarray(np.zeros((48, 64), dtype=np.uint8)).save(masks / "0.png")
    return ["distill", "--pseudo", str(masks), "--labels", str(small_labelset), "--images", str(photos),
            "--clip", "tiny-vit", "--model-config", str(TINY_CONFIGS["tiny-vit"]),
            "--pretrained", str(tiny_weights["tiny-vit"]), "--out", str(tmp_path / "run"), "--depth", "18",
            "--iters", "1", "--batch-size", "1", "--crop", "32", "--base-size", "48", "--workers", "0",
            "--device", "cpu"]


def test_distill_backbone_weights(tmp_path, tiny_weights, small_labelset, marker):
    evil = plant(tmp_path / "resnet101.pth", marker)
    r = run(*distill_args(tmp_path, tiny_weights, small_labelset), "--backbone-weights", str(evil))
    assert_refused(r, evil, marker)
    assert not (tmp_path / "run" / "student.pt").exists()


def test_distill_resume_file(tmp_path, tiny_weights, small_labelset, marker):
    """A planted ``last.pt`` in the run folder is read on resume: refused the same way."""
    (tmp_path / "run").mkdir()
    evil = plant(tmp_path / "run" / "last.pt", marker)
    r = run(*distill_args(tmp_path, tiny_weights, small_labelset))
    assert_refused(r, evil, marker)


def test_create_clip_reads_a_local_file_with_the_safe_loader(tmp_path, marker, monkeypatch):
    """``--pretrained FILE`` goes through seglabel's loader, never open_clip's own torch.load."""
    import open_clip

    from seglabel.checkpoints import CheckpointError
    from seglabel.models.clip import create_clip, register_model_config

    register_model_config(TINY_CONFIGS["tiny-vit"])
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    evil = plant(tmp_path / "weights.pt", marker)
    with pytest.raises(CheckpointError, match="refused"):
        create_clip("tiny-vit", str(evil))
    assert not marker.exists() and calls == [True]
    assert open_clip.get_model_config("tiny-vit") is not None


@pytest.mark.parametrize("name, content, words", [
    ("empty.pt", b"", "empty file"),
    ("cut.pt", None, "not a readable PyTorch weight file"),
    ("notes.ckpt", b"just some text\n", "not a readable PyTorch weight file"),
    ("cut.safetensors", b"abc", "not a readable safetensors file"),
])
def test_broken_weight_files_are_one_line_errors(tmp_path, name, content, words):
    from seglabel.checkpoints import CheckpointError, load_weights

    path = tmp_path / name
    if content is None:  # a torch.save archive cut in half, as an interrupted copy leaves it
        torch.save({"w": torch.zeros(1000)}, path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError) as err:
        load_weights(path)
    message = str(err.value)
    assert message.startswith(f"{path}: ") and words in message and len(message.splitlines()) == 1
