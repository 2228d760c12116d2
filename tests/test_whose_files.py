"""Whose files are these (issue 22, items 1, 2, 7, 8): `--out` holding files seglabel did not write,
seglabel's own outputs found under an input, list files as pipelines write them, and `-q` that
still names every failure. Through the real CLI where the user meets it."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import write_images
from seglabel.images import find_images, read_lines
from test_annotate_cli import annotate, run
from test_integrity import one_error_line


def tree(folder: Path) -> dict[str, bytes | None]:
    """Every path under ``folder``: files with their bytes, folders as None."""
    return {p.relative_to(folder).as_posix(): (p.read_bytes() if p.is_file() else None)
            for p in sorted(folder.rglob("*"))}


# -- 1: --out already holds files seglabel did not write ------------------------------------------------
@pytest.mark.slow
def test_an_out_with_foreign_files_under_our_names_is_refused_and_left_as_it_was(tmp_path, tiny_weights,
                                                                                 small_labelset):
    dataset = tmp_path / "dataset"
    write_images(dataset / "images", ["a.jpg", "b.jpg"])
    (dataset / "masks").mkdir()
    Image.fromarray(np.ones((40, 56), dtype=np.uint8)).save(dataset / "masks" / "a.png")  # ground truth
    (dataset / "coco.json").write_text('{"images": [], "info": {"description": "another tool"}}')
    before = tree(dataset)
    for extra in ([], ["--dry-run"], ["--overwrite"]):
        r = annotate([dataset / "images"], dataset, small_labelset, tiny_weights, "tiny-vit", *extra)
        assert r.returncode == 2, r.stderr
        line = one_error_line(r)
        assert f"--out {dataset}" in line and "masks/" in line and "coco.json" in line and "another --out" in line
        assert tree(dataset) == before  # not a byte changed, no lock file, no new folder

    r = annotate([dataset / "images"], dataset / "seglabel", small_labelset, tiny_weights)  # as the line says
    assert r.returncode == 0, r.stderr
    # A folder seglabel wrote stays usable: its run.json, or (run.json deleted) its records, say so.
    (dataset / "seglabel" / "run.json").unlink()
    r = annotate([dataset / "images"], dataset / "seglabel", small_labelset, tiny_weights, "tiny-vit", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["skipped"] == 2, r.stderr


def test_an_out_with_only_other_files_or_empty_folders_is_used(tmp_path, tiny_weights, small_labelset):
    photos = tmp_path / "photos"
    write_images(photos, ["a.jpg"])
    (photos / "notes.txt").write_text("mine")
    (photos / "masks").mkdir()  # empty: nothing to lose
    r = annotate([photos], photos, small_labelset, tiny_weights)  # --out is the input folder
    assert r.returncode == 0, r.stderr
    assert (photos / "notes.txt").read_text() == "mine" and (photos / "masks" / "a.png").is_file()


def test_merge_refuses_a_folder_that_holds_no_seglabel_run(tmp_path):
    folder = tmp_path / "experiments"
    (folder / "runs").mkdir(parents=True)
    (folder / "runs" / "lr-0.1.json").write_text('{"lr": 0.1, "loss": 0.3}')
    (folder / "coco.json").write_text('{"images": []}')
    before = tree(folder)
    r = run("merge", str(folder))
    assert r.returncode == 2 and "not written by seglabel" in one_error_line(r)
    assert tree(folder) == before


# -- 2: an input tree that holds seglabel's own output -------------------------------------------------
@pytest.mark.slow
def test_outputs_under_an_input_are_skipped_and_counted(tmp_path, tiny_weights, small_labelset):
    photos = tmp_path / "photos"
    write_images(photos, ["a.jpg", "x/b.jpg"])
    first = photos / "labels"
    assert annotate([photos], first, small_labelset, tiny_weights, "tiny-vit", "--overlay",
                    "--save-scores").returncode == 0
    assert annotate([photos], photos, small_labelset, tiny_weights).returncode == 0  # --out = the input, too

    r = annotate([photos], photos / "labels_v2", small_labelset, tiny_weights, "tiny-vit", "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert (summary["labelled"], summary["total"]) == (2, 2)
    skipped = [str(first / s) for s in ("masks", "overlays", "records", "scores")] + \
              [str(photos / s) for s in ("masks", "records")]
    assert summary["skipped_outputs"] == sorted(skipped)
    coco = json.loads((photos / "labels_v2" / "coco.json").read_text())
    assert [i["file_name"] for i in coco["images"]] == ["a.jpg", "x/b.jpg"]

    # Without --json the summary says it, in one line.
    r = annotate([photos], photos / "labels_v2", small_labelset, tiny_weights)
    assert r.returncode == 0 and "6 seglabel output folders under the inputs were skipped" in r.stderr, r.stderr

    # A list as `find photos -name '*.jpg'` writes it holds the overlays (JPEGs) too.
    listing = "".join(f"{p}\n" for p in sorted(photos.rglob("*.jpg")))
    assert "overlays" in listing
    r = annotate([], tmp_path / "v3", small_labelset, tiny_weights, "tiny-vit", "--from-list", "-", "--root",
                 str(photos), "--json", stdin=listing)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["labelled"] == 2 and summary["skipped_outputs"] == [str(first / "overlays")]


def test_find_images_reports_the_output_folders_it_left_out(tmp_path):
    write_images(tmp_path, ["a.jpg", "run/masks/a.png", "run/overlays/a.jpg", "masks/b.png"])
    (tmp_path / "run" / "run.json").write_text('{"seglabel_version": "0.1.0", "status": "done"}')
    found = find_images([tmp_path])
    assert [i.rel for i in found.items] == ["a.jpg", "masks/b.png"]  # masks/ of a folder that is no run: photos
    assert found.skipped_outputs == [str(tmp_path / "run" / "masks"), str(tmp_path / "run" / "overlays")]


# -- 7: --from-list as pipelines write it ----------------------------------------------------------------
def test_a_list_with_a_byte_order_mark_and_crlf_line_ends(tmp_path):
    write_images(tmp_path / "data", ["a.jpg", "b c.jpg"])
    listing = tmp_path / "list.txt"
    listing.write_bytes("\ufeffa.jpg\r\nb c.jpg\r\n# a comment\r\n\r\n".encode("utf-8"))
    found = find_images(listed=read_lines(str(listing)), root=tmp_path / "data")
    assert [i.rel for i in found.items] == ["a.jpg", "b c.jpg"] and found.problems == []


def test_a_list_with_a_byte_order_mark_on_stdin(tmp_path, tiny_weights, small_labelset):
    write_images(tmp_path / "data", ["a.jpg"])
    r = annotate([], tmp_path / "out", small_labelset, tiny_weights, "tiny-vit", "--from-list", "-", "--root",
                 str(tmp_path / "data"), "--json", stdin="\ufeffa.jpg\r\n")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["labelled"] == 1


def test_entries_and_root_spelled_through_symbolic_links(tmp_path):
    write_images(tmp_path / "real", ["x/a.jpg"])
    (tmp_path / "link").symlink_to(tmp_path / "real")
    spellings = [(tmp_path / "link", tmp_path / "real" / "x" / "a.jpg"),  # the root through a link
                 (tmp_path / "real", tmp_path / "link" / "x" / "a.jpg"),  # the entry through one
                 (tmp_path / "link", "x/a.jpg"), (tmp_path / "real", "x/a.jpg")]
    for root, entry in spellings:
        found = find_images(listed=[str(entry)], root=root)
        assert found.problems == [] and [i.rel for i in found.items] == ["x/a.jpg"], (root, entry)
    found = find_images([tmp_path / "real" / "x"], root=tmp_path / "link")  # a folder given, too
    assert [i.rel for i in found.items] == ["x/a.jpg"]


def test_listed_urls_mirror_their_bucket_or_host_and_path(tmp_path):
    """A URL in a list is read through the storage layer (tests/test_remote_inputs.py); its output
    path mirrors it as a local path does, and a local --root cannot hold it."""
    write_images(tmp_path, ["a.jpg"])
    urls = ["https://example.org/photos/a.jpg", "s3://bucket/key/b.jpg"]
    found = find_images(listed=urls)
    assert [(i.path, i.rel) for i in found.items] == [("s3://bucket/key/b.jpg", "bucket/key/b.jpg"),
                                                      ("https://example.org/photos/a.jpg", "example.org/photos/a.jpg")]
    found = find_images(listed=urls, root=tmp_path)
    assert found.items == []
    assert [(p.path, p.reason) for p in found.problems] == [
        (u, f"listed, but not inside --root {tmp_path} (a URL)") for u in urls]


def test_list_problems_name_the_entry_as_written(tmp_path):
    found = find_images(listed=["sub/gone.jpg"], root=tmp_path)
    assert [p.path for p in found.problems] == ["sub/gone.jpg"]
    assert str(tmp_path / "sub" / "gone.jpg") in found.problems[0].reason


# -- 8: quiet is not silent about failures ---------------------------------------------------------------
@pytest.mark.slow
def test_quiet_still_names_each_failed_image(tmp_path, tiny_weights, small_labelset):
    photos = tmp_path / "photos"
    write_images(photos, ["good.jpg"])
    (photos / "bad.jpg").write_text("not an image")
    r = annotate([photos], tmp_path / "out", small_labelset, tiny_weights, "tiny-vit", "-q")
    assert r.returncode == 3
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "bad.jpg: not an image" in lines[0], r.stderr
    r = annotate([photos], tmp_path / "out", small_labelset, tiny_weights, "tiny-vit", "-q", "--json")
    assert r.returncode == 3 and "bad.jpg" in r.stderr
    assert [Path(f["path"]).name for f in json.loads(r.stdout)["failures"]] == ["bad.jpg"]


@pytest.mark.parametrize("name", ["bad\nname.jpg"])
def test_quiet_failure_lines_stay_one_line_each(tmp_path, tiny_weights, small_labelset, name):
    photos = tmp_path / "photos"
    write_images(photos, ["good.jpg"])
    (photos / name).write_text("not an image")
    r = annotate([photos], tmp_path / "out", small_labelset, tiny_weights, "tiny-vit", "--quiet")
    assert r.returncode == 3 and r.stderr.strip().splitlines() == [
        f"failed: {photos}/bad\\nname.jpg: not an image PIL can read (unrecognised content)"]
    assert os.path.isfile(tmp_path / "out" / "masks" / "good.png")
