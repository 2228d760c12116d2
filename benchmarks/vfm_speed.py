"""Seconds per image of ProxyCLIP and CorrCLIP at their papers' protocol, and of the region sources.

Real-size models with random weights (the compute is the same as with trained ones; no download
needed): CLIP ViT-B/16 and the second models at their published sizes. A SAM / SAM 2 mask generator
with random weights keeps fewer masks than a trained one, so its post-processing is cheaper here:
the figures are lower bounds for it.

    python benchmarks/vfm_speed.py                         # every method and region source
    python benchmarks/vfm_speed.py --only proxyclip:dino:vitb8 regions:sam2 --device cuda --precision fp16

Each figure is the best of ``--repeats`` passes over ``--images`` images of 500 x 375 (a VOC-sized
photo), labelled through ``Predictor.predict`` under ``--protocol paper`` (short side 336, 336
windows, stride 112), after one warm-up image.
"""
from __future__ import annotations

import argparse
import contextlib
import time

import numpy as np
import torch

from seglabel.labelset import parse_labelset
from seglabel.predict import Predictor, Protocol
from seglabel.models.trainingfree import paper_protocol

RUNS = ["proxyclip:dino:vitb8", "proxyclip:dinov2:vitb14-reg", "proxyclip:mae:vitb", "proxyclip:sam:vitb",
        "corrclip:dino:vitb8:slic", "regions:slic", "regions:sam", "regions:sam2"]


def random_vfm(spec: str, device):
    import timm

    from seglabel.models.vfm import PROXIES, VFM

    arch = PROXIES[spec]
    if arch.kind == "sam":
        from segment_anything import sam_model_registry

        return VFM("sam", sam_model_registry[arch.build](checkpoint=None).image_encoder).to(device).eval()
    return VFM(arch.kind, timm.create_model(arch.build, pretrained=False, num_classes=0)).to(device).eval()


def region_source(kind: str, device):
    from seglabel.models.regions import AMG_OPTIONS, MaskGenerator, build_regions

    if kind == "slic":
        return build_regions("slic")
    if kind == "sam":
        from segment_anything import SamAutomaticMaskGenerator, sam_model_registry

        sam = sam_model_registry["vit_b"](checkpoint=None).to(device).eval()
        return MaskGenerator("sam:vitb", SamAutomaticMaskGenerator(sam, **AMG_OPTIONS))
    from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator
    from sam2.build_sam import build_sam2

    model = build_sam2("configs/sam2/sam2_hiera_l.yaml", None, device=str(device), apply_postprocessing=False)
    return MaskGenerator("sam2:hiera-large", SAM2AutomaticMaskGenerator(model.eval(), multimask_output=False,
                                                                        **AMG_OPTIONS))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", default=RUNS, help=f"subset of {RUNS}")
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"])
    args = ap.parse_args()
    import open_clip

    from seglabel.models.corrclip import CorrCLIP
    from seglabel.models.proxyclip import ProxyCLIP

    device = torch.device(args.device)
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (30, 40, 3)).astype(np.float32)  # smooth random photos
    images = [np.asarray(torch.nn.functional.interpolate(torch.from_numpy(small + 20 * i).permute(2, 0, 1)[None],
                                                         size=(375, 500), mode="bilinear")[0].permute(1, 2, 0)
                         .clamp(0, 255).to(torch.uint8)) for i in range(args.images)]
    labelset = parse_labelset({"classes": ["sky", "tree", "road", "person", "car"], "templates": ["a photo of a {}."]})
    clip = open_clip.create_model("ViT-B-16", pretrained=None).to(device).eval()
    tokenizer = open_clip.get_tokenizer("ViT-B-16")
    autocast = (contextlib.nullcontext() if args.precision == "fp32" else
                torch.autocast(device.type, dtype={"fp16": torch.float16, "bf16": torch.bfloat16}[args.precision]))
    print(f"device {args.device}, {args.precision}, {torch.get_num_threads()} threads, {args.images} images of 500 x 375")
    for run in args.only:
        kind, _, rest = run.partition(":")
        if kind == "regions":
            source = region_source(rest, device)  # on the image as CorrCLIP sees it: short side 336
            resized = {id(img): np.asarray(torch.nn.functional.interpolate(
                torch.from_numpy(img).permute(2, 0, 1)[None].float(), size=(336, 448), mode="bilinear")[0]
                .permute(1, 2, 0).round().to(torch.uint8)) for img in images}
            work = lambda img: source(resized[id(img)])  # noqa: E731
        else:
            proxy = rest.rsplit(":", 1)[0] if kind == "corrclip" else rest
            vfm = random_vfm(proxy, device)
            model = (CorrCLIP(clip, vfm, region_source(rest.rsplit(":", 1)[1], device), tokenizer=tokenizer)
                     if kind == "corrclip" else ProxyCLIP(clip, vfm, tokenizer=tokenizer))
            model.set_labels(labelset)
            predictor = Predictor(model, Protocol(**paper_protocol(kind)), batch_size=4)
            work = lambda img: predictor.predict([img])  # noqa: E731
        with torch.no_grad(), autocast:
            work(images[0])
            best = float("inf")
            for _ in range(args.repeats):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                for img in images:
                    work(img)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                best = min(best, time.perf_counter() - start)
        print(f"{run}: {best / len(images):.2f} s / image", flush=True)


if __name__ == "__main__":
    main()
