"""Reading every kind of image file as RGB, and finding inputs."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from seglabel.errors import UsageError
from seglabel.images import ImageError, find_images, load_image


def test_exif_orientation_is_applied(tmp_path):
    arr = np.zeros((10, 20, 3), dtype=np.uint8)
    arr[:, :5] = 255
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    img.save(tmp_path / "r.jpg", exif=exif)
    out = load_image(tmp_path / "r.jpg")
    assert out.shape == (20, 10, 3)
    assert out[:5].mean() > 200 and out[-5:].mean() < 50  # the white stripe moved to the top


@pytest.mark.parametrize("mode", ["CMYK", "L", "LA", "I;16", "P", "RGBA", "1"])
def test_any_mode_becomes_rgb(tmp_path, mode):
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 9, 3), dtype=np.uint8))
    img = rgb.convert(mode) if mode != "I;16" else Image.fromarray((np.arange(72).reshape(8, 9) * 900).astype(np.uint16))
    ext = "tif" if mode in ("CMYK", "I;16") else "png"
    img.save(tmp_path / f"x.{ext}")
    out = load_image(tmp_path / f"x.{ext}")
    assert out.shape == (8, 9, 3) and out.dtype == np.uint8
    if mode == "I;16":
        assert out[0, 0, 0] == 0 and out[-1, -1, 0] == round(71 * 900 * 255 / 65535)


def test_palette_transparency_and_animation_first_frame(tmp_path):
    frames = [Image.new("P", (6, 6), i) for i in (1, 2)]
    for f in frames:
        f.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:], transparency=0)
    out = load_image(tmp_path / "a.gif")
    assert tuple(out[0, 0]) == (255, 0, 0)


def test_too_many_pixels_is_refused(tmp_path):
    Image.new("RGB", (100, 100)).save(tmp_path / "big.png")
    with pytest.raises(ImageError, match="more than --max-pixels 9999"):
        load_image(tmp_path / "big.png", max_pixels=9999)
    assert load_image(tmp_path / "big.png", max_pixels=10000).shape == (100, 100, 3)


@pytest.mark.parametrize("content, reason", [(b"", "not an image"), (b"hello", "not an image")])
def test_broken_files(tmp_path, content, reason):
    (tmp_path / "x.jpg").write_bytes(content)
    with pytest.raises(ImageError, match=reason) as err:
        load_image(tmp_path / "x.jpg")
    assert str(tmp_path / "x.jpg") in str(err.value)


def test_truncated_png(tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "t.png")
    data = (tmp_path / "t.png").read_bytes()
    (tmp_path / "t.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="cannot decode"):
        load_image(tmp_path / "t.png")


def test_find_images_sorted_relative_and_excluding_output(tmp_path):
    for rel in ["b/2.png", "a.JPG", "b/1.jpeg", "notes.txt", "out/x.png", "b/c/3.tif"]:
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    found = find_images([tmp_path], exclude=[tmp_path / "out"])
    assert [i.rel for i in found.items] == ["a.JPG", "b/1.jpeg", "b/2.png", "b/c/3.tif"]
    assert [i.key for i in found.items] == ["a", "b/1", "b/2", "b/c/3"]
    with pytest.raises(UsageError, match="no such file or folder"):
        find_images([tmp_path / "missing"])


def test_symlink_loops_do_not_hang(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "loop").symlink_to(tmp_path / "d")
    (tmp_path / "d" / "a.png").write_bytes(b"x")
    assert [i.rel for i in find_images([tmp_path]).items] == ["d/a.png"]
