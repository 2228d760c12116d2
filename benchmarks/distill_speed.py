"""Training speed of the MaskCLIP+ student (DeepLabv2, ResNet v1c, D=512), in iterations/s.

One iteration = what ``seglabel distill`` does per step: forward (under autocast with AMP, bf16
where the GPU supports it, else fp16 with a gradient scaler), cross-entropy on logits upsampled
to the crop, backward, SGD step. Synthetic batches (random images and labels), so data loading is
not measured. Defaults are the issue's configuration on a GPU (DeepLabv2-R101, crop 512, batch 16,
AMP) and a small one on a CPU::

    python benchmarks/distill_speed.py                                  # GPU: R101, crop 512, batch 16, AMP
    python benchmarks/distill_speed.py --device cpu                     # CPU: R101, crop 256, batch 2
    python benchmarks/distill_speed.py --device cpu --depth 18 --width 32 --crop 64 --batch 16 --embed-dim 128
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
    ap.add_argument("--batch", type=int, default=None, help="default: 16 on CUDA, 2 on a CPU")
    ap.add_argument("--crop", type=int, default=None, help="default: 512 on CUDA, 256 on a CPU")
    ap.add_argument("--depth", type=int, default=101)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--embed-dim", type=int, default=512)
    ap.add_argument("--classes", type=int, default=60)
    ap.add_argument("--iters", type=int, default=None, help="timed iterations (default: 20 on CUDA, 3 on a CPU)")
    ap.add_argument("--warmup", type=int, default=None, help="default: 5 on CUDA, 1 on a CPU")
    ap.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None, help="default: on with CUDA")
    args = ap.parse_args()

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    batch = args.batch or (16 if cuda else 2)
    crop = args.crop or (512 if cuda else 256)
    iters = args.iters or (20 if cuda else 3)
    warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    amp = cuda if args.amp is None else args.amp
    if cuda:
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    arch = StudentArch.resnet(args.depth, embed_dim=args.embed_dim, width=args.width, stem_width=args.width)
    model = DeepLabV2Student(arch)
    labelset = LabelSet.from_names([f"class{i}" for i in range(args.classes)])
    model.set_text(torch.randn(args.classes, args.embed_dim), labelset)
    model.to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    # as distill.train: bf16 where supported, else fp16 with a gradient scaler
    dtype = torch.bfloat16 if (not cuda or torch.cuda.is_bf16_supported()) else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=amp and cuda and dtype == torch.float16)
    x = torch.randn(batch, 3, crop, crop, device=device)
    y = torch.randint(0, args.classes, (batch, crop, crop), device=device)

    def step() -> float:
        with torch.autocast(device.type, dtype=dtype, enabled=amp):
            logits = model(x)
        loss = segmentation_loss(logits, y, 255)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        return loss.item()  # .item() waits for the device

    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    seconds = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters()) / 1e6
    name = torch.cuda.get_device_name(device) if cuda else f"cpu ({torch.get_num_threads()} threads)"
    memory = f", peak memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB" if cuda else ""
    print(f"DeepLabv2-R{args.depth} width {args.width} D={args.embed_dim} ({params:.1f}M params) on {name}: "
          f"batch {batch}, crop {crop}, amp {amp}{' (' + str(dtype).split('.')[-1] + ')' if amp else ''}: "
          f"{iters / seconds:.3f} it/s ({seconds / iters:.3f} s/it, {iters * batch / seconds:.1f} images/s){memory}")


if __name__ == "__main__":
    main()
