"""The pipelined annotate (loader processes, batches of equal shapes, background writers), the
on-disk text-embedding cache and the out-of-memory fallback, through the library API."""
from __future__ import annotations

import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY_CONFIGS, write_images
from seglabel.annotate import AnnotateConfig, annotate
from seglabel.images import find_images
from seglabel.labelset import load_labelset
from seglabel.models.registry import load_segmenter
from seglabel.predict import Protocol
from seglabel.writers import BackgroundWriter, OutputError


@pytest.fixture
def setup(tmp_path, small_labelset, tiny_weights):
    photos = tmp_path / "photos"
    write_images(photos, [f"a{i}.png" for i in range(5)], size=(40, 56))
    write_images(photos, [f"b{i}.png" for i in range(3)], size=(48, 36), seed=1)  # another shape
    labelset = load_labelset(small_labelset)
    model = load_segmenter("maskclip:tiny-vit", labelset, pretrained=str(tiny_weights["tiny-vit"]),
                           model_config=str(TINY_CONFIGS["tiny-vit"]))
    return find_images([photos]).items, model, labelset


def outputs(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.parts[-2] in ("masks", "overlays", "scores")}


def test_pipeline_writes_the_same_files_as_one_process(tmp_path, setup):
    items, model, labelset = setup
    protocol = Protocol(short_side=64)
    plain = annotate(items, model, labelset, AnnotateConfig(out=tmp_path / "plain", workers=0, writer_threads=1,
                                                            protocol=protocol, overlay=True), argv=[])
    piped = annotate(items, model, labelset, AnnotateConfig(out=tmp_path / "piped", workers=2, writer_threads=3,
                                                            protocol=protocol, overlay=True), argv=[])
    assert plain.labelled == piped.labelled == 8 and not plain.failures and not piped.failures
    a, b = outputs(tmp_path / "plain"), outputs(tmp_path / "piped")
    assert len(a) == 16 and a == b
    assert (tmp_path / "plain" / "coco.json").read_text().split('"images"')[1] == \
        (tmp_path / "piped" / "coco.json").read_text().split('"images"')[1]


def test_batches_group_equal_shapes_and_label_every_image(tmp_path, setup, monkeypatch):
    items, model, labelset = setup
    shapes = []
    forward = type(model).forward

    def spy(self, x):
        shapes.append(tuple(x.shape))
        return forward(self, x)

    monkeypatch.setattr(type(model), "forward", spy)
    summary = annotate(items, model, labelset, AnnotateConfig(out=tmp_path / "out", batch_size=4, workers=1,
                                                              protocol=Protocol(short_side=64)), argv=[])
    assert summary.labelled == 8
    assert sum(s[0] for s in shapes) == 8  # every image once
    assert max(s[0] for s in shapes) == 4  # full batches of one shape
    assert len({s[1:] for s in shapes}) == 2


def test_batched_labels_match_single_images(tmp_path, setup):
    items, model, labelset = setup
    one = annotate(items, model, labelset, AnnotateConfig(out=tmp_path / "one", protocol=Protocol(short_side=64)),
                   argv=[])
    four = annotate(items, model, labelset, AnnotateConfig(out=tmp_path / "four", batch_size=4,
                                                           protocol=Protocol(short_side=64)), argv=[])
    assert one.labelled == four.labelled == 8
    from PIL import Image

    for p in sorted((tmp_path / "one" / "masks").glob("*.png")):
        a = np.asarray(Image.open(p))
        b = np.asarray(Image.open(tmp_path / "four" / "masks" / p.name))
        assert (a == b).mean() > 0.999  # float summation order may differ at near-ties, nothing more


def test_out_of_memory_halves_the_batch_and_retries(tmp_path, setup, monkeypatch, caplog):
    items, model, labelset = setup
    forward = type(model).forward
    seen = []

    def small_device(self, x):  # a device that fits at most two images
        seen.append(x.shape[0])
        if x.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return forward(self, x)

    monkeypatch.setattr(type(model), "forward", small_device)
    summary = annotate(items, model, labelset, AnnotateConfig(out=tmp_path / "out", batch_size=8, workers=0,
                                                              protocol=Protocol(short_side=64)), argv=[])
    assert summary.labelled == 8 and not summary.failures
    last_failure = max(i for i, n in enumerate(seen) if n > 2)
    assert seen[:last_failure + 1] == [5, 4] and max(seen[last_failure + 1:]) <= 2  # 8 -> 4 -> 2, then fits
    said = [r.getMessage() for r in caplog.records if r.name == "seglabel"]
    assert said == ["out of memory: batch size halved to 4", "out of memory: batch size halved to 2"]


