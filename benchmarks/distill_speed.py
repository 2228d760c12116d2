"""Training speed of the real MaskCLIP+ student (DeepLabv2, ResNet-101 v1c, D=512), in iterations/s.

One iteration = what ``seglabel distill`` does per step: forward, cross-entropy on logits upsampled
to the crop, backward, SGD step. Synthetic batches (random images and labels), so data loading is
not measured. Usage::

    python benchmarks/distill_speed.py --batch 2 --crop 256 --iters 5            # CPU
    python benchmarks/distill_speed.py --device cuda --batch 8 --crop 512 --iters 20
"""
from __future__ import annotations

import argparse
import time

import torch

from seglabel.distill import segmentation_loss
from seglabel.labelset import LabelSet
from seglabel.models.deeplab import DeepLabV2Student, StudentArch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--crop", type=int, default=256)
    ap.add_argument("--depth", type=int, default=101)
    ap.add_argument("--classes", type=int, default=60)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA)")
    args = ap.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = DeepLabV2Student(StudentArch.resnet(args.depth, embed_dim=512))
    labelset = LabelSet.from_names([f"class{i}" for i in range(args.classes)])
    model.set_text(torch.randn(args.classes, 512), labelset)
    model.to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(args.batch, 3, args.crop, args.crop, device=device)
    y = torch.randint(0, args.classes, (args.batch, args.crop, args.crop), device=device)

    def step() -> float:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
            logits = model(x)
        loss = segmentation_loss(logits, y, 255)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()  # .item() waits for the device

    for _ in range(args.warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(args.iters):
        step()
    seconds = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"DeepLabv2-R{args.depth} D=512 ({params:.1f}M params) on {device} "
          f"({torch.get_num_threads()} threads): batch {args.batch}, crop {args.crop}, amp {args.amp}: "
          f"{args.iters / seconds:.3f} it/s ({seconds / args.iters:.2f} s/it, "
          f"{args.iters * args.batch / seconds:.2f} images/s)")


if __name__ == "__main__":
    main()
