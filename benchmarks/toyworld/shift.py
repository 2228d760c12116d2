"""A shifted toy world: the same scenes photographed worse (``distill_quality.py --shift``).

Every photo gets, drawn per scene from its own seed, the four shifts of issue 23: an illumination
gradient (a linear ramp of brightness, 0.55-1.45, in a random direction), a colour cast (each
channel scaled by 0.8-1.2 and offset by +-20), either a Gaussian blur (sigma 0.6-1.4) or JPEG
compression (quality 15-40), and multi-coloured speckles (2-5 % of pixels set to random colours).
The ground truth is unchanged: the classes are still where they were, only harder to see, and
colour (which tells the toy world's classes apart, and which the colour-affinity loss reads) is
no longer what it was.

    python benchmarks/toyworld/shift.py FOLDER --seed 7     # shifts FOLDER/images/*.png in place
"""
from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter


def shift_photo(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    h, w = rgb.shape[:2]
    x = rgb.astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)  # illumination: a ramp across the scene
    ys, xs = np.mgrid[0:h, 0:w]
    t = ((xs - w / 2) * np.cos(angle) + (ys - h / 2) * np.sin(angle)) / (0.5 * np.hypot(h, w))
    low, high = sorted(rng.uniform(0.55, 1.45, size=2))
    x *= (low + (high - low) * (t + 1) / 2)[..., None]
    x = x * rng.uniform(0.8, 1.2, size=3) + rng.uniform(-20, 20, size=3)  # colour cast
    img = Image.fromarray(np.clip(x, 0, 255).round().astype(np.uint8))
    if rng.uniform() < 0.5:
        img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.6, 1.4))))
    else:
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=int(rng.integers(15, 41)))
        img = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    out = np.array(img)
    speckled = rng.uniform(size=(h, w)) < rng.uniform(0.02, 0.05)
    out[speckled] = rng.integers(0, 256, size=(int(speckled.sum()), 3), dtype=np.uint8)
    return out


def shift_folder(images: Path, seed: int) -> int:
    """Shift every ``*.png`` under ``images`` in place (scene i of the sorted names: seed (seed, i))."""
    paths = sorted(images.glob("*.png"))
    for i, path in enumerate(paths):
        rng = np.random.default_rng([seed, i, 23])
        Image.fromarray(shift_photo(np.asarray(Image.open(path).convert("RGB")), rng)).save(path)
    return len(paths)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path, help="a scenes.py dataset (FOLDER/images)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(f"{shift_folder(args.folder / 'images', args.seed)} photos shifted")


if __name__ == "__main__":
    main()
