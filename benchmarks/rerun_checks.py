"""What knowing the photo and the mask costs (records.py): the photo's fingerprint, taken while
annotate reads the photo (``images.file_fingerprint``: size, mtime, SHA-256 of the file), against
decoding it (``images.load_image``); and a rerun's plan per image already done (``annotate.plan``:
the record's head, the mask's and the photo's stat).

    python benchmarks/rerun_checks.py                 # in a temporary folder
    python benchmarks/rerun_checks.py --folder /tmp/rerun --photos 20 --done 2000
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from seglabel.annotate import AnnotateConfig, plan
from seglabel.images import ImageItem, file_fingerprint, load_image
from seglabel.labelset import parse_labelset
from seglabel.records import write_labelled


def photo_fingerprint_cost(folder: Path, n: int) -> str:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):  # smooth 12 MP photos (4032x3024), JPEG quality 92
        path = folder / f"photo-{i}.jpg"
        small = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
        Image.fromarray(small).resize((4032, 3024), Image.BICUBIC).save(path, quality=92)
        paths.append(path)
    for path in paths:
        file_fingerprint(path)  # in the page cache, as for the loader that reads it next
    start = time.perf_counter()
    for path in paths:
        load_image(path)
    decode = (time.perf_counter() - start) / n
    start = time.perf_counter()
    for path in paths:
        file_fingerprint(path)
    fingerprint = (time.perf_counter() - start) / n
    mb = sum(p.stat().st_size for p in paths) / n / 1e6
    return (f"12 MP JPEG ({mb:.1f} MB): decode {decode * 1e3:.1f} ms, fingerprint {fingerprint * 1e3:.2f} ms "
            f"({100 * fingerprint / decode:.1f}% of decoding)")


def plan_cost(folder: Path, n: int) -> str:
    labelset = parse_labelset({"templates": "none", "classes": ["a", "b", "c"]})
    rng = np.random.default_rng(0)
    items = []
    for i in range(n):
        photo = folder / "photos" / f"{i}.jpg"
        photo.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(photo)
        mask = rng.integers(0, 3, (6, 8)).repeat(8, 0).repeat(8, 1).astype(np.uint8)
        write_labelled(folder / "out", str(i), f"{i}.jpg", mask, labelset, settings_id="0" * 16, confidence=0.5,
                       photo={"width": 64, "height": 48, **file_fingerprint(photo)})
        items.append(ImageItem(photo, f"{i}.jpg"))
    config = AnnotateConfig(out=folder / "out")
    plan(items, config, labelset)  # warm the file system caches
    start = time.perf_counter()
    done = plan(items, config, labelset).done
    seconds = time.perf_counter() - start
    return f"rerun plan: {len(done)} of {n} images done, {seconds / n * 1e6:.0f} us per image"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, default=None)
    parser.add_argument("--photos", type=int, default=20)
    parser.add_argument("--done", type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.folder or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        print(photo_fingerprint_cost(folder, args.photos))
        print(plan_cost(folder, args.done))


if __name__ == "__main__":
    main()
