"""JPEG decoding on the model's device (decode.py, loader.py): which files go there, the batched
decode, the CPU fallback, and annotate's outputs either way.

Without a GPU the device path runs on the CPU, where torchvision's decoder is libjpeg-turbo like
PIL's: the pixels, tensors and written files must then be identical to the CPU path, which checks
all the plumbing (windows, order, fallbacks). Tests marked ``cuda`` check nvjpeg itself and are
skipped without CUDA (benchmarks/gpu_suite.sh runs them)."""
from __future__ import annotations

import io
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import TINY_CONFIGS
from seglabel import decode as decode_module, loader as loader_module
from seglabel.annotate import AnnotateConfig, annotate
from seglabel.decode import decode_jpegs, device_jpeg
from seglabel.images import DEFAULT_MAX_PIXELS, find_images, load_image
from seglabel.labelset import load_labelset
from seglabel.loader import decode_device, load_images
from seglabel.models.registry import load_segmenter
from seglabel.predict import Predictor, Protocol

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
MEAN, STD = (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)


def photo(height=48, width=64, seed=0) -> np.ndarray:
    """Smooth colours with some texture: what a camera gives, not noise."""
    rng = np.random.default_rng(seed)
    low = torch.from_numpy(rng.random((1, 3, 4, 5)).astype(np.float32))
    img = F.interpolate(low, size=(height, width), mode="bilinear", align_corners=False)[0].permute(1, 2, 0)
    img = img.numpy() * 255 + rng.normal(0, 8, (height, width, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def jpeg_bytes(rgb: np.ndarray, **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=90, **save)
    return buf.getvalue()


def with_app14(data: bytes, transform: int) -> bytes:
    """The JPEG with an Adobe APP14 segment saying how its colours are stored (0: RGB)."""
    body = b"Adobe" + struct.pack(">HHHB", 100, 0, 0, transform)
    return data[:2] + b"\xff\xee" + struct.pack(">H", len(body) + 2) + body + data[2:]


def make_tree(folder: Path) -> dict[str, bool]:
    """Files of every kind; name -> whether it goes to the device decoder."""
    folder.mkdir(parents=True, exist_ok=True)
    rgb = photo()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90
    cases = {
        "a_420.jpg": (jpeg_bytes(rgb), True),
        "b_444.jpg": (jpeg_bytes(photo(40, 56, 1), subsampling=0), True),
        "c_422.jpg": (jpeg_bytes(photo(33, 47, 2), subsampling=1), True),  # odd sizes: partial MCUs
        "d_progressive.jpg": (jpeg_bytes(photo(seed=3), progressive=True), True),
        "e_upright_exif.jpg": (jpeg_bytes(photo(seed=4), exif=Image.Exif()), True),
        "f_rotated.jpg": (jpeg_bytes(photo(seed=5), exif=exif), False),
        "g_grey.jpg": (_save(Image.fromarray(photo(seed=6)[:, :, 0], "L"), "JPEG"), False),
        "h_cmyk.jpg": (_save(Image.fromarray(photo(seed=7)).convert("CMYK"), "JPEG"), False),
        "i_adobe_rgb.jpg": (with_app14(jpeg_bytes(photo(seed=8)), 0), False),
        "j_truncated.jpg": (jpeg_bytes(photo(seed=9))[:600], False),
        "k_png.png": (_save(Image.fromarray(photo(seed=10)), "PNG"), False),
        "l_not_an_image.jpg": (b"\xff\xd8 this is text \xff\xd9", False),
        "m_empty.jpg": (b"", False),
    }
    for name, (data, _) in cases.items():
        (folder / name).write_bytes(data)
    return {name: on_device for name, (_, on_device) in cases.items()}


def _save(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def test_which_files_go_to_the_device(tmp_path):
    expected = make_tree(tmp_path)
    for name, on_device in expected.items():
        found = device_jpeg(tmp_path / name, DEFAULT_MAX_PIXELS)
        assert (found is not None) == on_device, name
        if found is not None:
            data, size = found
            assert data.dtype == torch.uint8 and data.numel() == (tmp_path / name).stat().st_size
            assert size == load_image(tmp_path / name).shape[:2]
    assert device_jpeg(tmp_path / "a_420.jpg", max_pixels=48 * 64 - 1) is None  # load_image refuses it
    assert device_jpeg(tmp_path / "missing.jpg", DEFAULT_MAX_PIXELS) is None


def test_device_decoder_on_cpu_gives_pil_pixels(tmp_path):
    expected = make_tree(tmp_path)
    names = [n for n, ok in expected.items() if ok]
    decoded = decode_jpegs([device_jpeg(tmp_path / n, DEFAULT_MAX_PIXELS)[0] for n in names], "cpu")
    for name, px in zip(names, decoded):
        np.testing.assert_array_equal(px.permute(1, 2, 0).numpy(), load_image(tmp_path / name), err_msg=name)


def test_a_refused_jpeg_does_not_sink_the_batch():
    good = torch.frombuffer(bytearray(jpeg_bytes(photo())), dtype=torch.uint8)
    bad = torch.frombuffer(bytearray(b"\xff\xd8\xff\xe0 not really a jpeg \xff\xd9"), dtype=torch.uint8)
    out = decode_jpegs([good, bad, good], "cpu")
    assert out[1] is None and out[0] is not None and torch.equal(out[0], out[2])
    assert decode_jpegs([], "cpu") == []


def loaded_fields(ld):
    tensor = None if ld.tensor is None else ld.tensor.cpu()
    return ld.item, tensor, ld.size, ld.rgb, ld.error, ld.shown_path, ld.jpeg


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_device_path_equals_cpu_path(tmp_path, workers):
    make_tree(tmp_path)
    items = find_images([tmp_path]).items
    protocol = Protocol(short_side=32)
    cpu = list(load_images(items, protocol, MEAN, STD, DEFAULT_MAX_PIXELS, keep_rgb=True, workers=workers))
    dev = list(load_images(items, protocol, MEAN, STD, DEFAULT_MAX_PIXELS, keep_rgb=True, workers=workers,
                           decode_on=torch.device("cpu"), decode_batch=3))
    assert [ld.item for ld in dev] == items  # order kept across windows
    for a, b in zip(cpu, dev):
        fa, fb = loaded_fields(a), loaded_fields(b)
        assert fa[0] == fb[0] and fa[2] == fb[2] and fa[4:] == fb[4:], a.item.rel
        assert (fa[1] is None) == (fb[1] is None)
        if fa[1] is not None:
            assert torch.equal(fa[1], fb[1]), a.item.rel
            np.testing.assert_array_equal(fa[3], fb[3])
    assert sum(ld.error is not None for ld in dev) == 3  # truncated, not an image, empty: reported as before


def test_loader_batches_jpegs_and_falls_back_per_image(tmp_path, monkeypatch):
    make_tree(tmp_path)
    items = find_images([tmp_path]).items
    calls = []
    real = decode_module._decode

    def refusing(encoded, device):  # the device decoder refuses the 4:4:4 file
        calls.append(len(encoded))
        if any(e.numel() == (tmp_path / "b_444.jpg").stat().st_size for e in encoded):
            raise RuntimeError("nvjpeg says no")
        return real(encoded, device)

    monkeypatch.setattr(decode_module, "_decode", refusing)
    protocol = Protocol(short_side=32)
    dev = list(load_images(items, protocol, MEAN, STD, DEFAULT_MAX_PIXELS, decode_on=torch.device("cpu"),
                           decode_batch=2))
    cpu = list(load_images(items, protocol, MEAN, STD, DEFAULT_MAX_PIXELS))
    # windows of 2 files: a_420 + b_444 (refused: retried one by one), c_422 + d_progressive,
    # e_upright_exif + f_rotated (CPU path), then no JPEG the device takes
    assert calls == [2, 1, 1, 2, 1]
    for a, b in zip(cpu, dev):
        assert a.error == b.error and (a.tensor is None or torch.equal(a.tensor, b.tensor)), a.item.rel


def test_tta_and_cpu_choice_keep_the_cpu_path(tmp_path, monkeypatch):
    make_tree(tmp_path)
    items = find_images([tmp_path]).items
    monkeypatch.setattr(loader_module, "device_jpeg", lambda *a: pytest.fail("device path taken"))
    for ld in load_images(items, Protocol(tta=True), MEAN, STD, DEFAULT_MAX_PIXELS, decode_on=torch.device("cpu")):
        assert ld.jpeg is None and ld.tensor is None
    assert decode_device("cpu", torch.device("cpu")) is None
    assert decode_device("auto", torch.device("cpu")) is None  # no GPU: PIL in the loader, as before
    assert decode_device("device", torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(ValueError, match="--decode gpu"):
        decode_device("gpu", torch.device("cpu"))


@pytest.fixture
def tiny_model(small_labelset, tiny_weights):
    labelset = load_labelset(small_labelset)
    model = load_segmenter("maskclip:tiny-vit", labelset, pretrained=str(tiny_weights["tiny-vit"]),
                           model_config=str(TINY_CONFIGS["tiny-vit"]))
    return model, labelset


def written(out: Path) -> dict[str, bytes]:
    """The files, records without the time their mask was written (the one thing that differs)."""
    files = {}
    for p in sorted(out.rglob("*")):
        if p.is_file() and p.parts[-2] in ("masks", "overlays", "scores", "records"):
            files[p.relative_to(out).as_posix()] = p.read_bytes()
            if p.suffix == ".json":
                record = json.loads(p.read_bytes())
                del record["mask"]["mtime_ns"]
                files[p.relative_to(out).as_posix()] = json.dumps(record).encode()
    return files


def test_annotate_writes_the_same_files_with_either_decoder(tmp_path, tiny_model):
    model, labelset = tiny_model
    make_tree(tmp_path / "photos")
    found = find_images([tmp_path / "photos"])
    runs = {}
    for decode in ("cpu", "device"):
        config = AnnotateConfig(out=tmp_path / decode, protocol=Protocol(short_side=32), batch_size=3,
                                overlay=True, save_scores=True, decode=decode)
        runs[decode] = annotate(found.items, model, labelset, config, argv=[])
    assert runs["cpu"].labelled == runs["device"].labelled == 10
    assert runs["cpu"].failures == runs["device"].failures and len(runs["cpu"].failures) == 3
    a, b = written(tmp_path / "cpu"), written(tmp_path / "device")
    assert len(a) == 40 and a == b


def test_labels_come_back_as_uint8(tmp_path, tiny_model):
    model, _ = tiny_model
    [pred] = Predictor(model, Protocol(short_side=32)).predict([photo()])
    assert pred.labels.dtype == np.uint8 and pred.confidence.dtype == np.float32
    assert pred.labels.shape == pred.confidence.shape == (48, 64)


# -- on a GPU -------------------------------------------------------------------------------------
@pytest.mark.cuda
@needs_cuda
def test_nvjpeg_matches_libjpeg_within_decoder_differences(tmp_path):
    """nvjpeg and libjpeg-turbo use different IDCTs and chroma upsampling: pixels differ by a few
    levels. torchvision's own test allows a mean absolute difference under 2."""
    expected = make_tree(tmp_path)
    names = [n for n, ok in expected.items() if ok]
    decoded = decode_jpegs([device_jpeg(tmp_path / n, DEFAULT_MAX_PIXELS)[0] for n in names], "cuda")
    for name, px in zip(names, decoded):
        assert px is not None and px.is_cuda and px.dtype == torch.uint8, name
        diff = (px.permute(1, 2, 0).cpu().int() - torch.from_numpy(load_image(tmp_path / name)).int()).abs()
        print(f"{name}: max abs diff {diff.max().item()}, mean {diff.float().mean().item():.3f}")
        assert diff.float().mean() < 2, name


@pytest.mark.cuda
@needs_cuda
def test_cuda_loader_decodes_on_the_gpu_and_falls_back_on_the_cpu(tmp_path):
    expected = make_tree(tmp_path)
    items = find_images([tmp_path]).items
    protocol = Protocol(short_side=32)
    assert decode_device("auto", torch.device("cuda")) == torch.device("cuda")
    cpu = list(load_images(items, protocol, MEAN, STD, DEFAULT_MAX_PIXELS))
    gpu = list(load_images(items, protocol, MEAN, STD, DEFAULT_MAX_PIXELS, decode_on=torch.device("cuda"),
                           decode_batch=4))
    for a, b in zip(cpu, gpu):
        assert a.item == b.item and a.error == b.error and a.size == b.size
        if a.tensor is None:
            continue
        if expected[a.item.rel]:  # decoded by nvjpeg, resized on the GPU
            assert b.tensor.is_cuda
            assert (a.tensor - b.tensor.cpu()).abs().mean() < 2 / 255 / min(STD)
        else:  # the CPU path: the same tensor
            assert torch.equal(a.tensor, b.tensor)


@pytest.mark.cuda
@needs_cuda
def test_cuda_annotate_labels_agree_with_cpu_decoding(tmp_path, small_labelset, tiny_weights):
    labelset = load_labelset(small_labelset)
    model = load_segmenter("maskclip:tiny-vit", labelset, pretrained=str(tiny_weights["tiny-vit"]),
                           model_config=str(TINY_CONFIGS["tiny-vit"]), device=torch.device("cuda"))
    make_tree(tmp_path / "photos")
    found = find_images([tmp_path / "photos"])
    for decode in ("cpu", "device"):
        config = AnnotateConfig(out=tmp_path / decode, protocol=Protocol(short_side=32), batch_size=4,
                                decode=decode, overlay=True)
        summary = annotate(found.items, model, labelset, config, argv=[])
        assert summary.labelled == 10 and len(summary.failures) == 3
    same = total = 0
    for p in sorted((tmp_path / "cpu" / "masks").glob("*.png")):
        a, b = np.asarray(Image.open(p)), np.asarray(Image.open(tmp_path / "device" / "masks" / p.name))
        same, total = same + (a == b).sum(), total + a.size
    print(f"labels equal at {same / total:.4%} of pixels")
    # a random tiny model at 32 pixels has small margins: a level of pixel difference flips a few
    assert same / total > 0.9


@pytest.mark.cuda
@needs_cuda
def test_cuda_predictions_come_back_as_uint8_and_match_the_cpu(tiny_model):
    model, _ = tiny_model
    images = [photo(seed=s) for s in range(3)]
    cpu = Predictor(model, Protocol(short_side=32), batch_size=3).predict(images)
    gpu = Predictor(model.to("cuda"), Protocol(short_side=32), batch_size=3).predict(images)
    for a, b in zip(cpu, gpu):
        assert b.labels.dtype == np.uint8 and b.confidence.dtype == np.float32
        assert (a.labels == b.labels).mean() > 0.98  # TF32 convolutions on the GPU: not bit-equal
        np.testing.assert_allclose(a.confidence, b.confidence, atol=2e-2)


def test_cuda_marker_is_registered(pytestconfig):
    assert any(m.startswith("cuda:") for m in pytestconfig.getini("markers"))



@pytest.mark.slow
def test_cli_decode_flag(tmp_path, tiny_weights, small_labelset):
    import json
    import os
    import subprocess
    import sys

    make_tree(tmp_path / "photos")

    def cli(out, *extra):
        return subprocess.run(
            [sys.executable, "-m", "seglabel", "annotate", str(tmp_path / "photos"), "--labels", str(small_labelset),
             "--out", str(out), "--model", "maskclip:tiny-vit", "--model-config", str(TINY_CONFIGS["tiny-vit"]),
             "--pretrained", str(tiny_weights["tiny-vit"]), "--short-side", "32", *extra],
            capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)

    bad = cli(tmp_path / "bad", "--decode", "gpu")
    assert bad.returncode == 2 and "--decode gpu: choose auto, cpu or device" in bad.stderr
    assert not (tmp_path / "bad").exists()
    ok = cli(tmp_path / "ok", "--decode", "device", "--quiet")
    assert ok.returncode == 3, ok.stderr  # 3: the three unreadable files, reported as before
    assert json.loads((tmp_path / "ok" / "run.json").read_text())["options"]["decode"] == "device"
    assert len(list((tmp_path / "ok" / "masks").glob("*.png"))) == 10
