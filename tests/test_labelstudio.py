"""Label Studio, the real one (tests/realtools.py starts it once per session): the export's
project, photos and predictions as Label Studio stores them, and `seglabel serve --labelstudio`
connected to it as an ML backend."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO
from seglabel.labelset import load_labelset
from seglabel.writers import read_mask
from test_annotate_cli import run
from test_export import export_files, make_output

pytestmark = pytest.mark.slow

# names that need quoting in XML and JSON, and a class that no image has
ODD = {"name": "odd", "templates": "none",
       "classes": [{"name": "background", "color": [10, 20, 30]}, {"name": "road & <lane>", "color": [128, 64, 128]},
                   {"name": "person \"ped\"", "color": [220, 20, 60]}, {"name": "Straße", "color": [0, 0, 142]},
                   {"name": "never seen", "color": [1, 2, 3]}]}


def odd_masks() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    a = np.zeros((37, 53), np.uint8)
    a[10:, :] = 1
    a[20:30, 5:40] = 2
    a[rng.random(a.shape) < 0.05] = 3  # scattered pixels: many short runs
    a[:4, :4] = 255
    b = np.full((300, 260), 3, np.uint8)  # runs longer than the widest length field of the RLE
    b[150:, 100:] = 0
    return {"a": a, "deep/b": b}


def decoded_labels(ls, task: dict, shape: tuple[int, int], folder: Path) -> dict[str, np.ndarray]:
    """label -> boolean mask of each brush result of the task's prediction, decoded by the SDK."""
    [prediction] = task["predictions"]
    results = prediction["result"]
    flat = ls.decode_brush([r["value"]["rle"] for r in results], folder)
    out = {}
    for r, rgba in zip(results, flat):
        assert (r["original_height"], r["original_width"]) == shape
        [label] = r["value"]["brushlabels"]
        out[label] = rgba.reshape(*shape, 4)[..., 3] > 0
    return out


def test_export_imported_into_label_studio(label_studio, tmp_path):
    ls = label_studio
    root = ls.folder_for("export")
    masks = odd_masks()
    out = make_output(root, masks, ODD, confidence={"a": 0.25, "deep/b": 0.75})
    dest = export_files(out, "labelstudio", document_root=ls.files).dest
    project = ls.create_project("seglabel export", (dest / "label_config.xml").read_text())
    # the project's interface is ours, as Label Studio parsed it
    config = ls.request("GET", f"/api/projects/{project}")["parsed_label_config"]
    assert config["label"]["labels"] == [c["name"] for c in ODD["classes"]]
    assert config["review"]["labels"] == ["ok", "fix", "discard"]
    ls.add_local_files(project, root / "photos")
    assert ls.import_tasks(project, json.loads((dest / "tasks.json").read_text()))["prediction_count"] == 2

    tasks = ls.tasks(project)
    assert [t["data"]["seglabel_key"] for t in tasks] == ["a", "deep/b"]
    for task in tasks:
        key = task["data"]["seglabel_key"]
        mask = masks[key]
        # the photo, as the labeling page asks for it
        photo = ls.request("GET", task["data"]["image"], raw=True)
        assert photo == (root / "photos" / f"{key}.jpg").read_bytes()
        assert task["predictions"][0]["score"] == {"a": 0.25, "deep/b": 0.75}[key]
        got = decoded_labels(ls, task, mask.shape, tmp_path)
        present = [ODD["classes"][k]["name"] for k in sorted(set(np.unique(mask).tolist()) - {255})]
        assert sorted(got) == sorted(present)  # one result per class present, none for absent ones
        for k, c in enumerate(ODD["classes"]):
            if c["name"] in got:
                np.testing.assert_array_equal(got[c["name"]], mask == k, err_msg=f"{key}: {c['name']}")
        painted = np.sum([m for m in got.values()], axis=0)
        assert painted.max() == 1 and ((painted == 0) == (mask == 255)).all()  # ignored pixels unpainted

    # an annotator accepts the first task's prediction as it is: Label Studio's export has it
    accepted = tasks[0]["predictions"][0]["result"]
    ls.annotate(tasks[0]["id"], accepted)
    exported = json.loads(ls.export(project))
    assert [t["data"]["seglabel_key"] for t in exported] == ["a"]
    [annotation] = exported[0]["annotations"]
    assert [r["value"]["rle"] for r in annotation["result"]] == [r["value"]["rle"] for r in accepted]


