"""Write errors name the file and leave the run's status true (issue 22, item 9): under a file-size
limit (`ulimit -f`: writes fail with EFBIG) hit by each file annotate, merge and export write, the
command prints one line naming that file and the cause, exits 1, leaves no half-written file, and
run.json says `failed` with the error (never `running`). A rerun with room finishes the job."""
from __future__ import annotations

import json
import resource
import shutil
import signal
from pathlib import Path

import pytest

from conftest import write_images
from test_annotate_cli import annotate, run


def file_size_limit(limit: int):
    def preexec() -> None:  # in the child, before it starts: no file may grow past ``limit`` bytes
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG from write(), not death by signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return preexec


def files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def the_error(r) -> str:
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("seglabel: error: "), r.stderr
    return lines[0][len("seglabel: error: "):]


# (photos, flags, the file made to fail): each file is the first one written that is larger than the
# limit (its size less one byte): scores and overlays are written before the mask, the mask before
# its record, the records before coco.json, and run.json last.
CASES = [
    ("big", ["--save-scores"], "scores/big.png"),
    ("big", ["--overlay"], "overlays/big.jpg"),
    ("big", [], "masks/big.png"),
    ("big", [], "records/big.json"),
    ("many", [], "coco.json"),
    ("one", [], "run.json"),
]


def make_photos(folder: Path, kind: str) -> Path:
    if kind == "big":
        write_images(folder, ["big.png"], size=(1000, 1400), seed=2)
    elif kind == "many":
        write_images(folder, [f"{i}.png" for i in range(8)])
    else:
        write_images(folder, ["one.png"])
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("kind, flags, target", CASES)
def test_annotate_under_a_file_size_limit(tmp_path, tiny_weights, small_labelset, kind, flags, target):
    photos = make_photos(tmp_path / "photos", kind)
    reference = tmp_path / "reference"
    assert annotate([photos], reference, small_labelset, tiny_weights, "tiny-vit", *flags).returncode == 0
    limit = len(files(reference)[target]) - 1
    if target == "run.json":  # between the record written at the start and the final one (whose
        final = json.loads((reference / "run.json").read_text())  # timings vary by a few bytes)
        start = {k: v for k, v in final.items() if k != "summary"} | {"status": "running"}
        limit = (len(files(reference)[target]) + len(json.dumps(start, indent=2, ensure_ascii=False)) + 1) // 2
    out = tmp_path / "out"
    r = annotate([photos], out, small_labelset, tiny_weights, "tiny-vit", "-q", *flags,
                 preexec_fn=file_size_limit(limit))
    assert r.returncode == 1, r.stderr
    error = the_error(r)
    assert error == f"{out / target}: cannot write (File too large)"
    run_record = json.loads((out / "run.json").read_text())
    assert run_record["status"] == "failed" and run_record["error"] == error
    assert not list(out.rglob("*.tmp"))
    got, ref = files(out), files(reference)
    for name, data in got.items():  # what was written is whole: masks and pictures as the reference's
        if name.endswith((".png", ".jpg")):
            assert data == ref[name], name
        else:
            json.loads(data)
    r = annotate([photos], out, small_labelset, tiny_weights, "tiny-vit", "-q", *flags)
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "run.json").read_text())["status"] == "done"
    assert sorted(files(out)) == sorted(ref)


@pytest.mark.slow
def test_merge_under_a_file_size_limit(tmp_path, tiny_weights, small_labelset):
    photos = make_photos(tmp_path / "photos", "many")
    out = tmp_path / "out"
    for shard in ("0/2", "1/2"):
        assert annotate([photos], out, small_labelset, tiny_weights, "tiny-vit", "--shard", shard).returncode == 0
    reference = tmp_path / "reference"
    shutil.copytree(out, reference)
    assert run("merge", str(reference)).returncode == 0
    limit = len((reference / "coco.json").read_bytes()) - 1
    r = run("merge", str(out), preexec_fn=file_size_limit(limit))
    assert r.returncode == 1
    error = the_error(r)
    assert error == f"{out / 'coco.json'}: cannot write (File too large)"
    run_record = json.loads((out / "run.json").read_text())
    assert run_record["status"] == "failed" and run_record["error"] == error
    assert not (out / "coco.json").exists() and not list(out.rglob("*.tmp"))
    assert run("merge", str(out)).returncode == 0
    assert json.loads((out / "run.json").read_text())["status"] == "done"


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["cvat", "labelstudio", "fiftyone"])
def test_export_under_a_file_size_limit(tmp_path, tiny_weights, small_labelset, fmt):
    photos = make_photos(tmp_path / "photos", "many")
    out = tmp_path / "labels"
    assert annotate([photos], out, small_labelset, tiny_weights).returncode == 0
    reference = tmp_path / "reference"
    assert run("export", str(out), "--format", fmt, "--dest", str(reference)).returncode == 0
    ref = files(reference)
    for target in sorted({name for name in ref if not name.startswith("labels/")} | {"labels/0.png"} & set(ref)):
        limit = len(ref[target]) - 1
        dest = tmp_path / f"dest-{target.replace('/', '-')}"
        r = run("export", str(out), "--format", fmt, "--dest", str(dest), preexec_fn=file_size_limit(limit))
        assert r.returncode == 1, (target, r.stderr)
        error = the_error(r)
        assert error.endswith(": cannot write (File too large)"), error
        named = Path(error.split(": cannot write")[0])
        assert named.parent.is_relative_to(dest) and len(ref[named.relative_to(dest).as_posix()]) > limit
        assert not list(dest.rglob("*.tmp")) if dest.exists() else True
        for name, data in (files(dest) if dest.exists() else {}).items():
            assert data == ref[name], (target, name)  # nothing half-written
