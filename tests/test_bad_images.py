"""Every kind of broken or awkward image file: through the real ``seglabel annotate`` (each bad
file reported with its path and reason, the others labelled, exit code FAILURES) and through
``load_image`` (what the pixels become)."""
from __future__ import annotations

import json
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from conftest import write_images
from seglabel import exitcodes
from seglabel.images import ImageError, load_image
from test_annotate_cli import annotate


# -- makers ------------------------------------------------------------------------------------------
def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bytes(width: int, height: int, bit_depth: int, color_type: int, rows: bytes | None) -> bytes:
    """A PNG written by hand: any header, any (even absent or lying) pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    idat = _chunk(b"IDAT", zlib.compress(rows)) if rows is not None else _chunk(b"IDAT", zlib.compress(b"\0" * 16))
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + idat + _chunk(b"IEND", b"")


def png16(path: Path, arr: np.ndarray) -> Path:
    """16-bit PNG (grey for 2-D, RGB for 3-D), big-endian samples as the format stores them."""
    h, w = arr.shape[:2]
    rows = b"".join(b"\0" + arr[y].astype(">u2").tobytes() for y in range(h))
    path.write_bytes(png_bytes(w, h, 16, 0 if arr.ndim == 2 else 2, rows))
    return path


def corrupt_mid_stream(src: Path, dst: Path) -> Path:
    """A PNG whose header and checksums are right but whose compressed pixels break halfway."""
    data = bytearray(src.read_bytes())
    i = data.find(b"IDAT")
    n = struct.unpack(">I", data[i - 4:i])[0]
    body = bytearray(data[i + 4:i + 4 + n])
    body[len(body) // 2:len(body) // 2 + 24] = b"\xff" * 24
    data[i + 4:i + 4 + n] = body
    data[i + 4 + n:i + 8 + n] = struct.pack(">I", zlib.crc32(b"IDAT" + bytes(body)))
    dst.write_bytes(bytes(data))
    return dst


def noise(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def make_zoo(folder: Path) -> tuple[dict[str, str], list[str]]:
    """(bad file -> words its reason must hold, files that must be labelled)."""
    folder.mkdir(parents=True, exist_ok=True)
    write_images(folder, ["good.jpg", "good2.png"])
    Image.fromarray(noise(40, 56, 1)).save(folder / "src.png")
    (folder / "zero.jpg").write_bytes(b"")
    good = (folder / "good.jpg").read_bytes()
    (folder / "cut_jpeg.jpg").write_bytes(good[: len(good) // 2])
    src = (folder / "src.png").read_bytes()
    (folder / "cut_png.png").write_bytes(src[: len(src) // 2])
    (folder / "notes.jpg").write_text("this is a text file, not a photo\n")
    corrupt_mid_stream(folder / "src.png", folder / "midway.png")
    (folder / "src.png").unlink()
    Image.fromarray(noise(70, 90, 2)).save(folder / "large.png")  # 6300 pixels: over --max-pixels 5000
    Image.fromarray(noise(40, 56, 3)).convert("CMYK").save(folder / "cmyk.jpg")
    png16(folder / "grey16.png", (np.arange(40 * 56).reshape(40, 56) * 29).astype(np.uint16))
    pal = Image.fromarray(np.tile(np.arange(4, dtype=np.uint8), (40, 14)), mode="P")
    pal.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 255, 255, 0] + [0] * 756)
    pal.save(folder / "palette.png", transparency=0)
    frames = [Image.new("RGB", (56, 40), c) for c in [(250, 0, 0), (0, 250, 0), (0, 0, 250)]]
    frames[0].save(folder / "anim_gif.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    frames[0].save(folder / "anim_webp.webp", save_all=True, append_images=frames[1:], duration=50, lossless=True)
    bad = {"zero.jpg": "empty file", "cut_jpeg.jpg": "truncated", "cut_png.png": "truncated", "notes.jpg": "not an image",
           "midway.png": "cannot decode", "large.png": "more than --max-pixels 5000"}
    labelled = ["good.jpg", "good2.png", "cmyk.jpg", "grey16.png", "palette.png", "anim_gif.gif", "anim_webp.webp"]
    return bad, labelled


# -- through the command line ---------------------------------------------------------------------------
@pytest.mark.slow
def test_bad_images_through_the_cli(tmp_path, tiny_weights, small_labelset):
    photos, out = tmp_path / "photos", tmp_path / "labels"
    bad, labelled = make_zoo(photos)
    r = annotate([photos], out, small_labelset, tiny_weights, "tiny-vit", "--json", "--max-pixels", "5000")
    assert r.returncode == exitcodes.FAILURES, r.stderr
    assert "Traceback" not in r.stderr
    summary = json.loads(r.stdout)
    reasons = {Path(f["path"]).name: f["reason"] for f in summary["failures"]}
    assert set(reasons) == set(bad), reasons
    for name, words in bad.items():
        assert words in reasons[name], (name, reasons[name])
        assert "\n" not in reasons[name]
    assert all(Path(f["path"]) == photos / Path(f["path"]).name for f in summary["failures"])  # the full path
    assert summary["labelled"] == len(labelled) and summary["exit_code"] == exitcodes.FAILURES
    for name in labelled:
        mask = Image.open(out / "masks" / Path(name).with_suffix(".png"))
        assert mask.size == (56, 40), name
        assert (out / "records" / Path(name).with_suffix(".json")).is_file()
    for name in bad:
        assert not (out / "masks" / Path(name).with_suffix(".png")).exists()
        assert not (out / "records" / Path(name).with_suffix(".json")).exists()
    coco = json.loads((out / "coco.json").read_text())
    assert sorted(i["file_name"] for i in coco["images"]) == sorted(labelled)
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]

    # The user raises the limit: the large image is labelled now; the broken ones are reported again,
    # on stderr this time (no --json), each as "failed: PATH: REASON".
    r = annotate([photos], out, small_labelset, tiny_weights, "tiny-vit", "--max-pixels", "6300")
    assert r.returncode == exitcodes.FAILURES, r.stderr
    assert Image.open(out / "masks" / "large.png").size == (90, 70)
    failed = [line.strip() for line in r.stderr.splitlines() if line.strip().startswith("failed: ")]
    named = {Path(line[len("failed: "):].split(": ")[0]).name for line in failed}
    assert named == set(bad) - {"large.png"}, r.stderr
    for line in failed:
        name = Path(line[len("failed: "):].split(": ")[0]).name
        assert str(photos / name) in line and bad[name] in line


# -- what the pixels become -------------------------------------------------------------------------------
def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    grey = np.array([[0, 0x00FF, 0x4000, 0x8000, 0xFFFF]], dtype=np.uint16)
    out = load_image(png16(tmp_path / "g.png", grey))
    assert out.dtype == np.uint8 and out.shape == (1, 5, 3)
    assert out[0, :, 0].tolist() == [0, 1, 64, 128, 255]  # clipping would give 0, 255, 255, 255, 255
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    rgb = np.array([[[0x8000, 0x00FF, 0xFFFF], [0x4000, 0x0100, 0]]], dtype=np.uint16)
    out = load_image(png16(tmp_path / "rgb.png", rgb))
    assert out[0].tolist() == [[128, 0, 255], [64, 1, 0]]


def test_float_image_in_unit_range_is_scaled(tmp_path):
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32)).save(tmp_path / "f.tif")
    assert load_image(tmp_path / "f.tif")[0, :, 0].tolist() == [0, 128, 255]


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    rgb = np.zeros((16, 16, 3), dtype=np.uint8)
    rgb[:, :8] = (200, 30, 30)
    rgb[:, 8:] = (30, 30, 200)
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "c.jpg", quality=95)
    assert Image.open(tmp_path / "c.jpg").mode == "CMYK"
    out = load_image(tmp_path / "c.jpg").astype(int)
    assert np.abs(out[4:12, 1:6] - (200, 30, 30)).max() < 25 and np.abs(out[4:12, 10:15] - (30, 30, 200)).max() < 25


def test_palette_with_transparency(tmp_path):
    pal = Image.fromarray(np.array([[0, 1, 2]], dtype=np.uint8), mode="P")
    pal.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 759)
    pal.save(tmp_path / "p.png", transparency=0)
    out = load_image(tmp_path / "p.png")
    assert out[0].tolist() == [[0, 0, 0], [0, 255, 0], [0, 0, 255]]  # transparent: black; opaque: its colour


@pytest.mark.parametrize("suffix, extra", [(".gif", {}), (".webp", {"lossless": True})])
def test_animation_gives_its_first_frame(tmp_path, suffix, extra):
    frames = [Image.new("RGB", (6, 5), c) for c in [(250, 0, 0), (0, 250, 0), (0, 0, 250)]]
    frames[0].save(tmp_path / f"a{suffix}", save_all=True, append_images=frames[1:], duration=50, loop=0, **extra)
    with Image.open(tmp_path / f"a{suffix}") as im:
        assert im.n_frames == 3
    out = load_image(tmp_path / f"a{suffix}")
    assert out.shape == (5, 6, 3) and np.abs(out.astype(int) - (250, 0, 0)).max() <= 6


def test_decompression_bomb_is_refused_from_the_header(tmp_path, monkeypatch):
    """A 100000 x 100000 PNG of a few bytes: refused from its header, no pixel decoded, in no time."""
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_bytes(100_000, 100_000, 8, 2, None))
    assert bomb.stat().st_size < 200

    def no_decoding(self):
        raise AssertionError("pixels were decoded before the size was checked")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    start = time.perf_counter()
    with pytest.raises(ImageError, match="100000x100000 is 10000000000 pixels, more than --max-pixels") as err:
        load_image(bomb)
    assert time.perf_counter() - start < 1.0 and str(bomb) in str(err.value)


def test_raised_limit_replaces_pils_own(tmp_path, monkeypatch):
    """``--max-pixels`` decides, also above PIL's built-in bomb limit; PIL's setting is restored."""
    Image.fromarray(noise(60, 60)).save(tmp_path / "x.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL alone would refuse 3600 pixels
    with pytest.raises(Image.DecompressionBombError):
        Image.open(tmp_path / "x.png")
    assert load_image(tmp_path / "x.png", max_pixels=3600).shape == (60, 60, 3)
    with pytest.raises(ImageError, match="more than --max-pixels 3599"):
        load_image(tmp_path / "x.png", max_pixels=3599)
    assert Image.MAX_IMAGE_PIXELS == 1000


def test_failing_mid_decode(tmp_path):
    Image.fromarray(noise(40, 56)).save(tmp_path / "src.png")
    bad = corrupt_mid_stream(tmp_path / "src.png", tmp_path / "bad.png")
    with Image.open(bad) as im:
        assert im.size == (56, 40)  # the header is fine: it breaks while decoding
    with pytest.raises(ImageError, match="cannot decode") as err:
        load_image(bad)
    assert str(err.value).startswith(f"{bad}: ") and len(str(err.value).splitlines()) == 1


def test_a_decoder_raising_anything_is_an_image_error(tmp_path, monkeypatch):
    """Decoders of odd files raise odd types (struct.error, IndexError...): one ImageError each."""
    Image.fromarray(noise(8, 8)).save(tmp_path / "x.png")

    def explode(self):
        raise IndexError("list index out of range")

    monkeypatch.setattr(ImageFile.ImageFile, "load", explode)
    with pytest.raises(ImageError, match="cannot decode.*list index out of range"):
        load_image(tmp_path / "x.png")


def test_not_a_regular_file(tmp_path):
    import os

    os.mkfifo(tmp_path / "pipe.jpg")  # opening it would wait forever for a writer
    with pytest.raises(ImageError, match="not a regular file"):
        load_image(tmp_path / "pipe.jpg")
