"""``seglabel distill`` killed with SIGKILL after a checkpoint, then rerun: it resumes from the
checkpoint's iteration (not 0), redoes exactly what the killed run did after it, finishes, and
leaves no temporary files. (That a resumed run ends with the same weights as an uninterrupted
one is checked in-process in test_distill.py.)"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY_CONFIGS, gated_seglabel, write_images
from test_annotate_cli import run
from test_distill import write_masks

ITERS, SAVE_EVERY = 40, 3


@pytest.fixture
def distill_args(tmp_path, tiny_weights, small_labelset):
    """Images, a plain mask folder, the label set and a tiny text encoder: no annotate run needed."""
    photos, masks = tmp_path / "photos", tmp_path / "masks"
    write_images(photos, [f"{i}.jpg" for i in range(4)], size=(48, 64))
    for bottom in (1, 2):  # two ground classes, so the loss has something to learn
        write_masks(masks, [f"{i}.jpg" for i in range(bottom - 1, 4, 2)], size=(48, 64), value_bottom=bottom)

    def args(out: Path, iters: int = ITERS) -> list[str]:
        return ["distill", "--pseudo", str(masks), "--labels", str(small_labelset), "--images", str(photos),
                "--clip", "tiny-vit", "--model-config", str(TINY_CONFIGS["tiny-vit"]),
                "--pretrained", str(tiny_weights["tiny-vit"]), "--out", str(out), "--depth", "18",
                "--iters", str(iters), "--batch-size", "2", "--crop", "32", "--base-size", "48", "--workers", "0",
                "--save-every", str(SAVE_EVERY), "--log-every", "1", "--device", "cpu", "--seed", "3"]

    return args


def iteration_of(checkpoint: Path) -> int:
    return int(torch.load(checkpoint, map_location="cpu", weights_only=True)["iteration"])


def student_tensors(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def kill_after_first_checkpoint(cmd: list[str], out: Path, delay: float) -> None:
    # the last iteration waits at a gate that never opens: the run cannot finish before the kill
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SEGLABEL_TEST_GATE": str(out.parent / "never"),
           "SEGLABEL_TEST_GATE_AFTER": str(ITERS - 1)}
    proc = subprocess.Popen([*gated_seglabel("seglabel.distill.training:segmentation_loss"), *cmd], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while not (out / "last.pt").exists():
            if proc.poll() is not None:
                pytest.fail(f"distill ended before its first checkpoint: {proc.stderr.read().decode()}")
            if time.monotonic() > deadline:
                pytest.fail("no checkpoint within 240 s")
            time.sleep(0.01)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


def read_log(path: Path) -> list[dict]:
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:  # a line the kill cut short
            pass
    return records


@pytest.mark.slow
def test_killed_distill_resumes_from_its_checkpoint(tmp_path, distill_args):
    out = tmp_path / "run"
    kill_after_first_checkpoint(distill_args(out), out, delay=random.Random(os.getpid()).uniform(0.0, 0.5))
    assert not (out / "student.pt").exists(), "the kill came too late to test anything"
    saved = iteration_of(out / "last.pt")  # whole: written atomically, whenever the kill came
    assert 0 < saved < ITERS and saved % SAVE_EVERY == 0
    before = {rec["iter"]: rec["loss"] for rec in read_log(out / "log.jsonl")}
    (out / ".last.pt.seglabel-0badf00d.tmp").write_bytes(b"half a checkpoint")  # as a kill during a save leaves

    r = run(*distill_args(out))
    assert r.returncode == 0, r.stderr
    assert f"resuming from {out / 'last.pt'} at iteration {saved}/{ITERS}" in r.stderr

    log = read_log(out / "log.jsonl")
    assert [rec["iter"] for rec in log] == list(range(1, ITERS + 1))  # each iteration once, none lost
    after = {rec["iter"]: rec["loss"] for rec in log}
    assert all(after[i] == before[i] for i in before), (before, after)  # redone iterations: the same losses
    assert iteration_of(out / "last.pt") == ITERS
    assert set(torch.load(out / "student.pt", weights_only=True)) >= {"state_dict", "labelset"}
    assert [p.name for p in out.iterdir() if p.name.endswith(".tmp")] == []


def test_killed_before_any_checkpoint_starts_over_cleanly(tmp_path, tiny_weights, small_labelset):
    """No last.pt yet: the rerun starts at 0, drops the log lines of the killed attempt (one cut
    short by the kill among them) and the temporary file of a save the kill interrupted."""
    from test_distill import make_config

    from seglabel.distill import train

    write_images(tmp_path / "photos", ["a.jpg", "b.jpg"], size=(48, 64))
    write_masks(tmp_path / "pseudo", ["a.jpg", "b.jpg"])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "log.jsonl").write_text('{"iter": 1, "loss": 9.0}\n{"iter": 2, "lo')
    (run_dir / ".student.pt.seglabel-1234abcd.tmp").write_bytes(b"half")
    (run_dir / ".notes.txt.tmp").write_text("the user's own")  # not ours: never removed
    train(make_config(tmp_path, tiny_weights, small_labelset, iters=2))
    log = read_log(run_dir / "log.jsonl")
    assert [rec["iter"] for rec in log] == [1, 2] and log[0]["loss"] != 9.0
    assert sorted(p.name for p in run_dir.iterdir()) == [".notes.txt.tmp", "config.json", "last.pt", "log.jsonl",
                                                         "student.pt"]
