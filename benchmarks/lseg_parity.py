"""LSeg's default protocol against the official single-scale evaluation, on random weights.

The official steps are the plain restatement in tests/test_lseg.py (``official_single_scale``:
lang-seg's MultiEvalModule with scales [1.0] and no flip, and LSeg.forward). seglabel's side is
its Predictor as `seglabel annotate` runs it with no protocol flag. Printed per photo: argmax
agreement (% of pixels) and max |logit difference|; also the agreement of the whole-image single
pass that was the default before (short side 512, zero padding to a multiple of 32,
align_corners=False upsampling), for comparison. With random weights every pixel embedding points
almost the same way, so encoded label strings would give one label everywhere; the six text
embeddings are set from the photo instead (``varied_text`` in tests/test_lseg.py), so that labels
vary over the photo and a protocol difference shows.

    python benchmarks/lseg_parity.py [--full] [--sizes 192x256,256x192,192x192] [--threads N]

Without --full the small test network (tests/test_lseg.py) is used; --full builds the full-size
ViT-L/16 with random weights (slow on a CPU: about twenty 480x480 passes).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))


def photo(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth colour regions plus noise: closer to a photo than pure noise."""
    import torch.nn.functional as F

    coarse = torch.from_numpy(rng.uniform(0, 255, (1, 3, 6, 8)).astype(np.float32))
    img = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)[0].permute(1, 2, 0).numpy()
    return np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="full-size ViT-L/16 (default: the small test network)")
    ap.add_argument("--variant", default="vit", choices=["vit", "resnet"])
    ap.add_argument("--sizes", default="192x256,256x192,192x192", help="HxW of the photos")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from test_lseg import official_single_scale, small_net, varied_text

    from seglabel.labelset import LabelSet
    from seglabel.models.lseg import LSeg
    from seglabel.models.lseg_net import build_lseg_net
    from seglabel.predict import Predictor, Protocol, bilinear_matrix, resolve_protocol
    from seglabel.tta import scale_logits

    torch.manual_seed(0)
    net = (build_lseg_net(args.variant, device="cpu") if args.full else small_net(args.variant)).requires_grad_(False)
    model = LSeg(net.eval()).eval()
    labels = ["a", "b", "c", "d", "e", "f"]
    model.set_labels(LabelSet.from_names(labels))
    default = Predictor(model, resolve_protocol(model))  # annotate with no protocol flag: the model's own
    before = Predictor(model, Protocol())  # the old default: one whole-image pass
    print(f"{'full-size' if args.full else 'small test'} LSeg {args.variant}, random weights, {len(labels)} labels; "
          f"default protocol: tta={default.protocol.tta} scales={default.protocol.scales} flip={default.protocol.flip}")
    rng = np.random.default_rng(0)
    for size in args.sizes.split(","):
        h, w = map(int, size.split("x"))
        rgb = photo(h, w, rng)
        t = time.perf_counter()
        model.text_embeddings = varied_text(net, rgb)
        with torch.no_grad():
            official = official_single_scale(net, model.text_embeddings, rgb)
            [pred] = default.predict([rgb])
            # seglabel's logits at the photo's size, composed as Predictor._finish does
            x = (torch.from_numpy(rgb).permute(2, 0, 1).float() / 255 - default.mean) / default.std
            small = scale_logits(model, x, 1.0)
            ours = torch.einsum("yh,khw,xw->kyx", bilinear_matrix(small.shape[1], h, align_corners=True), small,
                                bilinear_matrix(small.shape[2], w, align_corners=True))
            [old] = before.predict([rgb])
        target = official.argmax(0).numpy()
        agree = (pred.labels == target).mean() * 100
        agree_old = (old.labels == target).mean() * 100
        largest = np.bincount(target.ravel(), minlength=len(labels)).max() / target.size * 100
        print(f"{h}x{w} (largest label {largest:.0f}% of the pixels): default vs official single-scale: argmax "
              f"{agree:.2f}% equal, max |dlogit| {(ours - official).abs().max().item():.1e}; old whole-image "
              f"pass: argmax {agree_old:.1f}% equal ({time.perf_counter() - t:.0f} s)")


if __name__ == "__main__":
    main()
