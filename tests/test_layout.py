"""layout.is_run_folder: what seglabel wrote is recognised; other folders are not."""
from __future__ import annotations

import json

from seglabel.layout import is_run_folder


def test_a_run_json_written_by_seglabel_marks_a_run_folder(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({"seglabel_version": "0.1.0", "status": "done"}))
    assert is_run_folder(tmp_path)


def test_a_shard_record_alone_marks_a_run_folder(tmp_path):
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "shard-0-of-2.json").write_text(json.dumps({"seglabel_version": "0.1.0"}))
    assert is_run_folder(tmp_path)


def test_foreign_files_under_our_names_are_not_a_run_folder(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({"tool": "other", "status": "done"}))
    (tmp_path / "masks").mkdir()
    (tmp_path / "coco.json").write_text("{}")
    assert not is_run_folder(tmp_path)
    assert not is_run_folder(tmp_path / "missing")
