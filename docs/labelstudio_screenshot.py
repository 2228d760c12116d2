"""docs/images/labelstudio-prelabels.png: Label Studio's labeling page showing seglabel's
pre-labels, taken in headless Chromium. Offline and reproducible: toy-world scenes labelled by the
toy CLIP that ships with the tests, the real Label Studio (started and stopped here, everything
it writes in a temporary folder) and `seglabel serve --labelstudio` as its ML backend.

    SEGLABEL_TEST_LABEL_STUDIO=/path/to/venv/bin/label-studio python docs/labelstudio_screenshot.py [OUT.png]

Needs Debian's chromium (apt-get install chromium) and playwright (the test extra).
"""
from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # the Label Studio harness of the tests

from realtools import LabelStudio, label_studio_executable  # noqa: E402

TOY = ["--model", "maskclip:toyclip-vit", "--model-config", str(REPO / "tests/fixtures/toyclip/toyclip-vit.json"),
       "--pretrained", str(REPO / "tests/fixtures/toyclip/toyclip-vit.safetensors"), "--short-side", "64"]
LABELS = str(REPO / "labelsets/toyworld.yaml")


def seglabel(*args: str) -> None:
    r = subprocess.run([sys.executable, "-m", "seglabel", *args], capture_output=True, text=True, timeout=600)
    if r.returncode:
        raise SystemExit(f"seglabel {args[0]} failed: {r.stderr}")


def main(shot: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="seglabel-shot-") as tmp:
        ls = LabelStudio(label_studio_executable(), Path(tmp) / "label-studio").start()
        served = None
        try:
            root = ls.folder_for("toy")
            r = subprocess.run([sys.executable, str(REPO / "benchmarks/toyworld/scenes.py"), str(root), "--n", "3",
                                "--seed", "7", "--size", "320"], capture_output=True, text=True, timeout=300)
            assert r.returncode == 0, r.stderr
            photos = root / "images"
            seglabel("export", *_annotated(photos, Path(tmp) / "labels"), "--format", "labelstudio",
                     "--document-root", str(ls.files))
            export = Path(tmp) / "labels" / "export" / "labelstudio"
            project = ls.create_project("Toy world review", (export / "label_config.xml").read_text())
            ls.add_local_files(project, photos)
            ls.import_tasks(project, [{"data": t["data"]} for t in json.loads((export / "tasks.json").read_text())])
            served = subprocess.Popen([sys.executable, "-m", "seglabel", "serve", "--labelstudio", "--labels", LABELS,
                                       *TOY, "--port", "0", "--document-root", str(ls.files)],
                                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            ls.connect_model(project, served.stdout.readline().strip())
            ls.action(project, "retrieve_tasks_predictions")
            [task] = [t for t in ls.tasks(project) if t["data"]["seglabel_key"] == "00001"]
            version = task["predictions"][0]["model_version"]
            # show the predictions of this model version as pre-labels in the labeling page
            ls.request("PATCH", f"/api/projects/{project}", {"show_collab_predictions": True, "model_version": version})
            _screenshot(ls, f"/projects/{project}/data?task={task['id']}", shot)
        finally:
            if served is not None:
                served.send_signal(signal.SIGTERM)
                served.wait(60)
            ls.stop()


def _annotated(photos: Path, out: Path) -> list[str]:
    seglabel("annotate", str(photos), "--labels", LABELS, "--out", str(out), *TOY)
    return [str(out)]


def _screenshot(ls: LabelStudio, path: str, shot: Path) -> None:
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("needs Debian's chromium (apt-get install chromium)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 760})
            page.goto(ls.url + "/user/login")
            page.fill("input[name=email]", ls.USER)
            page.fill("input[name=password]", ls.PASSWORD)
            page.click("button[type=submit], input[type=submit]")
            page.wait_for_load_state("networkidle")
            page.goto(ls.url + path)
            page.wait_for_selector("canvas", timeout=120_000)
            page.wait_for_load_state("networkidle")
            page.wait_for_timeout(3000)  # the brush layers are drawn after the image loads
            png = page.screenshot()
        finally:
            browser.close()
    image = Image.open(io.BytesIO(png)).convert("RGB")
    image = image.resize((1024, image.height * 1024 // image.width), Image.LANCZOS)  # a small PNG for the
    image = image.quantize(colors=64, method=Image.Quantize.MEDIANCUT)  # repository (~110 KiB)
    shot.parent.mkdir(parents=True, exist_ok=True)
    image.save(shot, optimize=True)
    print(f"{shot}: {shot.stat().st_size // 1024} KiB")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "docs" / "images" / "labelstudio-prelabels.png")
