"""Awkward input trees: unreadable files and folders, symlink loops, the output folder inside the
input, file names that are not UTF-8, files that vanish. Each is labelled or reported; none
crashes the run or is skipped without a word."""
from __future__ import annotations

import builtins
import json
import os
import sys
from pathlib import Path

import pytest
from PIL import Image

from conftest import TINY_CONFIGS, write_images
from seglabel import exitcodes
from seglabel.images import ImageError, find_images, load_image, printable
from test_annotate_cli import annotate

LATIN1 = b"caf\xe9.jpg"  # "café.jpg" as an old Latin-1 system wrote it: not UTF-8


def chmod_blocks_reading(path: Path) -> bool:
    """Whether permission bits stop this process (root, and some file systems, ignore them)."""
    try:
        if path.is_dir():
            os.listdir(path)
        else:
            open(path, "rb").close()
        return False
    except PermissionError:
        return True


def bytes_names_supported(folder: Path) -> bool:
    try:
        open(os.path.join(os.fsencode(folder), b"probe-\xff"), "wb").close()
        os.unlink(os.path.join(os.fsencode(folder), b"probe-\xff"))
        return True
    except OSError:
        return False


# -- unreadable files and folders ---------------------------------------------------------------------
def test_unreadable_folder_is_reported_not_skipped_silently(tmp_path, monkeypatch):
    write_images(tmp_path, ["a.jpg", "locked/b.jpg", "z/c.jpg"])
    locked = str(tmp_path / "locked")
    real_scandir = os.scandir

    def scandir(path="."):
        if os.fspath(path) == locked:
            raise PermissionError(13, "Permission denied", locked)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)  # what os.walk meets in a chmod 000 folder
    found = find_images([tmp_path])
    assert [i.rel for i in found.items] == ["a.jpg", "z/c.jpg"]
    assert [(p.path, p.reason) for p in found.problems] == [
        (locked, "cannot read folder (Permission denied); its images were not labelled")]


def as_unprivileged(fn):
    """``fn()`` run in a forked child that has dropped root, so permission bits apply; returns what
    it returns (JSON-able). Without root, ``fn()`` runs here."""
    if os.geteuid() != 0:
        return fn()
    import PIL.JpegImagePlugin  # noqa: F401 - imported before the fork: the child may not read them
    import PIL.PngImagePlugin  # noqa: F401

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 0
        try:
            os.close(read)
            os.setgid(65534)
            os.setuid(65534)
            result = json.dumps({"ok": fn()})
        except BaseException as e:  # noqa: BLE001 - sent to the parent, which fails the test
            result, code = json.dumps({"error": f"{type(e).__name__}: {e}"}), 1
        with os.fdopen(write, "w") as f:
            f.write(result)
        os._exit(code)
    os.close(write)
    with os.fdopen(read) as f:
        data = json.loads(f.read() or '{"error": "no answer"}')
    os.waitpid(pid, 0)
    assert "error" not in data, data["error"]
    return data["ok"]


@pytest.fixture
def shared_tmp():
    """A folder another user can enter (pytest's own are private to root)."""
    import shutil
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="seglabel-perm-"))
    folder.chmod(0o755)
    yield folder
    for p in folder.rglob("*"):
        if not p.is_symlink():
            p.chmod(0o755)
    shutil.rmtree(folder)


def test_unreadable_folder_and_file_for_real(shared_tmp):
    write_images(shared_tmp, ["a.jpg", "locked/b.jpg", "c.jpg"])
    (shared_tmp / "locked").chmod(0)
    (shared_tmp / "c.jpg").chmod(0)

    def look():
        if not chmod_blocks_reading(shared_tmp / "locked"):
            return None
        found = find_images([shared_tmp])
        try:
            load_image(shared_tmp / "c.jpg")
            error = None
        except ImageError as e:
            error = str(e)
        return {"items": [i.rel for i in found.items], "problems": [str(p) for p in found.problems], "error": error}

    seen = as_unprivileged(look)
    if seen is None:
        pytest.skip("permission bits do not stop reading here")
    assert seen["items"] == ["a.jpg", "c.jpg"]
    assert seen["problems"] == [f"{shared_tmp}/locked: cannot read folder (Permission denied); its images were not labelled"]
    assert seen["error"] == f"{shared_tmp}/c.jpg: cannot read (permission denied)"


