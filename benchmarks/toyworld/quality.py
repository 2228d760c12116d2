"""Label quality on the toy world: mIoU of each method and option side by side, and time per image.

Labels held-out toy scenes with the committed toy CLIP through the real pipeline
(``seglabel.annotate``) and scores them with ``seglabel.evaluate``, so every later change can be
compared on the same work:

    python benchmarks/toyworld/quality.py --n 200
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
from seglabel.predict import Protocol  # noqa: E402

FIXTURE = REPO / "tests" / "fixtures" / "toyclip"
LABELS = REPO / "labelsets" / "toyworld.yaml"
HELD_OUT_SEED = 20261123  # never used for training

OPTIONS = {  # name -> (key smoothing, prompt denoising)
    "maskclip": (False, False),
    "+ key smoothing": (True, False),
    "+ prompt denoising": (False, True),
    "+ both (default)": (True, True),
}


def towers() -> list[str]:
    return [p.stem for p in sorted(FIXTURE.glob("toyclip-*.json")) if p.with_suffix(".safetensors").is_file()]


def measure(tower: str, ks: bool, pd: bool, data: Path, work: Path, short_side: int) -> tuple[float, float]:
    labelset = load_labelset(LABELS)
    model = load_segmenter(f"maskclip:{tower}", labelset, pretrained=str(FIXTURE / f"{tower}.safetensors"),
                           model_config=str(FIXTURE / f"{tower}.json"), key_smoothing=ks, prompt_denoising=pd)
    items = find_images([data / "images"]).items
    out = work / f"{tower}-{int(ks)}{int(pd)}-{short_side}"
    config = AnnotateConfig(out=out, protocol=Protocol(short_side=short_side), batch_size=16)
    start = time.perf_counter()
    summary = annotate(items, model, labelset, config, argv=[])
    seconds = (time.perf_counter() - start) / max(1, summary.labelled)
    result = evaluate_folders(out, data / "gt", labelset)
    return result.miou, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200, help="held-out scenes")
    ap.add_argument("--short-side", type=int, nargs="+", default=[64, 128])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "scenes"
        scenes.write_dataset(data, args.n, HELD_OUT_SEED)
        print(f"toy world: {args.n} held-out scenes (seed {HELD_OUT_SEED}), {scenes.N_CLASSES} classes, "
              f"chance mIoU ~{1 / scenes.N_CLASSES:.2f}")
        print(f"| tower | option | short side | mIoU | ms / image |\n|---|---|---|---|---|")
        for tower in towers():
            for name, (ks, pd) in OPTIONS.items():
                for side in args.short_side:
                    miou, sec = measure(tower, ks, pd, data, Path(tmp), side)
                    print(f"| {tower} | {name} | {side} | {miou:.3f} | {1000 * sec:.1f} |", flush=True)


if __name__ == "__main__":
    main()
