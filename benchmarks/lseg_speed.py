"""Seconds per image of the full-size LSeg ViT-L/16 at the default single-scale setting.

The weights are random (the speed does not depend on them); the network is built normally, the 19
street classes are encoded, and images go through seglabel's Predictor as `seglabel annotate` runs
them. Default single-scale setting: the official scale 1.0 geometry, long side 520 (one pass over
the whole image, padded to multiples of 32): a 640x480 photo is fed as 544x416 (520x390 padded).

    python benchmarks/lseg_speed.py [--images 3] [--size 480x640] [--long-side 520 | --short-side 512]\n                                    [--threads N] [--load-test]

--load-test also saves the random full-size model as an official-format checkpoint (about 1.4 GB in
a temporary folder) and reports the peak memory of loading it with build_lseg in a fresh process.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=3, help="timed images (after one warm-up)")
    ap.add_argument("--size", default="480x640", help="HxW of the test photos")
    ap.add_argument("--long-side", type=int, default=520)
    ap.add_argument("--short-side", type=int, default=0,
                    help="instead: short side this, long side at most 2048 (the MaskCLIP-style CLI default is 512)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--load-test", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from seglabel.labelset import load_labelset
    from seglabel.models.lseg import LSeg
    from seglabel.models.lseg_net import build_lseg_net
    from seglabel.predict import Predictor, Protocol

    t0 = time.perf_counter()
    torch.manual_seed(0)
    net = build_lseg_net("vit", device="cpu").requires_grad_(False)
    model = LSeg(net).eval()
    model.set_labels(load_labelset(REPO / "labelsets" / "street.yaml"))
    print(f"built ViT-L/16 LSeg with random weights in {time.perf_counter() - t0:.1f} s "
          f"({sum(p.numel() for p in net.parameters()) / 1e6:.0f} M parameters)")

    h, w = map(int, args.size.split("x"))
    rgb = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    if args.short_side:
        protocol, setting = Protocol(short_side=args.short_side, max_long_side=2048), f"short side {args.short_side}"
    else:  # short_side=long_side makes the long side the binding one
        protocol, setting = Protocol(short_side=args.long_side, max_long_side=args.long_side), f"long side {args.long_side}"
    predictor = Predictor(model, protocol)
    times, cpu = [], []
    if args.images:
        predictor.predict([rgb])  # warm-up
    for _ in range(args.images):
        t, c = time.perf_counter(), time.process_time()
        predictor.predict([rgb])
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    if times:
        print(f"{h}x{w} photo, {setting}, {torch.get_num_threads()} threads, device cpu: "
              f"{np.median(times):.2f} s per image (median of {len(times)}: {', '.join(f'{t:.2f}' for t in times)}); "
              f"CPU time {np.median(cpu):.1f} s per image (all threads; wall time is longer when other work shares the cores)")

    if args.load_test:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "lseg_vitl16_random.ckpt"
            sd = {f"net.{k}": v for k, v in net.state_dict().items()}
            for k in sd:  # CLIP's weights are fp16 in the released files
                if k.startswith("net.clip_pretrained.transformer."):
                    sd[k] = sd[k].half()
            sd["net.clip_pretrained.visual.proj"] = torch.zeros(768, 512, dtype=torch.float16)
            del net, model, predictor
            torch.save({"state_dict": sd, "epoch": 0, "global_step": 0}, path)
            del sd
            size = path.stat().st_size
            # VmHWM: this process's own peak (ru_maxrss would include the parent's, inherited at fork)
            code = ("import sys, timm, open_clip, torchvision; from seglabel.models.lseg import build_lseg\n"
                    "kb = lambda key: int([l.split()[1] for l in open('/proc/self/status') if l.startswith(key)][0])\n"
                    "base = kb('VmRSS'); build_lseg(sys.argv[1]); print(base, kb('VmHWM'))")
            out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
            base, peak = (int(v) * 1024 for v in out.stdout.split()[-2:])
            print(f"loading a {size / 2**30:.2f} GiB checkpoint: peak RSS {peak / 2**30:.2f} GiB, of which "
                  f"{base / 2**30:.2f} GiB are the imported libraries; loading added {(peak - base) / 2**30:.2f} GiB "
                  f"({(peak - base) / size:.2f} x the file)")


if __name__ == "__main__":
    main()
