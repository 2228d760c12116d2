"""Speed of `seglabel export --format hf | webdataset`, and of reading each back with its library.

Makes an annotate output of N generated photos (JPEG, smooth regions and grain, so they are
photo-sized files) with blocky masks and records written by annotate's own writers, then times
each export (library call, photos found through run.json) and one pass over the result that
decodes every mask: ``datasets.load_dataset(folder)`` (includes its one-off conversion to its
Arrow cache) and ``webdataset.WebDataset(urls).decode()``.

    python benchmarks/export_datasets.py --images 1000 --size 480x640
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from seglabel.exports import export  # noqa: E402
from seglabel.labelset import parse_labelset  # noqa: E402
from seglabel.writers import MASKS, RECORDS, RUN_FILE, encode_mask_png, image_record, write_bytes, write_json  # noqa: E402


def make_output(root: Path, n: int, height: int, width: int) -> Path:
    ls = parse_labelset({"name": "bench", "templates": "none", "classes": [f"c{i}" for i in range(8)]})
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height, 0:width]
    scene = np.stack([(xx * 255 // width), (yy * 255 // height), ((xx + yy) % 256)], -1).astype(np.int16)
    out = root / "labels"
    for i in range(n):
        rel = f"d{i % 10}/img{i:06d}.jpg"
        grain = rng.integers(-12, 13, scene.shape, dtype=np.int16)
        photo = root / "photos" / rel
        photo.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(np.roll(scene, i, axis=1) + grain, 0, 255).astype(np.uint8)).save(photo, quality=90)
        blocks = rng.integers(0, 8, (height // 32 + 1, width // 32 + 1), dtype=np.uint8)
        mask = np.kron(blocks, np.ones((32, 32), np.uint8))[:height, :width]
        key = rel[:-4]
        write_bytes(out / MASKS / f"{key}.png", encode_mask_png(mask))
        write_json(out / RECORDS / f"{key}.json", image_record(rel, mask, np.full(mask.shape, 0.5, np.float32), ls))
    write_json(out / RUN_FILE, {"input_roots": [str(root / "photos")], "model": "maskclip:bench",
                                "labelset": ls.to_dict()})
    return out


def folder_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--size", default="480x640", help="HxW of the photos")
    args = ap.parse_args()
    height, width = (int(v) for v in args.size.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        out = make_output(root, args.images, height, width)
        print(f"{args.images} photos {width}x{height}: {folder_mb(root / 'photos'):.1f} MB of JPEG, "
              f"{folder_mb(out / 'masks'):.1f} MB of masks")
        for fmt in ("hf", "webdataset"):
            t = time.perf_counter()
            result = export(out, fmt)
            took = time.perf_counter() - t
            print(f"export {fmt}: {args.images / took:.0f} images/s ({took:.2f} s), "
                  f"{folder_mb(result.dest):.1f} MB written")
        t = time.perf_counter()
        import datasets

        ds = datasets.load_dataset(str(out / "export" / "hf"), split="train", cache_dir=str(root / "cache"))
        pixels = sum(int(np.asarray(row["label"]).size) for row in ds)
        took = time.perf_counter() - t
        print(f"read hf (load_dataset + decode every mask): {args.images / took:.0f} images/s ({took:.2f} s)")
        import webdataset as wds

        t = time.perf_counter()
        dest = out / "export" / "webdataset"
        urls = str(dest / json.loads((dest / "shards.json").read_text())["urls"])
        pixels = sum(np.asarray(Image.open(io.BytesIO(s["seg.png"]))).size
                     for s in wds.WebDataset(urls, shardshuffle=False).decode())
        took = time.perf_counter() - t
        print(f"read webdataset (.decode() + decode every mask): {args.images / took:.0f} images/s ({took:.2f} s)")
        assert pixels == args.images * height * width


if __name__ == "__main__":
    main()