def test_unreadable_file(tmp_path, monkeypatch):
    [path] = write_images(tmp_path, ["a.jpg"])
    real_open = builtins.open

    def guarded_open(file, *args, **kwargs):
        if os.fspath(file) == str(path):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded_open)  # what a chmod 000 file gives a non-root user
    with pytest.raises(ImageError) as err:
        load_image(path)
    assert str(err.value) == f"{path}: cannot read (permission denied)"


# -- symbolic links -------------------------------------------------------------------------------------
def test_symlink_loops_end_and_nothing_is_listed_twice(tmp_path):
    root = tmp_path / "photos"
    write_images(root, ["a.jpg", "d/b.jpg", "d/e/c.jpg"])
    (root / "d" / "self").symlink_to(root / "d")  # a loop onto itself
    (root / "d" / "e" / "up").symlink_to(root)  # a loop through the root
    (root / "d" / "e" / "f").mkdir()
    (root / "d" / "e" / "f" / "back").symlink_to(root / "d" / "e")  # a longer loop
    (root / "a-link").symlink_to(root / "d")  # sorts first, but d's images keep their own names
    outside = tmp_path / "elsewhere"
    write_images(outside, ["x.jpg"])
    (root / "linked").symlink_to(outside)  # a linked folder is followed...
    (root / "linked2").symlink_to(outside)  # ...once, however many links lead to it
    (outside / "again").symlink_to(outside)  # a loop outside the tree
    found = find_images([root])
    assert [i.rel for i in found.items] == ["a.jpg", "d/b.jpg", "d/e/c.jpg", "linked/x.jpg"]
    assert found.problems == []


def test_broken_symlink_and_vanished_file(tmp_path):
    (tmp_path / "broken.jpg").symlink_to(tmp_path / "gone.jpg")
    with pytest.raises(ImageError, match="broken symbolic link"):
        load_image(tmp_path / "broken.jpg")
    [path] = write_images(tmp_path, ["v.jpg"])
    assert [i.rel for i in find_images([tmp_path]).items] == ["broken.jpg", "v.jpg"]
    path.unlink()  # gone between listing and reading
    with pytest.raises(ImageError) as err:
        load_image(path)
    assert str(err.value) == f"{path}: vanished before it could be read"


def test_folder_vanishing_during_the_walk(tmp_path, monkeypatch):
    write_images(tmp_path, ["a.jpg", "gone/b.jpg"])
    gone = str(tmp_path / "gone")
    real_scandir = os.scandir

    def scandir(path="."):
        if os.fspath(path) == gone:
            raise FileNotFoundError(2, "No such file or directory", gone)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    found = find_images([tmp_path])
    assert [i.rel for i in found.items] == ["a.jpg"]
    assert [p.path for p in found.problems] == [gone] and "No such file" in found.problems[0].reason


# -- the output folder inside the input ---------------------------------------------------------------------
def test_output_folder_inside_input_is_excluded(tmp_path):
    photos = tmp_path / "photos"
    write_images(photos, ["a.jpg", "labels/masks/a.png", "labels/overlays/a.jpg", "sub/b.jpg"])
    (photos / "sub" / "to-out").symlink_to(photos / "labels")  # reaching it through a link too
    found = find_images([photos], exclude=[photos / "labels"])
    assert [i.rel for i in found.items] == ["a.jpg", "sub/b.jpg"]


def test_output_folder_is_the_input_folder(tmp_path):
    """``--out`` = the photo folder: its photos are labelled, seglabel's own outputs are not."""
    photos = tmp_path / "photos"
    write_images(photos, ["a.jpg", "trip/b.jpg", "masks/a.png", "overlays/a.jpg", "scores/a.png",
                          "records/x.png"])
    found = find_images([photos], exclude=[photos])
    assert [i.rel for i in found.items] == ["a.jpg", "trip/b.jpg"]
    found = find_images([photos / "trip"], exclude=[photos])  # input inside the output folder
    assert [i.rel for i in found.items] == ["b.jpg"]


