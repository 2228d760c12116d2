"""Images per second of the annotate pipeline (load, predict, write) at given settings.

The weights are random (no download needed): speed depends on the architecture, not the weights.
    python benchmarks/annotate_speed.py --model maskclip:ViT-B-16 --images 8 --size 480x640
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from seglabel.annotate import AnnotateConfig, annotate
from seglabel.images import find_images
from seglabel.labelset import load_labelset
from seglabel.models.registry import load_segmenter
from seglabel.predict import Protocol, resolve_device


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="maskclip:ViT-B-16")
    ap.add_argument("--labels", default=str(Path(__file__).parent.parent / "labelsets" / "street.yaml"))
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--size", default="480x640", help="HxW of the generated photos")
    ap.add_argument("--short-side", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--no-refine", action="store_true", help="turn key smoothing and prompt denoising off")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    h, w = map(int, args.size.split("x"))
    labelset = load_labelset(args.labels)
    t0 = time.perf_counter()
    model = load_segmenter(args.model, labelset, pretrained=None, device=resolve_device(args.device),
                           key_smoothing=not args.no_refine, prompt_denoising=not args.no_refine)
    setup = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        photos = Path(tmp) / "photos"
        photos.mkdir()
        rng = np.random.default_rng(0)
        for i in range(args.images + 1):
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(photos / f"{i:05d}.jpg")
        items = find_images([photos]).items
        config = AnnotateConfig(out=Path(tmp) / "out", batch_size=args.batch_size,
                                protocol=Protocol(short_side=args.short_side))
        annotate(items[:1], model, labelset, config, argv=[])  # warm-up image, not timed
        summary = annotate(items[1:], model, labelset, config, argv=[])
    print(f"model {args.model} on {model.device} ({torch.get_num_threads()} threads), {len(labelset)} classes, "
          f"{h}x{w} photos, short side {args.short_side}, batch {args.batch_size}, "
          f"refinements {'off' if args.no_refine else 'on'}")
    print(f"setup (model + {len(labelset.prompts)}x{len(labelset.templates or ()) or 85} prompts): {setup:.1f} s")
    print(f"{summary.labelled} images in {summary.seconds:.2f} s: {summary.labelled / summary.seconds:.3f} images/s, "
          f"{summary.seconds / summary.labelled:.2f} s/image")


if __name__ == "__main__":
    main()
