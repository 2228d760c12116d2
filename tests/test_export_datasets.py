"""`seglabel export --format hf | webdataset`: read back with the real `datasets` and `webdataset`
packages, every photo compared byte for byte and every mask pixel for pixel."""
from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from PIL import Image

from seglabel.labelset import parse_labelset
from seglabel.writers import MASKS, RECORDS, encode_mask_png, image_record, write_bytes, write_json
from test_export import STREET, export, export_files, make_output, street_masks


def add_photo(root: Path, rel: str, mask: np.ndarray, labelset: dict = STREET, orientation: int = 1,
              confidence: float = 0.5) -> None:
    """One more labelled image in make_output's layout; ``orientation``: the photo is stored turned
    and carries that EXIF orientation, as a camera writes it (its mask is of the upright photo)."""
    rng = np.random.default_rng(len(rel))
    upright = Image.fromarray(rng.integers(0, 256, (*mask.shape, 3), dtype=np.uint8))
    photo = root / "photos" / rel
    photo.parent.mkdir(parents=True, exist_ok=True)
    if orientation == 6:  # upright = stored turned 90 degrees clockwise
        stored, exif = upright.transpose(Image.Transpose.ROTATE_90), Image.Exif()
        exif[0x0112] = 6
        stored.save(photo, exif=exif)
    else:
        upright.save(photo)
    key = os.path.splitext(rel)[0]
    out = root / "labels"
    write_bytes(out / MASKS / f"{key}.png", encode_mask_png(mask))
    record = image_record(rel, mask, np.full(mask.shape, confidence, np.float32), parse_labelset(labelset))
    write_json(out / RECORDS / f"{key}.json", record)


def varied_output(root: Path) -> tuple[Path, dict[str, tuple[str, np.ndarray]]]:
    """Nested and dotted keys, a PNG photo with a space and an accent, a photo with an EXIF
    rotation; returns the output and key -> (file name, mask)."""
    masks = street_masks()
    out = make_output(root, masks, confidence={"a": 0.9, "sub/b": 0.25})
    expected = {k: (f"{k}.jpg", m) for k, m in masks.items()}
    more = {"x.y/p.q.jpg": np.array([[0, 1, 1], [2, 255, 0]], np.uint8),
            "é t.png": np.full((4, 3), 1, np.uint8)}
    for rel, mask in more.items():
        add_photo(root, rel, mask)
        expected[os.path.splitext(rel)[0]] = (rel, mask)
    turned = np.zeros((7, 5), np.uint8)
    turned[:3] = 2
    add_photo(root, "turned.jpg", turned, orientation=6)
    expected["turned"] = ("turned.jpg", turned)
    return out, expected


def records(out: Path) -> dict[str, dict]:
    return {p.relative_to(out / RECORDS).with_suffix("").as_posix(): json.loads(p.read_text())
            for p in (out / RECORDS).rglob("*.json")}


# -- Hugging Face -------------------------------------------------------------------------------------
def test_hf_dataset_loads_with_datasets_every_way(tmp_path):
    datasets = pytest.importorskip("datasets", reason="needs the datasets package (pip install datasets)")
    out, expected = varied_output(tmp_path)
    result = export_files(out, "hf", shard_size=2)
    dest = out / "export" / "hf"
    assert result.images == 5 and result.dest == dest
    shards = sorted((dest / "data").iterdir())
    assert [p.name for p in shards] == [f"train-0000{i}-of-00003.parquet" for i in range(3)]
    cache = str(tmp_path / "hf-cache")
    loaded = {
        "parquet": datasets.load_dataset("parquet", data_files=[str(p) for p in shards], split="train", cache_dir=cache),
        "folder": datasets.load_dataset(str(dest), split="train", cache_dir=cache),
        "from_parquet": datasets.Dataset.from_parquet([str(p) for p in shards], cache_dir=cache),
    }
    names = STREET_NAMES
    recs = records(out)
    for how, ds in loaded.items():
        assert ds.features["classes"].feature.names == names, how
        assert isinstance(ds.features["image"], datasets.Image) and isinstance(ds.features["label"], datasets.Image)
        assert sorted(ds["key"]) == sorted(expected), how
        raw = ds.cast_column("image", datasets.Image(decode=False)).cast_column("label", datasets.Image(decode=False))
        for row, decoded in zip(raw, ds):
            file_name, mask = expected[row["key"]]
            assert row["file_name"] == file_name
            assert row["image"]["bytes"] == (tmp_path / "photos" / file_name).read_bytes(), (how, file_name)
            assert row["label"]["bytes"] == (out / "masks" / f"{row['key']}.png").read_bytes(), (how, file_name)
            label = np.asarray(decoded["label"])
            assert label.dtype == mask.dtype and np.array_equal(label, mask), (how, file_name)
            # datasets turns a photo upright by its EXIF orientation: it then fits its mask
            assert decoded["image"].size == (mask.shape[1], mask.shape[0]), (how, file_name)
            rec = recs[row["key"]]
            assert (row["width"], row["height"], row["confidence"]) == (rec["width"], rec["height"], rec["confidence"])
            present = sorted(set(np.unique(mask).tolist()) - {255})
            assert row["classes"] == present
            assert [ds.features["classes"].feature.int2str(k) for k in row["classes"]] == [names[k] for k in present]
    assert json.loads((dest / "id2label.json").read_text()) == {"0": "background", "1": "road", "2": "person"}
    assert any("datasets.load_dataset" in n for n in result.notes)


