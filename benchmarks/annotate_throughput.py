"""Throughput and peak memory of `annotate`'s pipeline next to a plain per-image loop and the model alone.

Each mode runs in its own process on the same generated photos and the same model (random
weights: speed depends on the architecture, not the weights), and reports images per second,
that process's peak RSS and, on a GPU, its peak GPU memory:

* pipeline: ``seglabel.annotate.annotate`` (loader processes, batches, background writers), JPEGs
  decoded where ``--decode`` says; ``pipeline-cpu`` / ``pipeline-device`` force one decoder;
* plain: one image at a time in one process: load, predict, write mask + record, then coco.json;
* predict: ``Predictor.predict_prepared`` on batches loaded onto the device beforehand: the model,
  then upsampling, softmax and argmax to full-size labels, copied back (no decoding, no writing);
* model: forward passes only, on batches loaded into memory beforehand (the ceiling).

The photos look like photos (smooth regions, edges, some grain), so their JPEGs decode at a
realistic speed; each is a shifted copy of one scene.

    python benchmarks/annotate_throughput.py --images 16                      # ViT-B/16, 480x640 photos
    python benchmarks/annotate_throughput.py --images 10000 --model maskclip:tiny-vit \\
        --model-config tests/fixtures/tiny-vit.json --size 120x160 --short-side 64 --modes pipeline
    python benchmarks/annotate_throughput.py --device cuda --images 8192 --batch-size 32 --precision bf16 \\
        --modes model,predict,pipeline-cpu,pipeline-device     # what benchmarks/gpu_suite.sh runs
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODES = ("pipeline", "pipeline-cpu", "pipeline-device", "plain", "predict", "model")


def scene(size: tuple[int, int], seed: int = 0):
    """A photo-like RGB image: smooth colour fields with sharp-edged shapes and sensor grain."""
    import numpy as np

    h, w = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.zeros((h, w, 3), np.float32)
    for c in range(3):  # a few low-frequency waves per channel: sky, walls, road
        for _ in range(3):
            fy, fx, phase = rng.uniform(0.5, 3) / h, rng.uniform(0.5, 3) / w, rng.uniform(0, 6.3)
            img[:, :, c] += np.sin(2 * np.pi * (fy * yy + fx * xx) + phase)
    img = (img - img.min()) / (np.ptp(img) + 1e-6) * 200 + 20
    for _ in range(12):  # objects: ellipses of flat colour
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        ry, rx = rng.uniform(0.03, 0.2) * h, rng.uniform(0.03, 0.2) * w
        inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
        img[inside] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 4, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _write_photos(args: tuple) -> None:
    import numpy as np
    from PIL import Image

    folder, indices, size = args
    base = scene(size)
    for i in indices:  # shifted copies: cheap to make, each decodes to a different image
        Image.fromarray(np.roll(base, (i * 7) % size[1], axis=1)).save(Path(folder) / f"{i:06d}.jpg", quality=90)


def make_photos(folder: Path, n: int, size: tuple[int, int], processes: int = 1) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    processes = max(1, min(processes, n // 64 or 1))
    chunks = [(str(folder), range(k, n, processes), size) for k in range(processes)]
    if processes == 1:
        _write_photos(chunks[0])
        return
    with ProcessPoolExecutor(processes) as pool:
        list(pool.map(_write_photos, chunks))


def run_mode(args: argparse.Namespace) -> dict:
    """Runs in a child process: one mode, timed after the model is built and warmed up."""
    import torch

    from seglabel.annotate import AnnotateConfig, _autocast, _write_image, annotate
    from seglabel.images import find_images, load_image
    from seglabel.labelset import load_labelset
    from seglabel.loader import decode_device
    from seglabel.models.registry import load_segmenter
    from seglabel.predict import Predictor, Protocol, prepare_image, resolve_device
    from seglabel.records import write_coco

    labelset = load_labelset(args.labels)
    torch.manual_seed(0)  # the same random weights in every mode: their labels can be compared
    model = load_segmenter(args.model, labelset, pretrained=None, device=resolve_device(args.device),
                           model_config=args.model_config)
    cuda = model.device.type == "cuda"
    if cuda:
        model.to(memory_format=torch.channels_last)  # as annotate does on a GPU
    items = find_images([Path(args.photos)]).items[:args.images]
    protocol = Protocol(short_side=args.short_side)
    out = Path(args.out)
    predictor = Predictor(model, protocol, args.batch_size)
    decode = {"pipeline-cpu": "cpu", "pipeline-device": "device"}.get(args.mode, args.decode)
    with _autocast(model.device, args.precision):  # warm-up at the batch size, not timed
        predictor.predict([load_image(items[0].path)] * args.batch_size)
    if args.mode.startswith("pipeline"):
        decode_device(decode, model.device)  # the decoder's set-up, once per process, not timed
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    sync()
    start = time.perf_counter()
    if args.mode.startswith("pipeline"):
        config = AnnotateConfig(out=out, overwrite=True, batch_size=args.batch_size, protocol=protocol,
                                workers=args.workers, precision=args.precision, decode=decode)
        if args.writer_threads:
            config.writer_threads = args.writer_threads
        summary = annotate(items, model, labelset, config, argv=[])
        assert summary.labelled == len(items), summary.failures[:3]
    elif args.mode == "plain":
        config = AnnotateConfig(out=out, protocol=protocol)
        for item in items:
            rgb = load_image(item.path)
            [pred] = predictor.predict([rgb])
            _write_image(out, item, rgb, pred, labelset, config)
        write_coco(out, labelset)
    else:  # model or predict: the same inputs, prepared on the device beforehand
        rgb = [load_image(i.path) for i in items[:args.batch_size]]
        prepared = [prepare_image(x, protocol, model.mean, model.std).to(model.device) for x in rgb]
        sizes = [x.shape[:2] for x in rgb]
        batch = predictor._pad(prepared[0])[None].expand(len(prepared), -1, -1, -1).contiguous()
        if cuda:
            batch = batch.to(memory_format=torch.channels_last)
        sync()
        start = time.perf_counter()
        with torch.no_grad(), _autocast(model.device, args.precision):
            for _ in range(0, len(items), args.batch_size):
                if args.mode == "model":
                    model(batch)
                else:
                    predictor.predict_prepared(prepared, sizes)
    sync()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "images": len(items), "threads": torch.get_num_threads(), "decode": decode,
            "device": torch.cuda.get_device_name() if cuda else str(model.device),
            "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="maskclip:ViT-B-16")
    ap.add_argument("--model-config", default=None)
    ap.add_argument("--labels", default=str(REPO / "labelsets" / "street.yaml"))
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--size", default="480x640", help="HxW of the generated photos")
    ap.add_argument("--photo-dir", default=None, help="use the JPEGs in this folder (made there if it has none)")
    ap.add_argument("--short-side", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--workers", type=int, default=None, help="pipeline loader processes (default: annotate's)")
    ap.add_argument("--writer-threads", type=int, default=None, help="pipeline writer threads (default: annotate's)")
    ap.add_argument("--decode", default="auto", help="pipeline: where JPEGs are decoded (auto, cpu, device)")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--modes", default="pipeline,plain,model", help=f"comma-separated, of {', '.join(MODES)}")
    ap.add_argument("--keep", default=None, help="keep each mode's output folder under this folder")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--photos", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mode:  # the child
        print(json.dumps(run_mode(args)))
        return
    modes = args.modes.split(",")
    if unknown := [m for m in modes if m not in MODES]:
        sys.exit(f"--modes: unknown {', '.join(unknown)} (choose from {', '.join(MODES)})")

    h, w = map(int, args.size.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        photos = Path(args.photo_dir) if args.photo_dir else Path(tmp) / "photos"
        if not any(photos.glob("*.jpg")):
            make_photos(photos, args.images, (h, w), processes=os.cpu_count() or 1)
        outs = Path(args.keep) if args.keep else Path(tmp)
        results = {}
        for mode in modes:
            argv = [sys.executable, __file__, "--mode", mode, "--photos", str(photos), "--out", str(outs / mode)]
            for flag in ("model", "model_config", "labels", "images", "short_side", "batch_size", "workers",
                         "writer_threads", "decode", "precision", "device"):
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
            r["images_per_second"] = r["images"] / r["seconds"]
            results[mode] = r
    first = next(iter(results.values()))
    print(f"{args.model} on {first['device']} ({first['threads']} threads), {first['images']} photos {h}x{w}, "
          f"short side {args.short_side}, batch {args.batch_size}, precision {args.precision}")
    for mode, r in results.items():
        gpu = f"  peak GPU memory {r['peak_gpu_mib']:.0f} MiB" if r["peak_gpu_mib"] is not None else ""
        what = f" (decode {r['decode']})" if mode.startswith("pipeline") else ""
        print(f"  {mode + what:30s} {r['images_per_second']:9.2f} images/s  ({r['seconds']:.1f} s)  "
              f"peak RSS {r['peak_rss_mib']:.0f} MiB{gpu}")
    if "pipeline" in results and "plain" in results:
        print(f"  pipeline / plain = {results['plain']['seconds'] / results['pipeline']['seconds']:.2f}x")
    if "model" in results:
        for mode in (m for m in results if m.startswith("pipeline") or m == "predict"):
            print(f"  {mode} / model-only = {results['model']['seconds'] / results[mode]['seconds']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
