"""Runs meeting each other and the world, through the real CLI: shards and merge, the lock,
SIGKILL and rerun, Ctrl-C, and a full disk."""
from __future__ import annotations

import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TINY_CONFIGS, gated_seglabel, write_images
from seglabel.runs import parse_shard, run_lock, select_shard
from test_annotate_cli import annotate

# -- shards -----------------------------------------------------------------------------------------


def coco_content(path: Path) -> dict:
    coco = json.loads(path.read_text())
    coco["info"].pop("date_created")  # when the run started
    return coco


def test_parse_and_select_shards():
    assert parse_shard("2/8") == (2, 8) and parse_shard(None, env={}) is None
    assert parse_shard(None, env={"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "4"}) == (3, 4)
    assert parse_shard(None, env={"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_COUNT": "4",
                                  "SLURM_ARRAY_TASK_MIN": "1"}) == (3, 4)  # --array=1-4
    for bad in ("8/8", "1", "a/b", "-1/2"):
        with pytest.raises(ValueError, match="I/N"):
            parse_shard(bad)
    items = list(range(10))
    parts = [select_shard(items, (i, 3)) for i in range(3)]
    assert sorted(sum(parts, [])) == items and parts[0] == [0, 3, 6, 9]


@pytest.mark.slow
def test_shards_then_merge_equal_one_run(tmp_path, small_labelset, tiny_weights):
    photos = tmp_path / "photos"
    write_images(photos, [f"x/{i:02d}.png" for i in range(7)])
    whole, sharded = tmp_path / "whole", tmp_path / "sharded"
    assert annotate([photos], whole, small_labelset, tiny_weights).returncode == 0

    r = annotate([photos], sharded, small_labelset, tiny_weights, "tiny-vit", "--shard", "0/3")
    assert r.returncode == 0, r.stderr
    assert not (sharded / "coco.json").exists()  # a shard leaves coco.json to the merge
    r = subprocess.run([sys.executable, "-m", "seglabel", "merge", str(sharded)], capture_output=True, text=True)
    assert r.returncode == 2 and "shard 1/3 has not run" in r.stderr and "shard 2/3" in r.stderr

    slurm = {**os.environ, "SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "3"}  # the default --shard
    r = subprocess.run([sys.executable, "-m", "seglabel", "annotate", str(photos), "--labels", str(small_labelset),
                        "--out", str(sharded), "--model", "maskclip:tiny-vit", "--model-config",
                        str(TINY_CONFIGS["tiny-vit"]), "--pretrained", str(tiny_weights["tiny-vit"]),
                        "--short-side", "64"], capture_output=True, text=True, env=slurm)
    assert r.returncode == 0, r.stderr
    assert annotate([photos], sharded, small_labelset, tiny_weights, "tiny-vit", "--shard", "2/3").returncode == 0
    assert sorted(p.name for p in (sharded / "runs").glob("*.json")) == [
        "shard-0-of-3.json", "shard-1-of-3.json", "shard-2-of-3.json"]
    r = subprocess.run([sys.executable, "-m", "seglabel", "merge", str(sharded)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert coco_content(sharded / "coco.json") == coco_content(whole / "coco.json")
    for mask in (whole / "masks").rglob("*.png"):
        assert (sharded / mask.relative_to(whole)).read_bytes() == mask.read_bytes()
    merged = json.loads((sharded / "run.json").read_text())
    assert merged["summary"]["images"] == 7 and len(merged["merged"]) == 3


@pytest.mark.slow
def test_second_run_on_a_busy_out_is_refused(tmp_path, small_labelset, tiny_weights):
    photos = tmp_path / "photos"
    write_images(photos, ["a.png", "b.png"])
    out = tmp_path / "out"
    with run_lock(out, None):  # another whole run holds the folder
        r = annotate([photos], out, small_labelset, tiny_weights)
        assert r.returncode == 2 and "another seglabel run is writing here" in r.stderr
        r = annotate([photos], out, small_labelset, tiny_weights, "tiny-vit", "--shard", "0/2")
        assert r.returncode == 2
    assert not (out / "masks").exists()
    with run_lock(out, "shard-0-of-2"):  # a running shard: other shards go ahead, a whole run waits
        assert annotate([photos], out, small_labelset, tiny_weights, "tiny-vit", "--shard", "1/2").returncode == 0
        assert annotate([photos], out, small_labelset, tiny_weights).returncode == 2


# -- kills ------------------------------------------------------------------------------------------


def annotate_argv(photos, out, labels, weights):
    return [sys.executable, "-m", "seglabel", "annotate", str(photos), "--labels", str(labels), "--out", str(out),
            "--model", "maskclip:tiny-vit", "--model-config", str(TINY_CONFIGS["tiny-vit"]),
            "--pretrained", str(weights["tiny-vit"]), "--short-side", "64", "--overlay", "--quiet"]


def temporaries(out: Path) -> list[Path]:
    return [p for p in out.rglob("*.tmp")]


@pytest.mark.slow
def test_sigkill_at_random_points_then_rerun_gives_identical_outputs(tmp_path, small_labelset, tiny_weights):
    photos = tmp_path / "photos"
    write_images(photos, [f"{i:03d}.png" for i in range(60)], size=(72, 96))
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    assert subprocess.run(annotate_argv(photos, reference, small_labelset, tiny_weights)).returncode == 0

    rng = random.Random(20261123)
    argv = annotate_argv(photos, killed, small_labelset, tiny_weights) + ["--workers", "1"]  # a loader process too
    records = lambda: len(list((killed / "records").glob("*.json")))  # noqa: E731
    kills = 0
    for _ in range(6):
        done = records()
        # Kill once 1-8 more images are done, while others are being written; the image after
        # the last one left waits at a gate that never opens, so the run cannot end first.
        target = done + rng.randint(1, 8)
        env = {**os.environ, "SEGLABEL_TEST_GATE": str(tmp_path / "never"),
               "SEGLABEL_TEST_GATE_AFTER": str(60 - done - 1)}
        proc = subprocess.Popen([*gated_seglabel("seglabel.annotate:_write_image"), *argv[3:]], env=env,
                                start_new_session=True)
        wait_for(lambda target=target: records() >= target, proc, f"{target} labelled images")
        os.killpg(proc.pid, signal.SIGKILL)  # the run and its loader processes, as the OOM killer would
        proc.wait()
        kills += 1
    assert kills >= 2  # the kills did land mid-run
    done = subprocess.run(argv, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert not temporaries(killed)
    ref = {p.relative_to(reference): p.read_bytes() for p in reference.rglob("*") if p.suffix in (".png", ".jpg")}
    got = {p.relative_to(killed): p.read_bytes() for p in killed.rglob("*") if p.suffix in (".png", ".jpg")}
    assert len(ref) == 120 and got == ref
    assert coco_content(killed / "coco.json") == coco_content(reference / "coco.json")


def wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 600) -> None:
    """Poll for observable progress of ``proc`` (files, log lines), never a fixed sleep: a loaded
    machine may take minutes to start a run."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within {timeout} s")
        time.sleep(0.05)


def stop_mid_run(tmp_path, small_labelset, tiny_weights, signum: int) -> tuple[Path, list[str], int, str]:
    """150 images with a loader process; ``signum`` to the whole process group (as a terminal's
    Ctrl-C, or Slurm's preemption) once three images are done, while the fourth waits at the gate.
    Returns (out, argv, exit code, stderr)."""
    photos = tmp_path / "photos"
    write_images(photos, [f"{i:03d}.png" for i in range(150)], size=(72, 96))
    out = tmp_path / "out"
    gate = tmp_path / "gate"
    env = {**os.environ, "SEGLABEL_TEST_GATE": str(gate), "SEGLABEL_TEST_GATE_AFTER": "3"}
    argv = annotate_argv(photos, out, small_labelset, tiny_weights)[:-1] + ["--workers", "1"]  # summary on stderr
    argv = [*gated_seglabel("seglabel.annotate:_write_image"), *argv[3:]]
    code, stderr = signal_group_when(argv, lambda: len(list((out / "records").glob("*.json"))) >= 3,
                                     "three labelled images", signum, tmp_path / "stderr.txt", env=env,
                                     after_signal=gate.touch)
    return out, argv, code, stderr


def _ctrl_c_as_in_a_terminal() -> None:
    # A shell starts background jobs with SIGINT ignored, and the child would inherit that (seglabel
    # rightly leaves an ignored SIGINT ignored): a test suite run in the background must not change
    # what this test sees.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def signal_group_when(argv: list[str], ready, what: str, signum: int, stderr_file: Path,
                      env: dict[str, str] | None = None, after_signal=None) -> tuple[int, str]:
    """Start ``argv`` in a process group of its own, send ``signum`` to the whole group once
    ``ready()`` (observable progress, see ``wait_for``), call ``after_signal()``, wait for it;
    (exit code, stderr)."""
    with open(stderr_file, "w+") as err:
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True,
                                preexec_fn=_ctrl_c_as_in_a_terminal)
        try:
            wait_for(ready, proc, what)
            os.killpg(proc.pid, signum)
            if after_signal:
                after_signal()
            proc.wait(timeout=600)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        err.seek(0)
        return proc.returncode, err.read()


def check_finished_in_flight_and_resumes(out: Path, argv: list[str]) -> None:
    records = {p.stem for p in (out / "records").glob("*.json")}
    masks = {p.stem for p in (out / "masks").glob("*.png")}
    assert 3 <= len(records) < 150 and records <= masks  # every recorded image has its mask
    assert not temporaries(out)
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "interrupted" and run["summary"]["labelled"] == len(records)
    assert len(json.loads((out / "coco.json").read_text())["images"]) == len(records)
    env = {**os.environ, "SEGLABEL_TEST_GATE": str(out.parent / "gate"), "SEGLABEL_TEST_GATE_AFTER": "0"}  # open
    r = subprocess.run(argv + ["--json"], capture_output=True, text=True, timeout=600, env=env)  # the rerun resumes
    summary = json.loads(r.stdout)
    assert r.returncode == 0 and summary["skipped"] == len(records) and summary["labelled"] == 150 - len(records)


@pytest.mark.slow
def test_ctrl_c_finishes_in_flight_images_and_exits_130(tmp_path, small_labelset, tiny_weights):
    out, argv, code, err = stop_mid_run(tmp_path, small_labelset, tiny_weights, signal.SIGINT)
    assert code == 130, err
    assert "(interrupted; run the same command to finish)" in err and "labelled" in err
    check_finished_in_flight_and_resumes(out, argv)


@pytest.mark.slow
def test_sigterm_is_handled_like_ctrl_c_and_exits_143(tmp_path, small_labelset, tiny_weights):
    out, argv, code, err = stop_mid_run(tmp_path, small_labelset, tiny_weights, signal.SIGTERM)
    assert code == 143, err
    assert "(interrupted by SIGTERM; run the same command to finish)" in err
    check_finished_in_flight_and_resumes(out, argv)


@pytest.mark.parametrize("failure", [RuntimeError("DataLoader worker (pid 7) exited unexpectedly"),
                                     ConnectionResetError(104, "Connection reset by peer")])
def test_a_loader_ended_by_the_same_signal_is_the_stop_not_an_error(failure):
    # SIGTERM to a Slurm job reaches the loader process too; when it dies handing over a tensor the
    # parent's fetch fails before the parent acts on its own (held) signal.
    from seglabel.annotate import _until_stopped
    from seglabel.errors import Terminated
    from seglabel.interrupts import _Stop

    def loaded():
        yield "first"
        raise failure

    stop = _Stop()
    images = _until_stopped(loaded(), stop)
    assert next(images) == "first"
    stop.on_signal(signal.SIGTERM, None)
    with pytest.raises(Terminated):
        next(images)
    with pytest.raises(type(failure)):  # with no stop asked for, the failure is the failure
        list(_until_stopped(loaded(), _Stop()))


# -- write errors -----------------------------------------------------------------------------------


def _small_disk():  # the child sees a disk on which no file may exceed 64 bytes
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG from write(), not death by signal
    resource.setrlimit(resource.RLIMIT_FSIZE, (64, 64))


@pytest.mark.slow
def test_full_disk_is_a_clear_error_and_earlier_outputs_stay(tmp_path, small_labelset, tiny_weights):
    photos = tmp_path / "photos"
    write_images(photos, ["a.png", "b.png"])
    out = tmp_path / "out"
    argv = annotate_argv(photos, out, small_labelset, tiny_weights)
    assert subprocess.run(argv).returncode == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    write_images(photos, ["c.png", "d.png"], seed=3)
    r = subprocess.run(argv[:-1], capture_output=True, text=True, preexec_fn=_small_disk)
    assert r.returncode == 1
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("seglabel: error:") and str(out) in line and "cannot write" in line
    assert {p: p.read_bytes() for p in before} == before  # nothing earlier was lost or truncated
    assert not temporaries(out) and not (out / "records" / "c.json").exists()
    assert subprocess.run(argv).returncode == 0  # with room again, the rerun completes
    assert len(json.loads((out / "coco.json").read_text())["images"]) == 4
