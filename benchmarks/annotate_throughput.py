"""Throughput and peak memory of `annotate`'s pipeline next to a plain per-image loop and the model alone.

Each mode runs in its own process on the same generated photos and the same model (random
weights: speed depends on the architecture, not the weights), and reports images per second and
that process's peak RSS:

* pipeline: ``seglabel.annotate.annotate`` (loader processes, batches, background writers);
* plain: one image at a time in one process: load, predict, write mask + record, then coco.json;
* model: forward passes only, on batches loaded into memory beforehand (the ceiling).

    python benchmarks/annotate_throughput.py --images 16                      # ViT-B/16, 480x640 photos
    python benchmarks/annotate_throughput.py --images 10000 --model maskclip:tiny-vit \\
        --model-config tests/fixtures/tiny-vit.json --size 120x160 --short-side 64 --modes pipeline
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def make_photos(folder: Path, n: int, size: tuple[int, int]) -> None:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (size[0], size[1], 3), dtype=np.uint8)
    for i in range(n):  # shifted copies: cheap to make, each decodes to a different image
        Image.fromarray(np.roll(base, i, axis=1)).save(folder / f"{i:06d}.jpg", quality=90)


def run_mode(args: argparse.Namespace) -> dict:
    """Runs in a child process: one mode, timed after the model is built and warmed up."""
    import torch

    from seglabel.annotate import AnnotateConfig, _write_image, annotate
    from seglabel.images import find_images, load_image
    from seglabel.labelset import load_labelset
    from seglabel.models.registry import load_segmenter
    from seglabel.predict import Predictor, Protocol, prepare_image, resolve_device
    from seglabel.writers import write_coco

    labelset = load_labelset(args.labels)
    model = load_segmenter(args.model, labelset, pretrained=None, device=resolve_device(args.device),
                           model_config=args.model_config)
    items = find_images([Path(args.photos)]).items
    protocol = Protocol(short_side=args.short_side)
    out = Path(args.out)
    predictor = Predictor(model, protocol, args.batch_size)
    predictor.predict([load_image(items[0].path)] * min(2, args.batch_size))  # warm-up, not timed
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    start = time.perf_counter()
    if args.mode == "pipeline":
        config = AnnotateConfig(out=out, batch_size=args.batch_size, protocol=protocol, workers=args.workers,
                                precision=args.precision)
        annotate(items, model, labelset, config, argv=[])
    elif args.mode == "plain":
        config = AnnotateConfig(out=out, protocol=protocol)
        for item in items:
            rgb = load_image(item.path)
            [pred] = predictor.predict([rgb])
            _write_image(out, item, rgb, pred, labelset, config)
        write_coco(out, labelset)
    else:  # model only: the same inputs, prepared beforehand
        batch = torch.stack([prepare_image(load_image(i.path), protocol, model.mean, model.std)
                             for i in items[:args.batch_size]]).to(model.device)
        batch = predictor._pad(batch[0])[None].expand(len(batch), -1, -1, -1).contiguous()
        start = time.perf_counter()
        with torch.no_grad():
            for _ in range(0, len(items), args.batch_size):
                model(batch)
    sync()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "images": len(items), "threads": torch.get_num_threads(),
            "device": str(model.device)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="maskclip:ViT-B-16")
    ap.add_argument("--model-config", default=None)
    ap.add_argument("--labels", default=str(REPO / "labelsets" / "street.yaml"))
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--size", default="480x640", help="HxW of the generated photos")
    ap.add_argument("--short-side", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--workers", type=int, default=None, help="pipeline loader processes (default: annotate's)")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--modes", default="pipeline,plain,model")
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--photos", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mode:  # the child
        print(json.dumps(run_mode(args)))
        return

    h, w = map(int, args.size.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        photos = Path(tmp) / "photos"
        make_photos(photos, args.images, (h, w))
        results = {}
        for mode in args.modes.split(","):
            argv = [sys.executable, __file__, "--mode", mode, "--photos", str(photos), "--out", str(Path(tmp) / mode)]
            for flag in ("model", "model_config", "labels", "short_side", "batch_size", "workers", "precision",
                         "device"):
                value = getattr(args, flag)
                if value is not None:
                    argv += [f"--{flag.replace('_', '-')}", str(value)]
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env={**os.environ,
                                                                                   "SEGLABEL_TEXT_CACHE": "off"})
            stdout = proc.stdout.read()
            _, status, usage = os.wait4(proc.pid, 0)
            if status != 0:
                sys.exit(f"{mode} run failed")
            r = json.loads(stdout.strip().splitlines()[-1])
            r["peak_rss_mib"] = usage.ru_maxrss / 1024
            results[mode] = r
    first = next(iter(results.values()))
    print(f"{args.model} on {first['device']} ({first['threads']} threads), {args.images} photos {h}x{w}, "
          f"short side {args.short_side}, batch {args.batch_size}, precision {args.precision}")
    for mode, r in results.items():
        print(f"  {mode:9s} {r['images'] / r['seconds']:8.3f} images/s  ({r['seconds']:.1f} s)  "
              f"peak RSS {r['peak_rss_mib']:.0f} MiB")
    if "pipeline" in results and "plain" in results:
        print(f"  pipeline / plain = {results['plain']['seconds'] / results['pipeline']['seconds']:.2f}x")
    if "pipeline" in results and "model" in results:
        print(f"  pipeline / model-only = {results['model']['seconds'] / results['pipeline']['seconds']:.2f}")


if __name__ == "__main__":
    main()
