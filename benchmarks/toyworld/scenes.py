"""Procedural "toy world" scenes with exact per-pixel ground truth and captions.

Every scene is a background of one or two "stuff" classes (grass, sky, sand, water: each a
distinct procedural texture) split by a random line, with 1-3 "things" on top (filled circles,
squares or triangles). A thing's class is its colour only -- its shape is random -- so a class
can be told from its colour or texture alone, never from a shape + colour combination.

``make_scene(rng)`` returns ``(image, mask, caption)``:

* ``image``: uint8 ``(H, W, 3)`` RGB;
* ``mask``: uint8 ``(H, W)``, the class index of every pixel, in the order of ``CLASSES``
  (the same order as ``labelsets/toyworld.yaml``);
* ``caption``: e.g. ``"a photo of grass, sky and a red toy."``, naming exactly the classes
  present in ``mask`` with the label set's prompts (``PROMPTS``), in random order.

Everything is drawn from the ``numpy.random.Generator`` passed in, so a seed fixes a scene.

CLI: ``python benchmarks/toyworld/scenes.py OUT --n 50 --seed 1 [--size 64]`` writes
``OUT/images/NNNNN.png``, ``OUT/gt/NNNNN.png`` (8-bit class indices) and ``OUT/captions.jsonl``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

# -- the vocabulary (order = class index = labelsets/toyworld.yaml) -------------------------------
STUFF = ["grass", "sky", "sand", "water"]
THINGS = ["red toy", "yellow toy", "purple toy", "orange toy", "pink toy", "black toy"]
CLASSES = STUFF + THINGS
# The phrase for each class inside a caption; also the class's prompt in the label set.
PROMPTS = STUFF + [("an " if t[0] in "aeiou" else "a ") + t for t in THINGS]
CAPTION_TEMPLATE = "a photo of {}."

# Base RGB of each thing class (each scene jitters it a little and adds shading).
THING_RGB = {
    "red toy": (215, 25, 30),
    "yellow toy": (250, 225, 20),
    "purple toy": (125, 40, 185),
    "orange toy": (250, 125, 10),
    "pink toy": (250, 130, 205),
    "black toy": (25, 25, 25),
}
SHAPES = ("circle", "square", "triangle")

N_STUFF = len(STUFF)
N_CLASSES = len(CLASSES)


# -- stuff textures ---------------------------------------------------------------------------
def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell: int) -> np.ndarray:
    """Value noise in [-1, 1]: a coarse random grid upsampled bilinearly."""
    gh, gw = h // cell + 3, w // cell + 3
    g = rng.uniform(-1.0, 1.0, size=(gh, gw))
    ys = np.arange(h) / cell + rng.uniform(0, 1)
    xs = np.arange(w) / cell + rng.uniform(0, 1)
    y0, x0 = ys.astype(int), xs.astype(int)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    a = g[y0][:, x0]
    b = g[y0][:, x0 + 1]
    c = g[y0 + 1][:, x0]
    d = g[y0 + 1][:, x0 + 1]
    return (a * (1 - fx) + b * fx) * (1 - fy) + (c * (1 - fx) + d * fx) * fy


def _grass(rng, h, w, s):
    base = np.array([70, 150, 50]) + rng.uniform(-15, 15, size=3)
    img = np.broadcast_to(base, (h, w, 3)).astype(np.float32).copy()
    # blades: short vertical streaks (noise stretched along y), darker or lighter
    blade = max(2, int(round(5 * s)))
    streaks = rng.normal(size=(h // blade + 2, w))
    offs = rng.integers(0, blade, size=w)
    rows = (np.arange(h)[:, None] + offs[None, :]) // blade
    streak = streaks[rows, np.arange(w)[None, :]]
    img += (streak * 28)[..., None] * np.array([0.5, 1.0, 0.4])
    img += _smooth_noise(rng, h, w, max(2, int(10 * s)))[..., None] * 15
    img += rng.normal(0, 6, size=(h, w, 1))
    return img


def _sky(rng, h, w, s):
    top = np.array([60, 120, 220]) + rng.uniform(-15, 15, size=3)
    bottom = np.array([150, 200, 245]) + rng.uniform(-10, 10, size=3)
    t = np.linspace(0, 1, h)[:, None, None]
    img = (top * (1 - t) + bottom * t) * np.ones((1, w, 1))
    # clouds: a few soft white blobs
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cloud = np.zeros((h, w), np.float32)
    for _ in range(rng.integers(1, 4)):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        ry, rx = rng.uniform(3, 7) * s, rng.uniform(7, 16) * s
        cloud += np.exp(-(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2))
    cloud = np.clip(cloud * 1.3, 0, 1) * (0.7 + 0.3 * _smooth_noise(rng, h, w, max(2, int(4 * s))))
    img = img * (1 - cloud[..., None]) + 250 * cloud[..., None]
    img += rng.normal(0, 2, size=(h, w, 1))
    return img.astype(np.float32)


def _sand(rng, h, w, s):
    base = np.array([220, 195, 145]) + rng.uniform(-12, 12, size=3)
    img = np.broadcast_to(base, (h, w, 3)).astype(np.float32).copy()
    img += _smooth_noise(rng, h, w, max(2, int(12 * s)))[..., None] * np.array([12, 12, 10])
    # speckles: scattered dark-brown and light grains
    u = rng.uniform(size=(h, w))
    img[u < 0.10] += np.array([-70, -70, -60])
    img[u > 0.93] += np.array([25, 25, 30])
    img += rng.normal(0, 5, size=(h, w, 1))
    return img


def _water(rng, h, w, s):
    base = np.array([25, 80, 160]) + rng.uniform(-12, 12, size=3)
    img = np.broadcast_to(base, (h, w, 3)).astype(np.float32).copy()
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    f = rng.uniform(0.8, 1.3) / s
    wob = np.sin(xx * rng.uniform(0.15, 0.35) / s + rng.uniform(0, 6.3)) * rng.uniform(1.5, 3.0) * s
    waves = np.sin((yy + wob) * f + rng.uniform(0, 6.3))
    crest = np.clip(waves, 0, 1) ** 4  # thin bright crests
    img += crest[..., None] * np.array([90, 100, 80])
    img += _smooth_noise(rng, h, w, max(2, int(8 * s)))[..., None] * np.array([5, 10, 15])
    img += rng.normal(0, 4, size=(h, w, 1))
    return img


_TEXTURES = {"grass": _grass, "sky": _sky, "sand": _sand, "water": _water}


# -- things -----------------------------------------------------------------------------------
def _shape_mask(rng, h, w, s, shape):
    """A boolean mask of one filled shape at a random place, size and rotation."""
    r = rng.uniform(7, 15) * s
    my, mx = min(r * 0.6, h / 2), min(r * 0.6, w / 2)  # keep most of it inside the image
    cy, cx = rng.uniform(my, h - my), rng.uniform(mx, w - mx)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    dy, dx = yy - cy, xx - cx
    if shape == "circle":
        return dy ** 2 + dx ** 2 <= r ** 2
    a = rng.uniform(0, np.pi)
    u = dx * np.cos(a) + dy * np.sin(a)
    v = -dx * np.sin(a) + dy * np.cos(a)
    if shape == "square":
        half = r * 0.85
        return (np.abs(u) <= half) & (np.abs(v) <= half)
    # equilateral triangle with circumradius ~1.2 r: inside all three half-planes
    inside = np.ones((h, w), bool)
    rr = r * 1.2
    for k in range(3):
        t = a + 2 * np.pi * k / 3
        inside &= (dx * np.cos(t) + dy * np.sin(t)) <= rr / 2
    return inside


def _thing_pixels(rng, h, w, name, region):
    n = int(region.sum())
    rgb = np.array(THING_RGB[name], np.float32) + rng.uniform(-12, 12, size=3)
    # gentle shading (a linear light gradient) plus a little noise
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    a = rng.uniform(0, 2 * np.pi)
    shade = ((xx * np.cos(a) + yy * np.sin(a)) / max(h, w))[region]
    shade = (shade - shade.mean()) * rng.uniform(20, 45)
    vals = rgb[None, :] + shade[:, None] + rng.normal(0, 4, size=(n, 1))
    return vals


# -- scenes -----------------------------------------------------------------------------------
def _stuff_layout(rng, h, w):
    """Index (into the chosen stuff list) per pixel: one region, or two split by a random line."""
    if rng.uniform() < 0.3:
        return np.zeros((h, w), np.int64), 1
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    kind = rng.uniform()
    if kind < 0.5:  # a horizon: nearly horizontal line, somewhere in the middle
        y0 = rng.uniform(0.3, 0.7) * h
        slope = rng.uniform(-0.25, 0.25)
        wobble = np.sin(xx / w * rng.uniform(2, 8) + rng.uniform(0, 6.3)) * rng.uniform(0, 2.5) * h / 64
        side = yy > y0 + slope * (xx - w / 2) + wobble
    else:  # any direction through a point near the centre
        a = rng.uniform(0, 2 * np.pi)
        py, px = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w
        side = (xx - px) * np.cos(a) + (yy - py) * np.sin(a) > 0
    return side.astype(np.int64), 2


def make_scene(rng: np.random.Generator, size: int = 64,
               n_stuff: int | None = None, n_things: int | None = None, zoom: float = 1.0):
    """One scene: ``(image uint8 HxWx3, mask uint8 HxW, caption str)``.

    ``n_stuff`` (1 or 2) and ``n_things`` (0..3) force the number of stuff regions / things;
    by default 1 or 2 stuff classes and 1-3 things are drawn. ``zoom`` > 1 draws a close-up:
    textures and things that many times larger (a thing may then fill the whole image).
    """
    h = w = int(size)
    s = size / 64.0 * zoom
    layout, k = _stuff_layout(rng, h, w)
    if n_stuff is not None and n_stuff != k:
        if n_stuff == 1:
            layout, k = np.zeros((h, w), np.int64), 1
        else:
            while k != 2:
                layout, k = _stuff_layout(rng, h, w)
    stuff = rng.choice(N_STUFF, size=k, replace=False)
    img = np.zeros((h, w, 3), np.float32)
    mask = np.zeros((h, w), np.uint8)
    for j, c in enumerate(stuff):
        region = layout == j
        img[region] = _TEXTURES[STUFF[c]](rng, h, w, s)[region]
        mask[region] = c

    n = int(rng.integers(1, 4)) if n_things is None else int(n_things)
    min_visible = max(12, int(25 * s * s))
    placed: list[np.ndarray] = []  # the visible pixels of each thing placed so far
    for _ in range(n):
        cls = int(rng.integers(N_STUFF, N_CLASSES))
        name = CLASSES[cls]
        shape = SHAPES[rng.integers(len(SHAPES))]
        for _attempt in range(20):
            region = _shape_mask(rng, h, w, s, shape)
            # every thing placed before must stay clearly visible
            if int(region.sum()) >= min_visible and all(int((p & ~region).sum()) >= min_visible for p in placed):
                break
        else:
            continue
        placed = [p & ~region for p in placed] + [region]
        img[region] = _thing_pixels(rng, h, w, name, region)
        mask[region] = cls

    image = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    present = [int(c) for c in np.unique(mask)]
    return image, mask, caption_for(present, rng)


def caption_for(classes, rng: np.random.Generator | None = None, template: str = CAPTION_TEMPLATE) -> str:
    """``"a photo of grass, sky and a red toy."`` for the given class indices (shuffled if rng)."""
    classes = list(classes)
    if rng is not None:
        classes = [classes[i] for i in rng.permutation(len(classes))]
    phrases = [PROMPTS[c] for c in classes]
    text = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return template.format(text)


def classes_in_caption(caption: str) -> set[int]:
    """The class indices named by a caption made by ``caption_for``."""
    body = caption
    for part in CAPTION_TEMPLATE.split("{}"):
        body = body.replace(part, " ") if part else body
    names = set()
    for piece in body.replace(" and ", ",").split(","):
        piece = piece.strip()
        if piece:
            names.add(PROMPTS.index(piece))
    return names


def write_dataset(out_dir, n: int, seed: int, size: int = 64) -> None:
    """Write ``n`` scenes: ``images/NNNNN.png``, ``gt/NNNNN.png`` and ``captions.jsonl``."""
    from PIL import Image

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "gt").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    with open(out / "captions.jsonl", "w", encoding="utf-8") as f:
        for i in range(n):
            image, mask, caption = make_scene(rng, size)
            stem = f"{i:05d}"
            Image.fromarray(image, "RGB").save(out / "images" / f"{stem}.png")
            Image.fromarray(mask, "L").save(out / "gt" / f"{stem}.png")
            f.write(json.dumps({"image": f"images/{stem}.png", "gt": f"gt/{stem}.png",
                                "caption": caption,
                                "classes": [CLASSES[c] for c in np.unique(mask)]}) + "\n")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="output folder")
    p.add_argument("--n", type=int, default=50, help="number of scenes")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    a = p.parse_args(argv)
    write_dataset(a.out, a.n, a.seed, a.size)
    print(f"wrote {a.n} scenes to {a.out}")


if __name__ == "__main__":
    main()