STREET_NAMES = [c["name"] for c in STREET["classes"]]


def test_hf_card_is_what_the_hub_and_push_to_hub_read(tmp_path):
    datasets = pytest.importorskip("datasets", reason="needs the datasets package (pip install datasets)")
    from datasets.info import DatasetInfosDict
    from datasets.utils.metadata import MetadataConfigs
    from huggingface_hub import DatasetCard

    out, _ = varied_output(tmp_path)
    export_files(out, "hf")
    dest = out / "export" / "hf"
    card = DatasetCard.load(dest / "README.md")
    data = card.data
    assert data.license == "unknown"  # the user's to set
    assert data.task_categories == ["image-segmentation"] and data.task_ids == ["semantic-segmentation"]
    assert data.size_categories == ["n<1K"]
    configs = MetadataConfigs.from_dataset_card_data(data)
    assert configs["default"]["data_files"] == [{"split": "train", "path": "data/train-*"}]
    infos = DatasetInfosDict.from_dataset_card_data(data)
    [(_, info)] = infos.items()
    shard = next((dest / "data").iterdir())
    assert info.features == datasets.Dataset.from_parquet(str(shard), cache_dir=str(tmp_path / "c")).features
    assert info.splits["train"].num_examples == 5 and info.splits["train"].num_bytes > 0
    assert "| 2 | person | #dc143c |" in card.text
    assert str(tmp_path) not in (dest / "README.md").read_text()  # no local path goes to the Hub


def test_hf_sixteen_bit_masks(tmp_path):
    datasets = pytest.importorskip("datasets", reason="needs the datasets package (pip install datasets)")
    labelset = {"name": "big", "templates": "none", "classes": [f"c{i}" for i in range(300)]}
    mask = np.array([[0, 299, 65535], [256, 1, 2]], np.uint16)
    out = make_output(tmp_path, {"a": mask}, labelset)
    export_files(out, "hf")
    ds = datasets.load_dataset(str(out / "export" / "hf"), split="train", cache_dir=str(tmp_path / "c"))
    assert ds.features["classes"].feature.num_classes == 300
    label = np.asarray(ds[0]["label"])
    assert np.array_equal(label.astype(np.uint16), mask) and label.max() == 65535
    assert ds[0]["classes"] == [0, 1, 2, 256, 299]


def test_hf_without_pyarrow_is_one_line_naming_the_install(tmp_path, monkeypatch):
    from seglabel.errors import UsageError

    out = make_output(tmp_path, street_masks())
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow -> ImportError
    with pytest.raises(UsageError, match=r"pip install 'seglabel\[hf\]'") as info:
        export_files(out, "hf")
    assert "\n" not in str(info.value) and info.value.exit_code == 2
    assert not (out / "export").exists()