# -- seglabel serve --labelstudio -----------------------------------------------------------------
TOY = ["--model", "maskclip:toyclip-vit", "--model-config", str(REPO / "tests/fixtures/toyclip/toyclip-vit.json"),
       "--pretrained", str(REPO / "tests/fixtures/toyclip/toyclip-vit.safetensors"), "--short-side", "64"]
TOY_LABELS = str(REPO / "labelsets/toyworld.yaml")


def toy_scenes(folder: Path, n: int) -> Path:
    r = subprocess.run([sys.executable, str(REPO / "benchmarks/toyworld/scenes.py"), str(folder), "--n", str(n),
                        "--seed", "11"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return folder / "images"


class Served:
    """`seglabel serve` in a subprocess, on a port the OS picked (the URL is its first line)."""

    def __init__(self, *args: str, env: dict | None = None) -> None:
        self.process = subprocess.Popen([sys.executable, "-m", "seglabel", "serve", *args, "--port", "0"],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
        self.url = self.process.stdout.readline().strip()
        if not self.url.startswith("http://127.0.0.1:"):
            self.process.kill()
            raise AssertionError(f"serve did not start: {self.process.communicate(timeout=60)[1]}")

    def stop(self) -> tuple[int, str]:
        self.process.send_signal(signal.SIGTERM)
        _, err = self.process.communicate(timeout=60)
        return self.process.returncode, err


def test_serve_gives_label_studio_annotate_labels(label_studio, tmp_path):
    ls = label_studio
    root = ls.folder_for("serve")
    photos = toy_scenes(root / "toy", 3)
    out = tmp_path / "labels"
    r = run("annotate", str(photos), "--labels", TOY_LABELS, "--out", str(out), *TOY)
    assert r.returncode == 0, r.stderr
    dest = export_files(out, "labelstudio", document_root=ls.files).dest
    # a project made by hand: one label in other case, one the label set lacks
    config = (dest / "label_config.xml").read_text().replace('value="sky"', 'value="Sky"')
    config = config.replace("</BrushLabels>", '  <Label value="unicorn" background="#ffffff"/>\n  </BrushLabels>')
    project = ls.create_project("seglabel serve", config)
    ls.add_local_files(project, photos)
    ls.import_tasks(project, [{"data": t["data"]} for t in json.loads((dest / "tasks.json").read_text())])

    auth = ("studio", "s3cret:pw")
    # images through Label Studio with a personal access token (1.23's default kind), given as
    # Label Studio's own backends take it
    token = ls.request("POST", "/api/token/")["token"]
    assert token.count(".") == 2
    served = Served("--labelstudio", "--labels", TOY_LABELS, *TOY, "--basic-auth", ":".join(auth),
                    env={"LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": token})
    try:
        backend = ls.connect_model(project, served.url, auth)
        assert backend["state"] == "CO", backend  # connected: /health and /setup answered with the credentials
        ls.action(project, "retrieve_tasks_predictions")
        tasks = ls.tasks(project)
    finally:
        code, err = served.stop()
    assert code == 0, err
    assert "'unicorn'" in err and "lacks" in err  # one line names the label the set lacks

    records = {p.stem: json.loads(p.read_text()) for p in (out / "records").glob("*.json")}
    names = [c.name for c in load_labelset(TOY_LABELS).classes]
    project_name = {n: ("Sky" if n == "sky" else n) for n in names}
    assert len(tasks) == 3
    for task in tasks:
        key = task["data"]["seglabel_key"]
        [prediction] = task["predictions"]
        assert prediction["model_version"] == "seglabel-" + records[key]["settings_id"]
        assert prediction["score"] == pytest.approx(records[key]["confidence"], abs=1e-6)
        mask = read_mask(out / "masks" / f"{key}.png")
        got = decoded_labels(ls, task, mask.shape, tmp_path)
        for k, name in enumerate(names):
            expected = mask == k
            if expected.any():
                np.testing.assert_array_equal(got.pop(project_name[name]), expected, err_msg=f"{key}: {name}")
        assert not got  # no result for a class absent from annotate's mask
