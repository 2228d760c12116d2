"""WebDataset tar shards as input (storage/tar_shards.py): shards written by the real ``webdataset``
package and by seglabel's own export, indexed and read photo by photo, from a local file and from
the S3 server (moto on 127.0.0.1) by range reads."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from seglabel.exports.webdataset_tars import sample_key
from seglabel.storage import StorageError
from seglabel.storage.tar_shards import index_shard, key_and_field, read_member

SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")


def _jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((12, 16), seed, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _write_shard(path: Path, samples: list[dict]) -> None:
    wds = pytest.importorskip("webdataset", reason="needs webdataset (the test extra)")
    with wds.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)


def test_keys_and_fields_as_webdataset_splits_them():
    assert key_and_field("a/0001.jpg") == ("a/0001", "jpg")
    assert key_and_field("0001.seg.png") == ("0001", "seg.png")
    assert key_and_field("./0001.jpg") == ("0001", "jpg")
    assert key_and_field("README") is None


@pytest.fixture
def shard(tmp_path) -> tuple[Path, dict[str, bytes]]:
    """A shard as webdataset writes it: photos with class labels and captions, a sample with a
    photo and a mask (seg.png is no photo), one with two photos, one with none."""
    photos = {f"s{i:03d}": _jpeg(i) for i in range(5)}
    samples = [{"__key__": key, "jpg": data, "cls": str(i).encode(), "txt": b"a caption"}
               for i, (key, data) in enumerate(photos.items())]
    photos["masked"] = _png(3)
    samples.append({"__key__": "masked", "png": photos["masked"], "seg.png": _png(1)})
    samples.append({"__key__": "twice", "jpg": _jpeg(9), "png": _png(9)})
    samples.append({"__key__": "text-only", "txt": b"no photo here"})
    path = tmp_path / "shard-000000.tar"
    _write_shard(path, samples)
    return path, photos


def _check_index(index, photos, shard_name):
    assert [m.rel for m in index.members] == [f"{k}.jpg" for k in list(photos)[:5]] + ["masked.png"]
    for member in index.members:
        assert read_member(member) == photos[member.rel.rsplit(".", 1)[0]]
    problems = dict(index.problems)
    assert set(problems) == {f"{shard_name}#twice", f"{shard_name}#text-only"}
    assert problems[f"{shard_name}#twice"] == "2 photos (jpg, png) in this sample; choose one of its files (jpg, png)"
    assert problems[f"{shard_name}#text-only"].startswith("no photo in this sample")


def test_a_local_shard_is_indexed_and_read_photo_by_photo(shard):
    path, photos = shard
    index = index_shard(str(path), SUFFIXES)
    _check_index(index, photos, str(path))
    assert all(m.shard == str(path) and m.source == f"{path}#{m.name}" for m in index.members)


def test_a_field_can_be_chosen(shard):
    path, _ = shard
    index = index_shard(str(path), SUFFIXES, photo_field="png")
    assert [m.rel for m in index.members] == ["masked.png", "twice.png"]
    assert all("field 'png' not among" in reason for _, reason in index.problems)


def test_a_shard_in_a_bucket_is_read_by_ranges(s3, shard):
    path, photos = shard
    client = s3.client()
    client.create_bucket(Bucket="datasets")
    client.put_object(Bucket="datasets", Key="train/shard-000000.tar", Body=path.read_bytes())
    url = "s3://datasets/train/shard-000000.tar"
    index = index_shard(url, SUFFIXES)
    _check_index(index, photos, url)
    assert index.members == [m.__class__(url, m.name, m.offset, m.size, m.mtime, m.rel)
                             for m in index_shard(str(path), SUFFIXES).members]  # the same offsets


def test_seglabels_own_export_keys_come_back_as_its_paths(tmp_path):
    """``--format webdataset`` names a sample by its key percent-encoded: labelling those shards
    gives the outputs the original run had."""
    keys = ["x/a.b", "x/y/c", "plain", "spaced name"]
    samples = [{"__key__": sample_key(k), "jpg": _jpeg(i), "seg.png": _png(i), "json": b"{}"}
               for i, k in enumerate(keys)]
    path = tmp_path / "shard-000000.tar"
    _write_shard(path, samples)
    index = index_shard(str(path), SUFFIXES)
    assert sorted(m.rel for m in index.members) == sorted(f"{k}.jpg" for k in keys)
    assert not index.problems


def test_names_that_cannot_be_output_paths_are_problems(tmp_path):
    path = tmp_path / "evil.tar"
    with tarfile.open(path, "w") as tar:
        for name in ("%2E%2E%2F%2E%2E%2Fetc%2Fpasswd.jpg", "ok.jpg", ".hidden.jpg", "sub/.hidden.jpg"):
            data = _jpeg(1)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    index = index_shard(str(path), SUFFIXES)
    assert [m.rel for m in index.members] == ["ok.jpg"]
    problems = dict(index.problems)
    assert problems[f"{path}#%2E%2E%2F%2E%2E%2Fetc%2Fpasswd.jpg"] == "its key cannot name an output path ('../../etc/passwd.jpg')"
    assert "takes no sample key" in problems[f"{path}#.hidden.jpg"]
    # webdataset reads sub/.hidden.jpg as sample "sub/" with the field "hidden.jpg": no photo field
    assert problems[f"{path}#sub/"].startswith("no photo in this sample") and len(problems) == 3


def test_a_truncated_shard_gives_the_photos_before_the_damage(shard, tmp_path):
    path, photos = shard
    data = path.read_bytes()
    cut = tmp_path / "cut.tar"
    whole = index_shard(str(path), SUFFIXES).members
    cut.write_bytes(data[: whole[3].offset + 5])  # inside the fourth photo
    index = index_shard(str(cut), SUFFIXES)
    assert [m.rel for m in index.members][:3] == [m.rel for m in whole[:3]]
    for member in index.members[:3]:
        assert read_member(member) == photos[member.rel[:-4]]
    broken = [m for m in index.members if m.rel == whole[3].rel]
    if broken:  # tarfile may list the member whose data is cut: reading it says so
        with pytest.raises(StorageError, match="truncated"):
            read_member(broken[0])
    assert any("truncated or corrupt tar" in reason for _, reason in index.problems)


def test_compressed_shards_and_non_tars_are_one_line(tmp_path):
    index = index_shard(str(tmp_path / "shard.tar.gz"), SUFFIXES)
    assert not index.members and "decompress it" in index.problems[0][1]
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"this is not a tar file at all" * 40)
    with pytest.raises(StorageError, match=r"bad\.tar: not a tar file"):
        index_shard(str(bad), SUFFIXES)