# -- WebDataset ---------------------------------------------------------------------------------------
def test_webdataset_shards_read_with_webdataset(tmp_path):
    wds = pytest.importorskip("webdataset", reason="needs the webdataset package (pip install webdataset)")
    out, expected = varied_output(tmp_path)
    result = export_files(out, "webdataset", shard_size=2)
    dest = out / "export" / "webdataset"
    index = json.loads((dest / "shards.json").read_text())
    assert index["urls"] == "shard-{000000..000002}.tar" and index["images"] == result.images == 5
    assert sorted(p.name for p in dest.glob("*.tar")) == [s["name"] for s in index["shards"]]
    samples = list(wds.WebDataset(str(dest / index["urls"]), shardshuffle=False).decode())
    assert len(samples) == 5
    recs = records(out)
    for sample in samples:
        key = unquote(sample["__key__"])
        assert "." not in sample["__key__"] and "/" not in sample["__key__"]
        file_name, mask = expected[key]
        suffix = file_name.rsplit(".", 1)[1]
        assert set(sample) - {"__key__", "__url__", "__local_path__"} == {suffix, "seg.png", "json"}
        assert sample[suffix] == (tmp_path / "photos" / file_name).read_bytes()
        assert sample["seg.png"] == (out / "masks" / f"{key}.png").read_bytes()
        got = np.asarray(Image.open(io.BytesIO(sample["seg.png"])))
        assert got.dtype == mask.dtype and np.array_equal(got, mask), key
        record = sample["json"]
        rec = recs[key]
        assert (record["key"], record["file_name"]) == (key, file_name)
        assert (record["width"], record["height"], record["confidence"]) == (rec["width"], rec["height"], rec["confidence"])
        present = sorted(set(np.unique(mask).tolist()) - {255})
        assert [(c["id"], c["name"]) for c in record["classes"]] == [(k, STREET_NAMES[k]) for k in present]
        assert [c["pixels"] for c in record["classes"]] == [int((mask == k).sum()) for k in present]
        assert record["exif_orientation"] == (6 if key == "turned" else 1)
    # decoded by webdataset's own image handler too: the mask's indices, the photo as pixels
    for sample in wds.WebDataset(str(dest / index["urls"]), shardshuffle=False).decode("l8"):
        file_name, mask = expected[unquote(sample["__key__"])]
        assert np.array_equal(sample["seg.png"], mask)
    assert json.loads((dest / "id2label.json").read_text()) == {"0": "background", "1": "road", "2": "person"}
    assert any("EXIF" in n and "1 photos" in n for n in result.notes)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=6, unique=True))
def test_webdataset_keys_have_no_dot_or_slash_and_stay_distinct(keys):
    from seglabel.exports.webdataset_tars import sample_key

    mapped = [sample_key(k) for k in keys]
    assert len(set(mapped)) == len(keys)
    for key, m in zip(keys, mapped):
        assert "." not in m and "/" not in m and m.isascii()
        assert unquote(m, errors="surrogateescape") == key


def test_webdataset_rerun_rewrites_and_removes_shards_it_no_longer_has(tmp_path):
    wds = pytest.importorskip("webdataset", reason="needs the webdataset package (pip install webdataset)")
    out, _ = varied_output(tmp_path)
    dest = out / "export" / "webdataset"
    export_files(out, "webdataset", shard_size=1)
    assert len(list(dest.glob("shard-*.tar"))) == 5
    (dest / "notes.txt").write_text("mine")  # the user's: stays
    (dest / ".shard-000007.tar.seglabel-0123abcd.tmp").write_bytes(b"half")  # a killed export's
    (out / "records" / "a.json").unlink()  # one image fewer
    export_files(out, "webdataset", shard_size=3)
    assert sorted(p.name for p in dest.iterdir()) == ["id2label.json", "notes.txt", "shard-000000.tar",
                                                      "shard-000001.tar", "shards.json"]
    samples = list(wds.WebDataset(str(dest / "shard-{000000..000001}.tar"), shardshuffle=False))
    assert len(samples) == 4 and "a" not in {s["__key__"] for s in samples}