# -- names that are not UTF-8 ---------------------------------------------------------------------------------
def test_non_utf8_name_is_reported_with_a_printable_path(tmp_path):
    if not bytes_names_supported(tmp_path):
        pytest.skip("this file system stores only UTF-8 names")
    write_images(tmp_path, ["ok.jpg"])
    Image.new("RGB", (8, 8)).save(os.path.join(os.fsencode(tmp_path), LATIN1), format="JPEG")
    found = find_images([tmp_path])
    assert [i.rel for i in found.items] == ["ok.jpg"]
    [problem] = found.problems
    assert problem.path == f"{tmp_path}/caf\\xe9.jpg"
    assert "not valid UTF-8" in problem.reason
    json.dumps([problem.path, str(problem)], ensure_ascii=False).encode("utf-8")  # can be written and printed
    assert printable(os.fsdecode(b"/x/caf\xe9.jpg")) == "/x/caf\\xe9.jpg" and printable("/x/café") == "/x/café"


# -- through the command line ---------------------------------------------------------------------------------
def test_bad_tree_through_the_cli(tmp_path, tiny_weights, small_labelset):
    photos = tmp_path / "photos"
    write_images(photos, ["a.jpg", "d/b.jpg"])
    (photos / "d" / "loop").symlink_to(photos)
    (photos / "broken.jpg").symlink_to(photos / "nowhere.jpg")
    odd = bytes_names_supported(tmp_path)
    if odd:
        Image.new("RGB", (8, 8)).save(os.path.join(os.fsencode(photos), LATIN1), format="JPEG")
    out = photos / "labels"  # inside the input, with images in it (as a previous run leaves)
    write_images(out, ["masks/old.png", "overlays/old.jpg"])
    (out / "run.json").write_text('{"seglabel_version": "0.1.0", "status": "interrupted"}')  # seglabel's, then
    r = annotate([photos], out, small_labelset, tiny_weights, "tiny-vit", "--json", "--overlay")
    assert r.returncode == exitcodes.FAILURES, r.stderr
    assert "Traceback" not in r.stderr
    summary = json.loads(r.stdout)
    reasons = {f["path"]: f["reason"] for f in summary["failures"]}
    expected = {str(photos / "broken.jpg")} | ({f"{photos}/caf\\xe9.jpg"} if odd else set())
    assert set(reasons) == expected, reasons
    assert "broken symbolic link" in reasons[str(photos / "broken.jpg")]
    if odd:
        assert "not valid UTF-8" in reasons[f"{photos}/caf\\xe9.jpg"]
    assert summary["total"] == 2 + len(expected)  # nothing from labels/ nor twice through the loop
    assert summary["labelled"] == 2
    coco = json.loads((out / "coco.json").read_text(encoding="utf-8"))
    assert [i["file_name"] for i in coco["images"]] == ["a.jpg", "d/b.jpg"]
    run_record = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert len(run_record["summary"]["failures"]) == len(expected)


def test_file_vanishing_during_the_run(tmp_path, tiny_weights, small_labelset):
    """Listed, then deleted before it is read: reported for that file, the others labelled."""
    from seglabel.annotate import AnnotateConfig, annotate as run_annotate
    from seglabel.labelset import load_labelset
    from seglabel.models.registry import load_segmenter
    from seglabel.predict import Protocol

    photos = tmp_path / "photos"
    write_images(photos, ["a.jpg", "b.jpg", "c.jpg"])
    found = find_images([photos])
    (photos / "b.jpg").unlink()
    labelset = load_labelset(small_labelset)
    model = load_segmenter("maskclip:tiny-vit", labelset, pretrained=str(tiny_weights["tiny-vit"]),
                           model_config=str(TINY_CONFIGS["tiny-vit"]), device="cpu")
    summary = run_annotate(found.items, model, labelset, AnnotateConfig(out=tmp_path / "out",
                           protocol=Protocol(short_side=64)), found.problems)
    assert summary.failures == [(str(photos / "b.jpg"), "vanished before it could be read")]
    assert summary.labelled == 2 and summary.exit_code == exitcodes.FAILURES
    assert sorted(p.name for p in (tmp_path / "out" / "masks").iterdir()) == ["a.png", "c.png"]


@pytest.mark.skipif(sys.platform != "linux", reason="bytes file names are a Linux matter")
def test_printable_handles_bytes_paths():
    assert printable(b"/x/caf\xe9.jpg") == "/x/caf\\xe9.jpg"
