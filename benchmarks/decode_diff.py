"""How far JPEG decoding on the model's device is from the CPU path: pixels (PIL's libjpeg-turbo
against torchvision's decoder on ``--device``: nvjpeg on CUDA) for each kind of JPEG, and, given
the output folders of two annotate runs (decode cpu / device), how many labels agree.

    python benchmarks/decode_diff.py --photos DIR --device cuda
    python benchmarks/decode_diff.py --photos DIR --device cuda --masks OUT_CPU OUT_DEVICE
"""
from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from seglabel.decode import decode_jpegs, device_jpeg
from seglabel.images import DEFAULT_MAX_PIXELS, load_image

KINDS = {  # how the photos are re-encoded: PIL save options
    "baseline 4:2:0": {"subsampling": 2},
    "baseline 4:2:2": {"subsampling": 1},
    "baseline 4:4:4": {"subsampling": 0},
    "progressive 4:2:0": {"subsampling": 2, "progressive": True},
}


def pixel_table(photos: list[Path], device: str) -> None:
    print(f"pixels, PIL (libjpeg-turbo) vs torchvision on {device}, {len(photos)} photos per kind, quality 90:")
    print(f"  {'kind':18s} {'max abs diff':>12s} {'mean abs diff':>13s} {'values differing':>16s}")
    originals = [load_image(p) for p in photos]
    for kind, options in KINDS.items():
        blobs = []
        for rgb in originals:
            buf = io.BytesIO()
            Image.fromarray(rgb).save(buf, format="JPEG", quality=90, **options)
            blobs.append(buf.getvalue())
        decoded = decode_jpegs([torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs], device)
        worst, total, differing, count = 0, 0.0, 0, 0
        for blob, px in zip(blobs, decoded):
            if px is None:
                print(f"  {kind:18s} refused by the device decoder (the CPU path would read it)")
                break
            ref = torch.from_numpy(np.array(Image.open(io.BytesIO(blob)).convert("RGB")))
            diff = (px.permute(1, 2, 0).cpu().int() - ref.int()).abs()
            worst = max(worst, int(diff.max()))
            total += float(diff.sum())
            differing += int((diff > 0).sum())
            count += diff.numel()
        else:
            print(f"  {kind:18s} {worst:12d} {total / count:13.3f} {differing / count:15.2%}")


def label_agreement(cpu_out: Path, device_out: Path) -> None:
    same = total = files = 0
    for a_path in sorted((cpu_out / "masks").rglob("*.png")):
        b_path = device_out / "masks" / a_path.relative_to(cpu_out / "masks")
        a, b = np.asarray(Image.open(a_path)), np.asarray(Image.open(b_path))
        same += int((a == b).sum())
        total += a.size
        files += 1
    if files:
        print(f"labels: decode cpu vs device agree at {same / total:.3%} of pixels ({files} masks)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", required=True, help="a folder of JPEGs")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--limit", type=int, default=64, help="photos per kind")
    ap.add_argument("--masks", nargs=2, metavar=("OUT_CPU", "OUT_DEVICE"), help="two annotate output folders")
    args = ap.parse_args()
    photos = sorted(Path(args.photos).glob("*.jpg"))[:args.limit]
    if not photos:
        raise SystemExit(f"{args.photos}: no .jpg files")
    if not all(device_jpeg(p, DEFAULT_MAX_PIXELS) for p in photos[:4]):
        print("note: some photos would take the CPU path (not plain JPEGs)")
    pixel_table(photos, args.device)
    if args.masks:
        label_agreement(Path(args.masks[0]), Path(args.masks[1]))


if __name__ == "__main__":
    main()
