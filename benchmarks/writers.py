"""Per-core speed of what annotate's writer threads do for each image: the COCO record (before:
one pycocotools RLE per class, each from a full binary mask; after: one pass over the label
map), the mask PNG, the scores PNG and the overlay JPEG, in images per second.

Single-threaded (OMP/MKL/torch threads = 1): a figure is what one core does. Maps look like a
model's output: the argmax of smooth random logits over the classes present (blobs), pixels of low
confidence ignored; ``noise`` maps (every pixel a random class) are the worst case.

    python benchmarks/writers.py                                   # 480x640 and 1080x1920, 19 and 150 classes
    python benchmarks/writers.py --sizes 480x640 --classes 19 --maps blobs --seconds 0.5
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = "1"  # before numpy and torch load: one core

import argparse
import platform
import time

import numpy as np
import torch
import torch.nn.functional as F

from seglabel.labelset import LabelSet
from seglabel.writers import encode_mask_png, encode_overlay_jpg, encode_scores_png, image_record


def per_class_record(rel, mask, confidence, labelset):
    """image_record as it was before the single pass (kept here to measure against)."""
    from pycocotools import mask as mask_util

    height, width = mask.shape
    present = np.unique(mask)
    annotations = []
    for k in present[present != labelset.ignore_index].tolist():
        rle = mask_util.encode(np.asfortranarray(mask == k, dtype=np.uint8))
        annotations.append({
            "category_id": int(k) + 1,
            "segmentation": {"size": [height, width], "counts": rle["counts"].decode("ascii")},
            "area": int(mask_util.area(rle)),
            "bbox": [float(v) for v in mask_util.toBbox(rle)],
            "iscrowd": 0,
        })
    return {"file_name": rel, "width": width, "height": height,
            "confidence": round(float(confidence.mean()), 6), "annotations": annotations}


def make_map(kind: str, height: int, width: int, classes: int, present: int, seed: int = 0):
    """(mask uint8, confidence float32, rgb uint8) of one image."""
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    if kind == "noise":
        mask = rng.integers(0, classes, (height, width)).astype(np.uint8)
        return mask, rng.random((height, width), dtype=np.float32), rgb
    chosen = rng.choice(classes, size=min(present, classes), replace=False)
    cells = (max(2, height // 40), max(2, width // 40))  # blobs about a tenth of the image across
    logits = torch.from_numpy(rng.normal(size=(1, len(chosen), *cells)).astype(np.float32)) * 3
    probs = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)[0].softmax(0)
    conf, idx = probs.max(0)
    mask = chosen[idx.numpy()].astype(np.uint8)
    mask[conf.numpy() < 0.3] = 255  # unconfident pixels: ignored, as --min-confidence does
    return mask, conf.numpy(), rgb


def rates(fns: dict, seconds: float, rounds: int = 5) -> dict:
    """Calls per second of each function: the best of ``rounds`` rounds, the functions taking
    turns within each round, so a neighbour's load on a shared machine hits them alike."""
    best = dict.fromkeys(fns, 0.0)
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(rounds):
        for name, fn in fns.items():
            n, start = 0, time.perf_counter()
            while n < 1 or time.perf_counter() - start < seconds / rounds:
                fn()
                n += 1
            best[name] = max(best[name], n / (time.perf_counter() - start))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="480x640,1080x1920", help="HxW of the maps, comma-separated")
    ap.add_argument("--classes", default="19,150", help="label-set sizes, comma-separated")
    ap.add_argument("--maps", default="blobs,noise", help="blobs (model-like) and/or noise (worst case)")
    ap.add_argument("--seconds", type=float, default=1.0, help="time per figure (best of 5 rounds)")
    args = ap.parse_args()
    torch.set_num_threads(1)

    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"writers per core: 1 thread, {platform.processor() or platform.machine()}, "
          f"load average {load} (before), {args.seconds:g} s per figure, best of 5 rounds")
    head = (f"{'map':>5s} {'size':>9s} {'K':>4s} {'in map':>6s} | {'record before':>13s} {'after':>8s} "
            f"{'x':>5s} | {'mask PNG':>8s} {'scores PNG':>10s} {'overlay JPG':>11s} | {'mask+rec':>8s}")
    print(head + "\n" + "-" * len(head))
    for kind in args.maps.split(","):
        for size in args.sizes.split(","):
            height, width = map(int, size.split("x"))
            for k in map(int, args.classes.split(",")):
                labelset = LabelSet.from_names([f"class{i}" for i in range(k)])
                present = {19: 13, 150: 24}.get(k, max(1, 2 * k // 3))  # a busy street / ADE20K scene
                mask, conf, rgb = make_map(kind, height, width, k, present)
                after = image_record("x.jpg", mask, conf, labelset)
                assert after == per_class_record("x.jpg", mask, conf, labelset), "records differ"
                r = rates({
                    "before": lambda: per_class_record("x.jpg", mask, conf, labelset),
                    "after": lambda: image_record("x.jpg", mask, conf, labelset),
                    "mask": lambda: encode_mask_png(mask),
                    "scores": lambda: encode_scores_png(conf),
                    "overlay": lambda: encode_overlay_jpg(rgb, mask, labelset),
                }, args.seconds)
                r_before, r_after, r_mask, r_scores, r_overlay = r.values()
                both = 1 / (1 / r_after + 1 / r_mask)  # what annotate writes by default
                print(f"{kind:>5s} {size:>9s} {k:>4d} {len(after['annotations']):>6d} | {r_before:>13.1f} "
                      f"{r_after:>8.1f} {r_after / r_before:>5.1f} | {r_mask:>8.1f} {r_scores:>10.1f} "
                      f"{r_overlay:>11.1f} | {both:>8.1f}")
    print(f"images/s on one core; 'in map': classes present (annotations per record); load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} (after)")


if __name__ == "__main__":
    main()
