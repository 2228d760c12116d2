"""Flags that take a local folder only refuse a URL in one line (exit 2) and create nothing: typer's
``Path`` would otherwise turn ``s3://bucket/x`` into a local folder ``s3:/bucket/x``."""
from __future__ import annotations

import pytest

from test_annotate_cli import run
from test_integrity import one_error_line


@pytest.mark.parametrize("flag, args", [
    ("--images", ["distill", "--pseudo", "masks", "--images", "s3://bucket/photos", "--out", "run"]),
    ("--out", ["distill", "--pseudo", "masks", "--images", "photos", "--out", "s3://bucket/run"]),
    ("--val-images", ["distill", "--pseudo", "masks", "--images", "photos", "--out", "run",
                      "--val-images", "gs://bucket/val"]),
    ("--images", ["import", "export.json", "--into", "run", "--images", "s3://bucket/photos"]),
])
def test_a_url_for_a_local_folder_is_refused_and_nothing_is_created(tmp_path, flag, args):
    (tmp_path / "masks").mkdir()
    (tmp_path / "photos").mkdir()
    (tmp_path / "export.json").write_text("[]")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    r = run(*args, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    line = one_error_line(r)
    assert line.startswith(f"seglabel: error: {flag} ") and "must be a local folder" in line, line
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # no "s3:" folder, no run folder