def test_hf_rerun_removes_shards_it_no_longer_has(tmp_path):
    out, _ = varied_output(tmp_path)
    data = out / "export" / "hf" / "data"
    pytest.importorskip("pyarrow", reason="needs pyarrow (pip install 'seglabel[hf]')")
    export_files(out, "hf", shard_size=2)
    export_files(out, "hf", shard_size=4)
    assert sorted(p.name for p in data.iterdir()) == ["train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]


def test_an_interrupted_export_leaves_whole_shards_only(tmp_path, monkeypatch):
    pytest.importorskip("webdataset", reason="needs the webdataset package (pip install webdataset)")
    import tarfile

    from seglabel.exports import shards

    out, _ = varied_output(tmp_path)
    real, calls = shards.read_sample, [0]

    def interrupted(run, sample):
        calls[0] += 1
        if calls[0] == 4:  # in the second shard
            raise KeyboardInterrupt
        return real(run, sample)

    monkeypatch.setattr(shards, "read_sample", interrupted)  # what read_samples calls
    with pytest.raises(KeyboardInterrupt):
        export_files(out, "webdataset", shard_size=3)
    dest = out / "export" / "webdataset"
    assert sorted(p.name for p in dest.iterdir()) == ["shard-000000.tar"]  # no temporary, no half shard
    with tarfile.open(dest / "shard-000000.tar") as tar:
        assert len(tar.getnames()) == 9


def test_old_palette_masks_go_in_as_grayscale_indices(tmp_path):
    datasets = pytest.importorskip("datasets", reason="needs the datasets package (pip install datasets)")
    wds = pytest.importorskip("webdataset", reason="needs the webdataset package (pip install webdataset)")
    masks = street_masks()
    out = make_output(tmp_path, masks, palette_masks=True)
    export_files(out, "hf")
    export_files(out, "webdataset")
    ds = datasets.load_dataset(str(out / "export" / "hf"), split="train", cache_dir=str(tmp_path / "c"))
    samples = wds.WebDataset(str(out / "export" / "webdataset" / "shard-000000.tar"), shardshuffle=False)
    labels = [(row["key"], row["label"]) for row in ds]
    labels += [(unquote(s["__key__"]), Image.open(io.BytesIO(s["seg.png"]))) for s in samples]
    assert len(labels) == 4
    for key, label in labels:
        assert label.mode == "L" and np.array_equal(np.asarray(label), masks[key])  # not "P": indices for OpenCV too


# -- images that cannot go in ---------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["hf", "webdataset"])
def test_images_without_a_fitting_photo_are_left_out_one_line_each(tmp_path, fmt):
    pytest.importorskip("pyarrow", reason="needs pyarrow (pip install 'seglabel[hf]')")
    out = make_output(tmp_path, street_masks())
    (tmp_path / "photos" / "sub" / "b.jpg").unlink()
    add_photo(tmp_path, "c.jpg", np.zeros((4, 4), np.uint8))
    Image.new("RGB", (9, 4)).save(tmp_path / "photos" / "c.jpg")  # changed since it was labelled
    result = export_files(out, fmt)
    assert result.images == 1
    left_out = {Path(path).name: reason for path, reason in result.left_out}
    assert sorted(left_out) == ["b.jpg", "c.jpg"]
    assert left_out["b.jpg"] == "photo not found" and "changed" in left_out["c.jpg"]
    assert any("--images DIR" in n for n in result.notes)


@pytest.mark.parametrize("fmt", ["hf", "webdataset"])
def test_no_photo_found_refuses_and_writes_nothing(tmp_path, fmt):
    pytest.importorskip("pyarrow", reason="needs pyarrow (pip install 'seglabel[hf]')")
    out = make_output(tmp_path, street_masks())
    (tmp_path / "photos").rename(tmp_path / "moved")
    r = export(out, fmt)
    assert r.returncode == 2 and "--images" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (out / "export").exists()
    r = export(out, fmt, "--images", str(tmp_path / "moved"), "--shard-size", "1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(out / "export" / fmt)


def test_shard_size_is_for_the_data_set_formats_only(tmp_path):
    out = make_output(tmp_path, street_masks())
    r = export(out, "cvat", "--shard-size", "10")
    assert r.returncode == 2 and "--shard-size is for --format hf or webdataset only" in r.stderr
    r = export(out, "webdataset", "--shard-size", "0")
    assert r.returncode == 2 and not (out / "export").exists()


# -- a real annotate run ------------------------------------------------------------------------------
@pytest.mark.slow
def test_data_sets_of_a_real_annotate_run(tmp_path, tiny_weights, small_labelset):
    datasets = pytest.importorskip("datasets", reason="needs the datasets package (pip install datasets)")
    wds = pytest.importorskip("webdataset", reason="needs the webdataset package (pip install webdataset)")
    from conftest import write_images
    from test_annotate_cli import annotate

    photos, out = tmp_path / "photos", tmp_path / "labels"
    write_images(photos, ["a.jpg", "x/b.png"], size=(30, 44))
    assert annotate([photos], out, small_labelset, tiny_weights).returncode == 0
    for fmt in ("hf", "webdataset"):
        r = export(out, fmt)
        assert r.returncode == 0, r.stderr
    masks = {k: np.asarray(Image.open(out / "masks" / f"{k}.png")) for k in ("a", "x/b")}
    ds = datasets.load_dataset(str(out / "export" / "hf"), split="train", cache_dir=str(tmp_path / "c"))
    names = parse_labelset(json.loads((out / "run.json").read_text())["labelset"]).names
    assert ds.features["classes"].feature.names == names
    for row in ds:
        assert np.array_equal(np.asarray(row["label"]), masks[row["key"]])
    for sample in wds.WebDataset(str(out / "export" / "webdataset" / "shard-000000.tar"), shardshuffle=False).decode():
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(sample["seg.png"]))), masks[unquote(sample["__key__"])])
        assert sample["png" if sample["json"]["file_name"].endswith(".png") else "jpg"] == \
            (photos / sample["json"]["file_name"]).read_bytes()
