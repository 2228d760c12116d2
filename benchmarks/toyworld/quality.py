"""Label quality on the toy world: mIoU of each method and option side by side, and time per image.

Labels held-out toy scenes with the committed toy CLIP through the real pipeline
(``seglabel.annotate``) and scores them with ``seglabel.evaluate``, so every later change can be
compared on the same work:

    python benchmarks/toyworld/quality.py --n 200
    python benchmarks/toyworld/quality.py --n 60 --short-side 64 --method naclip scclip --pamr both
    python benchmarks/toyworld/quality.py --n 200 --method proxyclip corrclip --regions slic slic:16

ProxyCLIP and CorrCLIP run with the toy CLIP's own image tower as their second model (``--proxy
clip``: there is no toy DINO or SAM) and CorrCLIP with superpixel regions (``--regions slic``).

Time per image: ``Predictor.predict`` on 32 of the scenes, best of 3 passes (other jobs on a
shared CPU only add time), without image decoding and writing.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).parent))

import scenes  # noqa: E402

from seglabel.annotate import AnnotateConfig, annotate  # noqa: E402
from seglabel.evaluate import evaluate_folders  # noqa: E402
from seglabel.images import find_images  # noqa: E402
from seglabel.labelset import load_labelset  # noqa: E402
from seglabel.models.registry import load_segmenter  # noqa: E402
from seglabel.models.trainingfree import METHODS, VFM_METHODS  # noqa: E402
from seglabel.predict import Protocol  # noqa: E402

FIXTURE = REPO / "tests" / "fixtures" / "toyclip"
LABELS = REPO / "labelsets" / "toyworld.yaml"
HELD_OUT_SEED = 20261123  # never used for training

MASKCLIP_OPTIONS = {  # MaskCLIP's own refinements: name -> (key smoothing, prompt denoising)
    "": (False, False),
    " + key smoothing": (True, False),
    " + prompt denoising": (False, True),
    " + both": (True, True),
}


def towers() -> list[str]:
    return [p.stem for p in sorted(FIXTURE.glob("toyclip-*.json")) if p.with_suffix(".safetensors").is_file()]


def measure(tower: str, method: str, ks: bool, pd: bool, pamr: bool, data: Path, work: Path,
            short_side: int, extra: dict | None = None) -> tuple[float, float]:
    """(mIoU of `seglabel annotate`'s labels, seconds per image of the model and post-processing).
    ``extra``: proxy / regions of ProxyCLIP and CorrCLIP, and ``vote`` (CorrCLIP's region vote)."""
    labelset = load_labelset(LABELS)
    extra = dict(extra or {})
    vote = extra.pop("vote", True)
    model = load_segmenter(f"maskclip:{tower}", labelset, pretrained=str(FIXTURE / f"{tower}.safetensors"),
                           model_config=str(FIXTURE / f"{tower}.json"), method=method, key_smoothing=ks,
                           prompt_denoising=pd, **extra)
    if not vote:
        model.vote = False
    items = find_images([data / "images"]).items
    tag = "-".join(f"{v}" for v in extra.values()).replace(":", "") + ("-novote" if not vote else "")
    out = work / f"{tower}-{method}-{int(ks)}{int(pd)}{int(pamr)}-{short_side}-{tag}"
    protocol = Protocol(short_side=short_side, pamr=pamr)
    annotate(items, model, labelset, AnnotateConfig(out=out, protocol=protocol, batch_size=16), argv=[])
    result = evaluate_folders(out, data / "gt", labelset)
    return result.miou, seconds_per_image(model, protocol, [item.path for item in items[:TIMED_IMAGES]])


TIMED_IMAGES = 32


def seconds_per_image(model, protocol: Protocol, paths: list[Path], repeats: int = 3) -> float:
    """Predictor.predict (resize, model, PAMR, upsampling, softmax) on decoded images, batches of 16;
    the best of ``repeats`` passes, since other jobs on a shared CPU only ever add time."""
    import numpy as np
    from PIL import Image

    from seglabel.predict import Predictor

    images = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    predictor = Predictor(model, protocol, batch_size=16)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(0, len(images), 16):
            predictor.predict(images[i:i + 16])
        best = min(best, time.perf_counter() - start)
    return best / len(images)


def variants(tower: str, methods: list[str], pamr_modes: list[bool], all_options: bool, regions: list[str],
             no_vote: bool = False):
    """(row name, method, key smoothing, prompt denoising, pamr, extra options) to measure on ``tower``."""
    for method in methods:
        if method != "maskclip" and "rn" in tower:
            continue  # the successors are ViT-only
        options = MASKCLIP_OPTIONS if method == "maskclip" and all_options else {"": (False, False)}
        extras = {"": {}}
        if method == "proxyclip":
            extras = {" (proxy: its own tower)": {"proxy": "clip"}}
        elif method == "corrclip":
            extras = {f" ({r})": {"proxy": "clip", "regions": r} for r in regions}
            if no_vote:
                extras.update({f" ({r}, no vote)": {"proxy": "clip", "regions": r, "vote": False} for r in regions})
        for suffix, (ks, pd) in options.items():
            for name, extra in extras.items():
                for pamr in pamr_modes:
                    yield method + suffix + name + (" + PAMR" if pamr else ""), method, ks, pd, pamr, extra


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200, help="held-out scenes")
    ap.add_argument("--short-side", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--method", nargs="+", default=list(METHODS + VFM_METHODS), choices=METHODS + VFM_METHODS)
    ap.add_argument("--regions", nargs="+", default=["slic"], help="CorrCLIP's region sources (slic, slic:N)")
    ap.add_argument("--no-vote", action="store_true", help="also CorrCLIP without its region vote")
    ap.add_argument("--pamr", choices=["off", "on", "both"], default="both")
    ap.add_argument("--tower", nargs="+", default=None, help="default: every committed toy CLIP")
    ap.add_argument("--maskclip-options", action="store_true",
                    help="also MaskCLIP with key smoothing / prompt denoising")
    args = ap.parse_args()
    pamr_modes = {"off": [False], "on": [True], "both": [False, True]}[args.pamr]
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "scenes"
        scenes.write_dataset(data, args.n, HELD_OUT_SEED)
        print(f"toy world: {args.n} held-out scenes (seed {HELD_OUT_SEED}), {scenes.N_CLASSES} classes, "
              f"chance mIoU ~{1 / scenes.N_CLASSES:.2f}")
        print("| tower | method | short side | mIoU | ms / image |\n|---|---|---|---|---|")
        for tower in args.tower or towers():
            for name, method, ks, pd, pamr, extra in variants(tower, args.method, pamr_modes, args.maskclip_options,
                                                              args.regions, args.no_vote):
                for side in args.short_side:
                    miou, sec = measure(tower, method, ks, pd, pamr, data, Path(tmp), side, extra)
                    print(f"| {tower} | {name} | {side} | {miou:.3f} | {1000 * sec:.1f} |", flush=True)


if __name__ == "__main__":
    main()
