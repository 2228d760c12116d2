"""Runs against a real S3 API (moto's server on 127.0.0.1, tests/s3server.py), through the real
CLI: a bucket of photos labelled into another bucket, killed mid-way and resumed from a second
process; shards into one prefix, then merge; WebDataset shards as input; and a missing bucket,
missing credentials, a 403 and dropped connections, each one line with nothing lost (issue 24)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from conftest import TINY_CONFIGS, gated_seglabel, write_images
from test_annotate_cli import annotate, run
from test_runs import wait_for

NAMES = [f"{d}/{i:02d}.png" for d in ("x", "y") for i in range(6)]


def upload(s3, folder: Path, bucket: str, prefix: str) -> None:
    client = s3.client()
    client.create_bucket(Bucket=bucket)
    for p in sorted(folder.rglob("*.*")):
        client.upload_file(str(p), bucket, f"{prefix}/{p.relative_to(folder).as_posix()}")


def objects(s3, bucket: str, prefix: str = "") -> dict[str, bytes]:
    """Every object under ``prefix`` (hidden names too): key relative to it -> bytes."""
    client, found = s3.client(), {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            try:
                body = client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
            except client.exceptions.NoSuchKey:  # deleted since listed (a probe, a released lease)
                continue
            found[item["Key"][len(prefix):].lstrip("/")] = body
    return found


def local_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
            and not p.name.startswith(".")}


def coco(data: bytes) -> dict:
    found = json.loads(data)
    found["info"].pop("date_created")  # when the run started
    return found


def same_labels(bucket: dict[str, bytes], local: dict[str, bytes]) -> None:
    """The masks and overlays byte for byte, and coco.json, of a run in a bucket and a local one."""
    pick = lambda files: {k: v for k, v in files.items() if k.startswith(("masks/", "overlays/"))}  # noqa: E731
    assert pick(bucket) == pick(local) and pick(local)
    assert coco(bucket["coco.json"]) == coco(local["coco.json"])
    assert sorted(k for k in bucket if k.startswith("records/")) == sorted(k for k in local if k.startswith("records/"))


def one_line_error(r: subprocess.CompletedProcess) -> str:
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("seglabel: error: "), r.stderr
    return lines[0]


@pytest.fixture
def photos(tmp_path) -> Path:
    folder = tmp_path / "photos"
    write_images(folder, NAMES, size=(48, 64))
    return folder


@pytest.mark.slow
def test_bucket_to_bucket_killed_and_resumed_from_a_second_process_equals_a_local_run(
        s3, tmp_path, photos, small_labelset, tiny_weights):
    local = tmp_path / "local"
    assert annotate([photos], local, small_labelset, tiny_weights, "tiny-vit", "--overlay").returncode == 0
    upload(s3, photos, "photos", "set")
    s3.client().create_bucket(Bucket="labels")
    client = s3.client()
    records = lambda: client.list_objects_v2(Bucket="labels", Prefix="run/records/").get("KeyCount", 0)  # noqa: E731

    # The first process: killed (SIGKILL, with its loader processes) once 3 images are done; the 5th
    # waits at a gate that never opens, so it cannot finish first.
    argv = ["annotate", "s3://photos/set", "--labels", str(small_labelset), "--out", "s3://labels/run",
            "--model", "maskclip:tiny-vit", "--model-config", str(TINY_CONFIGS["tiny-vit"]),
            "--pretrained", str(tiny_weights["tiny-vit"]), "--short-side", "64", "--overlay", "--workers", "1"]
    env = {**os.environ, "SEGLABEL_TEST_GATE": str(tmp_path / "never"), "SEGLABEL_TEST_GATE_AFTER": "4"}
    proc = subprocess.Popen([*gated_seglabel("seglabel.annotate:_write_image"), *argv], env=env,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: records() >= 3, proc, "3 labelled images in the bucket")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    first = objects(s3, "labels", "run/")
    done = {k for k in first if k.startswith("records/")}
    assert 3 <= len(done) < len(NAMES) and "coco.json" not in first
    assert all(f"masks/{k[len('records/'):-5]}.png" in first for k in done)  # a record only after its mask
    assert json.loads(first["run.json"])["status"] == "running"  # as after a SIGKILL on a disk

    # The second process (a new one, as on another machine) resumes: what is done is skipped.
    r = run(*argv, "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["skipped"] == len(done) and summary["labelled"] == len(NAMES) - len(done)
    bucket = objects(s3, "labels", "run/")
    same_labels(bucket, local_files(local))
    assert json.loads(bucket["run.json"])["status"] == "done"
    assert not [k for k in bucket if k.split("/")[-1].startswith(".")]  # no lease left, no temporaries
    for key in done:  # the records of the first process stand (nothing was redone)
        assert bucket[key] == first[key]


@pytest.mark.slow
def test_shards_into_one_prefix_at_once_then_merge_equal_a_local_run(s3, tmp_path, photos, small_labelset,
                                                                     tiny_weights):
    local = tmp_path / "local"
    assert annotate([photos], local, small_labelset, tiny_weights).returncode == 0
    upload(s3, photos, "photos", "set")
    s3.client().create_bucket(Bucket="labels")
    from test_runs import annotate_argv

    shards = [subprocess.Popen(annotate_argv("s3://photos/set", "s3://labels/run", small_labelset, tiny_weights)[:-2]
                               + ["--shard", f"{i}/3", "--quiet"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True) for i in range(3)]
    for proc in shards:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
    parts = objects(s3, "labels", "run/")
    assert sorted(k for k in parts if k.startswith("runs/") and k.endswith(".json")) == [
        f"runs/shard-{i}-of-3.json" for i in range(3)]
    assert "coco.json" not in parts  # left to merge
    r = run("merge", "s3://labels/run")
    assert r.returncode == 0, r.stderr
    assert "s3://labels/run/coco.json" in r.stderr
    bucket = objects(s3, "labels", "run/")
    same_labels(bucket, local_files(local))
    merged = json.loads(bucket["run.json"])
    assert merged["status"] == "done" and merged["summary"]["images"] == len(NAMES)


@pytest.mark.slow
def test_listed_urls_under_a_url_root_and_webdataset_shards_give_the_paths_of_a_folder(
        s3, tmp_path, photos, small_labelset, tiny_weights):
    local = tmp_path / "local"
    assert annotate([photos], local, small_labelset, tiny_weights).returncode == 0
    upload(s3, photos, "photos", "set")
    listed = "\n".join(["# photos, relative to --root, one as a whole URL", *NAMES[:-1], "x/missing.png",
                        f"s3://photos/set/{NAMES[-1]}"])
    r = run("annotate", "--from-list", "-", "--root", "s3://photos/set", "--labels", str(small_labelset),
            "--out", str(tmp_path / "listed"), "--model", "maskclip:tiny-vit", "--model-config",
            str(TINY_CONFIGS["tiny-vit"]), "--pretrained", str(tiny_weights["tiny-vit"]),
            "--short-side", "64", "--json", stdin=listed + "\n")
    assert r.returncode == 3, r.stderr  # the missing photo is that image's failure; the rest are labelled
    summary = json.loads(r.stdout)
    assert [f["path"] for f in summary["failures"]] == ["s3://photos/set/x/missing.png"]
    assert "not found" in summary["failures"][0]["reason"]
    got = local_files(tmp_path / "listed")
    assert {k: v for k, v in got.items() if k.startswith("masks/")} == {
        k: v for k, v in local_files(local).items() if k.startswith("masks/")}

    # The same photos as WebDataset tar shards (keys x/00 ... with a .png field), local and in a bucket.
    for i, d in enumerate(("x", "y")):
        with tarfile.open(tmp_path / f"shard-{i:04d}.tar", "w") as tar:
            for name in NAMES:
                if name.startswith(d):
                    tar.add(photos / name, arcname=name)
    s3.client().upload_file(str(tmp_path / "shard-0001.tar"), "photos", "shards/shard-0001.tar")
    r = annotate([tmp_path / "shard-0000.tar", "s3://photos/shards/shard-0001.tar"], tmp_path / "tars",
                 small_labelset, tiny_weights)
    assert r.returncode == 0, r.stderr
    got = local_files(tmp_path / "tars")
    assert {k: v for k, v in got.items() if k.startswith("masks/")} == {
        k: v for k, v in local_files(local).items() if k.startswith("masks/")}


@pytest.mark.slow
def test_store_errors_are_one_line_and_lose_nothing(s3, tmp_path, photos, small_labelset, tiny_weights, monkeypatch):
    import s3fs
    from s3server import DroppingProxy

    upload(s3, photos, "photos", "set")
    s3.client().create_bucket(Bucket="labels")
    go = lambda inputs="s3://photos/set", out="s3://labels/run", env=None: annotate(  # noqa: E731
        [inputs], out, small_labelset, tiny_weights, env=env)
    assert go().returncode == 0
    before = objects(s3, "labels")

    line = one_line_error(r := go(out="s3://no-such-bucket/run"))
    assert r.returncode == 2 and "s3://no-such-bucket/run" in line and "bucket does not exist" in line
    line = one_line_error(r := go(inputs="s3://no-such-bucket/photos"))
    assert r.returncode == 2 and "s3://no-such-bucket/photos" in line and "bucket does not exist" in line

    no_keys = {k: v for k, v in os.environ.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    r = subprocess.run([sys.executable, "-m", "seglabel", "annotate", "s3://photos/set", "--labels",
                        str(small_labelset), "--out", "s3://labels/run", "--model", "maskclip:tiny-vit"],
                        capture_output=True, text=True, env=no_keys, timeout=600)
    line = one_line_error(r)
    assert r.returncode == 2 and "no credentials found" in line and "AWS_ACCESS_KEY_ID" in line

    s3.auth(True)  # the server checks credentials: the test keys are unknown to it
    line = one_line_error(r := go())
    s3.auth(False)
    assert r.returncode == 2 and "access denied" in line

    proxy = DroppingProxy(s3.port, drop=None)  # every connection dropped
    try:
        r = go(env={"AWS_ENDPOINT_URL": proxy.endpoint, "SEGLABEL_STORAGE_TRIES": "2",
                    "SEGLABEL_STORAGE_BACKOFF": "0.01", "AWS_MAX_ATTEMPTS": "1"})
    finally:
        proxy.close()
    line = one_line_error(r)
    assert r.returncode == 2 and "connection failed" in line and "gave up after 2 tries" in line

    assert objects(s3, "labels") == before  # every refusal left the labels as they were
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.mark.slow
def test_dropped_connections_are_retried_and_the_run_completes(s3, tmp_path, photos, small_labelset, tiny_weights):
    from s3server import DroppingProxy

    local = tmp_path / "local"
    assert annotate([photos], local, small_labelset, tiny_weights).returncode == 0
    upload(s3, photos, "photos", "set")
    s3.client().create_bucket(Bucket="labels")
    proxy = DroppingProxy(s3.port, drop=3)  # the first three connections dropped, then forwarded
    try:
        r = annotate(["s3://photos/set"], "s3://labels/run", small_labelset, tiny_weights,
                     env={"AWS_ENDPOINT_URL": proxy.endpoint, "SEGLABEL_STORAGE_TRIES": "5",
                          "SEGLABEL_STORAGE_BACKOFF": "0.01", "AWS_MAX_ATTEMPTS": "1"})
    finally:
        proxy.close()
    assert r.returncode == 0, r.stderr
    assert proxy.connections > 3
    same_labels(objects(s3, "labels", "run/"), local_files(local))


@pytest.mark.slow
def test_readers_take_a_run_in_a_bucket(s3, tmp_path, photos, small_labelset, tiny_weights):
    """export, preview and distill --pseudo read a run from its URL as from its folder; outputs
    that must be local (pages, exports) are refused in one line without a local --dest."""
    local = tmp_path / "local"
    assert annotate([photos], local, small_labelset, tiny_weights).returncode == 0
    upload(s3, photos, "photos", "set")
    s3.client().create_bucket(Bucket="labels")
    assert annotate(["s3://photos/set"], "s3://labels/run", small_labelset, tiny_weights).returncode == 0
    before = objects(s3, "labels")

    for source, dest in (("s3://labels/run", tmp_path / "from-bucket"), (str(local), tmp_path / "from-folder")):
        r = run("export", source, "--format", "webdataset", "--dest", str(dest))
        assert r.returncode == 0, r.stderr
    tars = sorted((tmp_path / "from-folder").glob("*.tar"))
    assert tars
    for tar in tars:
        with tarfile.open(tar) as a, tarfile.open(tmp_path / "from-bucket" / tar.name) as b:
            assert [(m.name, a.extractfile(m).read()) for m in a.getmembers()] == [
                (m.name, b.extractfile(m).read()) for m in b.getmembers()]  # photos, masks and records alike

    r = run("preview", "s3://labels/run", "--dest", str(tmp_path / "pages"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "pages" / "index.html").is_file() and f"{len(NAMES)} drawn" in r.stderr
    for argv in (("preview", "s3://labels/run"), ("export", "s3://labels/run", "--format", "cvat"),
                 ("export", "s3://labels/run", "--format", "cvat", "--dest", "s3://labels/exported"),
                 ("eval", "--pred", "s3://labels/run", "--gt", str(local / "masks")),
                 ("import", str(tmp_path / "tasks.json"), "--into", "s3://labels/run")):
        r = run(*argv, cwd=tmp_path)
        assert r.returncode == 2 and "s3://labels/" in one_line_error(r), argv
    assert not (tmp_path / "s3:").exists()  # a URL is never taken for a local path

    student = tmp_path / "student"
    r = run("distill", "--pseudo", "s3://labels/run", "--images", str(photos), "--teacher", "none",
            "--clip", "tiny-vit", "--model-config", str(TINY_CONFIGS["tiny-vit"]), "--pretrained",
            str(tiny_weights["tiny-vit"]), "--out", str(student), "--depth", "18", "--width", "8", "--iters", "2",
            "--batch-size", "2", "--crop", "32", "--base-size", "48", "--workers", "0", "--device", "cpu", "--quiet")
    assert r.returncode == 0, r.stderr
    assert local_files(student / "pseudo" / "masks") == local_files(local / "masks")
    assert (student / "student.pt").is_file()
    assert objects(s3, "labels") == before  # readers change nothing in the bucket


@pytest.mark.slow
def test_the_ray_annotator_labels_a_bucket_into_a_bucket(s3, tmp_path, photos, small_labelset, tiny_weights):
    """seglabel.ray's rows and Annotator with URLs (called as map_batches calls it; Ray itself is
    not needed for that, test_ray.py runs it under Ray)."""
    import numpy as np

    from seglabel.annotate import merge
    from seglabel.predict import Protocol
    from seglabel.ray import Annotator, list_images

    local = tmp_path / "local"
    assert annotate([photos], local, small_labelset, tiny_weights).returncode == 0
    upload(s3, photos, "photos", "set")
    s3.client().create_bucket(Bucket="labels")
    rows = list_images(["s3://photos/set"], out="s3://labels/ray")
    assert [r["path"] for r in rows] == [f"s3://photos/set/{n}" for n in NAMES]
    annotator = Annotator("s3://labels/ray", str(small_labelset), "maskclip:tiny-vit",
                          pretrained=str(tiny_weights["tiny-vit"]), model_config=str(TINY_CONFIGS["tiny-vit"]),
                          protocol=Protocol(short_side=64), device="cpu")
    for start in range(0, len(rows), 5):
        batch = {k: np.asarray([r[k] for r in rows[start:start + 5]]) for k in ("path", "rel")}
        assert set(annotator(batch)["status"]) == {"done"}
    assert merge("s3://labels/ray") == len(NAMES)
    same_labels(objects(s3, "labels", "ray/"), local_files(local))