def test_out_of_memory_at_batch_one_fails_only_the_images_that_do_not_fit(tmp_path, setup, monkeypatch):
    items, model, labelset = setup
    forward = type(model).forward

    def no_memory_for_wide_inputs(self, x):  # the CPU allocator's error, for the widest images only
        if x.shape[-1] > 200:
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory")
        return forward(self, x)

    write_images(tmp_path / "wide", ["w.jpg"], size=(40, 200))
    wide = find_images([tmp_path / "wide"]).items
    monkeypatch.setattr(type(model), "forward", no_memory_for_wide_inputs)
    summary = annotate(items[:2] + wide, model, labelset,
                       AnnotateConfig(out=tmp_path / "out", batch_size=4, protocol=Protocol(short_side=64)), argv=[])
    assert summary.labelled == 2 and [Path(p).name for p, _ in summary.failures] == ["w.jpg"]
    assert "not enough memory to label it at these settings" in summary.failures[0][1]
    assert sorted(p.name for p in (tmp_path / "out").rglob("masks/*.png")) == sorted(f"{i.key}.png" for i in items[:2])


def test_bf16_autocast_labels_on_cpu(tmp_path, setup):
    items, model, labelset = setup
    summary = annotate(items, model, labelset, AnnotateConfig(out=tmp_path / "out", precision="bf16",
                                                              protocol=Protocol(short_side=64)), argv=[])
    assert summary.labelled == 8 and not summary.failures


def test_text_embeddings_are_cached_on_disk(tmp_path, small_labelset, tiny_weights, monkeypatch):
    import seglabel.text as text

    monkeypatch.setenv("SEGLABEL_TEXT_CACHE", str(tmp_path / "cache"))
    calls = []
    encode = text.encode_prompts
    monkeypatch.setattr("seglabel.models.maskclip.encode_prompts",
                        lambda *a, **k: calls.append(1) or encode(*a, **k))
    labelset = load_labelset(small_labelset)
    kwargs = dict(pretrained=str(tiny_weights["tiny-vit"]), model_config=str(TINY_CONFIGS["tiny-vit"]))
    first = load_segmenter("maskclip:tiny-vit", labelset, **kwargs)
    second = load_segmenter("maskclip:tiny-vit", labelset, **kwargs)
    assert len(calls) == 1 and len(list((tmp_path / "cache").glob("*.safetensors"))) == 1
    assert torch.equal(first.text_embeddings, second.text_embeddings)
    other = labelset.to_dict()
    other["classes"] = other["classes"][:2]
    from seglabel.labelset import parse_labelset

    load_segmenter("maskclip:tiny-vit", parse_labelset(other), **kwargs)  # other prompts: encoded again
    assert len(calls) == 2
    monkeypatch.setenv("SEGLABEL_TEXT_CACHE", "off")
    load_segmenter("maskclip:tiny-vit", labelset, **kwargs)
    assert len(calls) == 3


def test_background_writer_keeps_order_and_surfaces_errors():
    writer = BackgroundWriter(threads=3, limit=4)
    done, lock, log = [], threading.Lock(), []

    def job(i):
        with lock:
            log.append(i)

    for i in range(10):
        done += writer.submit(i, job, i)
    done += writer.drain()
    assert done == list(range(10)) and sorted(log) == list(range(10))

    def broken():
        raise OutputError("x/y.png: cannot write (No space left on device)")

    writer.submit("bad", broken)
    with pytest.raises(OutputError, match="No space left"):
        writer.drain()
    writer.close()


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc")), reason="torch.compile on a CPU needs a C compiler")
def test_compiled_model_labels_like_the_eager_one(tmp_path, setup):
    """--compile: torch.compile (inductor, here on the CPU) gives the eager model's labels."""
    from PIL import Image

    items, model, labelset = setup
    items = [i for i in items if i.rel.startswith("a")][:2]
    eager = annotate(items, model, labelset, AnnotateConfig(out=tmp_path / "eager", protocol=Protocol(short_side=64)),
                     argv=[])
    compiled = annotate(items, model, labelset, AnnotateConfig(out=tmp_path / "compiled", compile=True,
                                                               protocol=Protocol(short_side=64)), argv=[])
    assert eager.labelled == compiled.labelled == 2
    assert hasattr(model.forward, "_torchdynamo_orig_callable")
    for p in sorted((tmp_path / "eager" / "masks").glob("*.png")):
        a, b = np.asarray(Image.open(p)), np.asarray(Image.open(tmp_path / "compiled" / "masks" / p.name))
        assert (a == b).mean() > 0.999
