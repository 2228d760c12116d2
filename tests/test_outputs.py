"""Where a run's outputs live (outputs.py): a folder and a bucket prefix (the S3 server, moto on
127.0.0.1) behave alike through one interface, and each keeps the guarantees it documents."""
from __future__ import annotations

import json

import pytest

from seglabel.outputs import BucketOut, FolderOut, OutputBusy, open_out, read_json
from seglabel.writers import OutputError


@pytest.fixture(params=["folder", "bucket"])
def out(request, tmp_path):
    if request.param == "folder":
        return FolderOut(tmp_path / "labels")
    s3 = request.getfixturevalue("s3")
    s3.client().create_bucket(Bucket="labels")
    return BucketOut("s3://labels/run1")


def test_open_out_picks_the_kind():
    assert isinstance(open_out("labels"), FolderOut)
    assert isinstance(open_out("file:///tmp/labels"), FolderOut)
    assert isinstance(open_out("s3://bucket/labels/"), BucketOut)
    assert open_out("s3://bucket/labels/").shown() == "s3://bucket/labels"


def test_write_read_stat_list_delete(out):
    first = out.write_bytes("masks/x/a.png", b"mask bytes")
    assert first.size == 10 and first.version
    assert out.stat("masks/x/a.png") == first
    assert out.read_bytes("masks/x/a.png") == b"mask bytes"
    assert out.read_bytes("masks/x/a.png", 0, 4) == b"mask"
    out.write_json("records/x/a.json", {"settings_id": "abc", "n": 1})
    assert read_json(out, "records/x/a.json") == {"settings_id": "abc", "n": 1}
    out.write_bytes("masks/b.png", b"b")
    out.write_bytes("masks/.hidden", b"h")
    assert sorted(out.listing("masks")) == ["masks/b.png", "masks/x/a.png"]
    assert out.listing("masks")["masks/x/a.png"] == first
    assert out.listing("scores") == {}
    second = out.write_bytes("masks/x/a.png", b"other bytes")
    assert second.version != first.version or out.local  # a bucket's ETag follows the content
    with out.write_text("coco.json") as f:
        f.write('{"images": ["caf\u00e9"]}\n')
    assert json.loads(out.read_bytes("coco.json")) == {"images": ["caf\u00e9"]}
    out.delete("masks/b.png")
    out.delete("masks/b.png")
    assert out.stat("masks/b.png") is None
    with pytest.raises(FileNotFoundError):
        out.read_bytes("masks/b.png")


def test_a_failed_stream_writes_nothing(out):
    with pytest.raises(RuntimeError):
        with out.write_text("coco.json") as f:
            f.write("{half")
            raise RuntimeError("stopped midway")
    assert out.stat("coco.json") is None


def test_a_whole_run_and_a_part_keep_apart(out):
    with out.lock(None):
        with pytest.raises(OutputBusy, match="another seglabel run is writing here"):
            with out.lock("shard-0-of-2"):
                pass
    with out.lock("shard-0-of-2"), out.lock("shard-1-of-2"):  # parts run side by side
        with pytest.raises(OutputBusy, match="another seglabel run is writing here"):
            with out.lock("shard-0-of-2"):  # never twice
                pass
        with pytest.raises(OutputBusy, match="another seglabel run is writing here"):
            with out.lock(None):
                pass
    with out.lock(None):  # all released
        pass


def test_a_bucket_run_stops_writing_once_its_lease_is_lost(s3):
    from seglabel.storage import Lease, LeaseLost

    s3.client().create_bucket(Bucket="labels")
    out = BucketOut("s3://labels/run1")
    with out.lock(None):
        out.write_bytes("masks/a.png", b"1")
        Lease(out.object_url(".lock"), "annotate", clock_offset=600).take()  # another run, sure ours is stale
        out._leases[0].renew()
        with pytest.raises(LeaseLost):
            out.write_bytes("masks/b.png", b"2")
    assert out.stat("masks/b.png") is None


def test_bucket_write_errors_are_output_errors_naming_the_object(s3):
    out = BucketOut("s3://no-such-bucket/run1")
    with pytest.raises(OutputError) as e:
        out.write_bytes("masks/a.png", b"x")
    assert str(e.value).startswith("s3://no-such-bucket/run1/masks/a.png: cannot write (the bucket does not exist")


def test_a_store_without_conditional_writes_is_refused_as_out_in_one_line():
    import fsspec

    from seglabel.errors import UsageError

    with pytest.raises(UsageError) as e:
        BucketOut("memory://bucket/labels").check_store()
    assert str(e.value).startswith("--out memory://bucket/labels: seglabel relies on conditional writes")
    assert "\n" not in str(e.value) and not fsspec.filesystem("memory").exists("/bucket/labels")
