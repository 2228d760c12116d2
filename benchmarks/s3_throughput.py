"""Images per second reading from an S3 server against reading the same photos from a local disk.

An S3 API (moto's server, on 127.0.0.1 at a free port, in this process) holds a copy of the
generated photos (photo-like JPEGs, benchmarks/annotate_throughput.py's scene). Each mode runs in
its own process, pointed at the server the standard way (AWS_ENDPOINT_URL and test credentials),
on the same photos:

* read-local / read-s3: ``images.find_images`` then ``loader.load_images`` (the read and decode
  side of annotate: loader processes fetch, decode and resize) with ``--workers`` loader
  processes; no model. What the storage layer costs, with nothing else in the way;
* annotate-local / annotate-s3 / annotate-s3-s3: the whole ``seglabel annotate`` command with a
  tiny model (tests/fixtures/tiny-vit.json, random weights: the model is not what is measured):
  folder -> folder, bucket -> folder, bucket -> bucket (masks and records PUT into the bucket).

moto's server is a Python process on the same machine, so it competes with seglabel for the CPUs:
the S3 figures are a floor for what a real store gives, and say nothing about network latency.

    python benchmarks/s3_throughput.py --images 200 --workers 4
    python benchmarks/s3_throughput.py --images 500 --size 480x640 --modes read-local,read-s3

Needs ``moto[server]`` and ``s3fs[boto3]`` (pip install -e '.[test]').
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
MODES = ("read-local", "read-s3", "annotate-local", "annotate-s3", "annotate-s3-s3")

READ = """
import json, sys, time
from seglabel.images import find_images
from seglabel.loader import load_images
from seglabel.predict import Protocol
source, workers, short = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
start = time.perf_counter()
items = find_images([source]).items
listed = time.perf_counter() - start
n = failed = 0
for loaded in load_images(items, Protocol(short_side=short), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 10**9, workers=workers):
    n += 1
    failed += loaded.error is not None
seconds = time.perf_counter() - start
print(json.dumps({"images": n, "failed": failed, "seconds": seconds, "listing_seconds": listed}))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server():
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return server, f"http://127.0.0.1:{port}"


def upload(endpoint: str, folder: Path, bucket: str, prefix: str) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="test",
                          aws_secret_access_key="test")
    client.create_bucket(Bucket=bucket)
    client.create_bucket(Bucket="labels")
    for p in sorted(folder.rglob("*.jpg")):
        client.upload_file(str(p), bucket, f"{prefix}/{p.relative_to(folder).as_posix()}")


def tiny_weights(path: Path) -> Path:
    """Random weights of tests/fixtures/tiny-vit.json (seeded), as a weight file."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    from seglabel.models.clip import register_model_config

    register_model_config(REPO / "tests/fixtures/tiny-vit.json")
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-vit").eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def run_mode(mode: str, args: argparse.Namespace, photos: Path, work: Path, env: dict[str, str]) -> dict:
    source = "s3://photos/set" if "-s3" in mode else str(photos)
    if mode.startswith("read-"):
        r = subprocess.run([sys.executable, "-c", READ, source, str(args.workers), str(args.short_side)], env=env,
                           capture_output=True, text=True, check=False)
        if r.returncode != 0:
            raise SystemExit(f"{mode}: {r.stderr.strip().splitlines()[-1]}")
        found = json.loads(r.stdout)
        return {"mode": mode, **found, "images_per_second": found["images"] / found["seconds"]}
    out = f"s3://labels/{mode}" if mode.endswith("-s3-s3") else str(work / mode)
    argv = [sys.executable, "-m", "seglabel", "annotate", source, "--labels", str(REPO / "labelsets" / "street.yaml"),
            "--out", out, "--model", "maskclip:tiny-vit", "--model-config", str(REPO / "tests/fixtures/tiny-vit.json"),
            "--pretrained", str(work / "tiny-vit.safetensors"),
            "--short-side", str(args.short_side), "--workers", str(args.workers), "--json"]
    start = time.perf_counter()
    r = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if r.returncode != 0:
        raise SystemExit(f"{mode}: exit {r.returncode}: {r.stderr.strip()[-500:]}")
    summary = json.loads(r.stdout)
    return {"mode": mode, "images": summary["labelled"], "failed": len(summary["failures"]), "seconds": seconds,
            "images_per_second": summary["images_per_second"], "command_seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--size", default="480x640", help="HxW of the photos")
    parser.add_argument("--workers", type=int, default=4, help="loader processes (both sides alike)")
    parser.add_argument("--short-side", type=int, default=64)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    from annotate_throughput import make_photos

    modes = args.modes.split(",")
    h, w = (int(v) for v in args.size.split("x"))
    server, endpoint = start_server()
    try:
        with tempfile.TemporaryDirectory(prefix="s3-bench-") as tmp:
            work = Path(tmp)
            photos = work / "photos"
            make_photos(photos, args.images, (h, w), processes=os.cpu_count() or 1)
            upload(endpoint, photos, "photos", "set")
            tiny_weights(work / "tiny-vit.safetensors")
            env = {**os.environ, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                   "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
                   "AWS_ENDPOINT_URL": endpoint, "AWS_SHARED_CREDENTIALS_FILE": str(work / "none"),
                   "AWS_CONFIG_FILE": str(work / "none"), "HF_HUB_OFFLINE": "1",
                   "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))}
            results = [run_mode(mode, args, photos, work, env) for mode in modes]
    finally:
        server.stop()
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"{args.images} JPEGs of {h}x{w}, {args.workers} loader processes, short side {args.short_side}")
    for r in results:
        print(f"{r['mode']:>16}: {r['images_per_second']:7.1f} images/s  ({r['images']} images, "
              f"{r['failed']} failed, {r['seconds']:.1f} s)")


if __name__ == "__main__":
    main()
