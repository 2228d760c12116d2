"""seglabel.ray.Annotator on a local Ray instance writes what the CLI writes."""
from __future__ import annotations

import json

import pytest

from conftest import TINY_CONFIGS, write_images
from test_annotate_cli import annotate
from test_runs import coco_content

ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install seglabel[ray])")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.mark.slow
def test_ray_data_annotator_matches_the_cli(tmp_path, small_labelset, tiny_weights, local_ray):
    from seglabel.annotate import merge
    from seglabel.predict import Protocol
    from seglabel.ray import Annotator, list_images

    photos = tmp_path / "photos"
    write_images(photos, [f"x/{i:02d}.png" for i in range(6)])
    (photos / "broken.png").write_bytes(b"not a png")
    cli = tmp_path / "cli"
    plain = ("--no-key-smoothing", "--no-prompt-denoising")
    assert annotate([photos], cli, small_labelset, tiny_weights, "tiny-vit", *plain).returncode == 3  # broken.png

    out = tmp_path / "ray"
    kwargs = {"out": str(out), "labels": str(small_labelset), "model": "maskclip:tiny-vit",
              "pretrained": str(tiny_weights["tiny-vit"]), "model_config": str(TINY_CONFIGS["tiny-vit"]),
              "protocol": Protocol(short_side=64), "device": "cpu",
              "key_smoothing": False, "prompt_denoising": False}
    rows = ray.data.from_items(list_images([photos])).map_batches(
        Annotator, fn_constructor_kwargs=kwargs, batch_size=3, concurrency=2).take_all()
    status = {r["rel"]: r["status"] for r in rows}
    assert len(status) == 7 and status["broken.png"].startswith("failed: ")
    assert all(s == "done" for rel, s in status.items() if rel != "broken.png")
    assert len(list((out / "runs").glob("ray-*.json"))) in (1, 2)  # one record per actor

    assert merge(out) == 6
    assert coco_content(out / "coco.json") == coco_content(cli / "coco.json")
    for mask in (cli / "masks").rglob("*.png"):
        assert (out / mask.relative_to(cli)).read_bytes() == mask.read_bytes()

    again = ray.data.from_items(list_images([photos])).map_batches(
        Annotator, fn_constructor_kwargs=kwargs, batch_size=3, concurrency=1).take_all()
    assert {r["status"] for r in again if r["rel"] != "broken.png"} == {"skipped"}  # resumable like the CLI
    assert json.loads((out / "run.json").read_text())["status"] == "done"
