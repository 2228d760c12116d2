"""A stand-alone MaskCLIP probe for the toy CLIP: dense labels and mIoU on held-out scenes.

MaskCLIP (Zhou et al., 2022) reads per-patch labels out of a CLIP image tower without training:

* ViT: in the last residual block the attention is replaced by its value path,
  ``y = ln_1(x); v = y @ W_v^T + b_v; x = x + out_proj(v); x = x + mlp(ln_2(x))``, then
  ``ln_post`` and ``@ proj``; the class token is dropped and each patch token is compared
  (cosine) with the normalised text embedding of every class (prompts averaged over templates).
* ModifiedResNet: ``c_proj(v_proj(f))`` for every pixel ``f`` of the layer4 feature map.

The patch logits are upsampled bilinearly to the image size and the argmax is the label.
This file exists so label quality can be measured before (and independently of) seglabel's own
implementation; it reads the model through open_clip only.

CLI::

    python benchmarks/toyworld/maskclip_probe.py [--model toyclip-vit] [--weights PATH]
        [--n 200] [--seed 1000] [--templates "a photo of {}." ...]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "toyclip"
sys.path.insert(0, str(HERE))
import scenes  # noqa: E402

EVAL_SEED = 1000  # held-out scenes; training draws from a different seed stream
DEFAULT_TEMPLATES = ("a photo of {}.",)


def load_model(name: str = "toyclip-vit", weights: str | Path | None = None):
    """Register ``tests/fixtures/toyclip/<name>.json`` with open_clip and build the model."""
    import open_clip

    cfg = FIXTURES / f"{name}.json"
    open_clip.add_model_config(cfg)
    weights = FIXTURES / f"{name}.safetensors" if weights is None else Path(weights)
    model = open_clip.create_model(name, pretrained=str(weights))
    model.eval()
    return model, open_clip.get_tokenizer(name)


def preprocess(images: np.ndarray, model) -> torch.Tensor:
    """uint8 ``(N, H, W, 3)`` -> normalised float ``(N, 3, H, W)`` with the model's mean/std."""
    cfg = model.visual.preprocess_cfg
    mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    return (x - mean) / std


@torch.no_grad()
def class_text_embeddings(model, tokenizer, prompts_per_class, templates=DEFAULT_TEMPLATES):
    """``(C, D)`` normalised text embedding per class: mean over prompts x templates, renormalised."""
    out = []
    for prompts in prompts_per_class:
        texts = [t.format(p) for p in prompts for t in templates]
        e = F.normalize(model.encode_text(tokenizer(texts)), dim=-1).mean(0)
        out.append(F.normalize(e, dim=-1))
    return torch.stack(out)


def _is_vit(model) -> bool:
    return hasattr(model.visual, "transformer")


@torch.no_grad()
def dense_features(model, x: torch.Tensor) -> torch.Tensor:
    """MaskCLIP features ``(N, D, h, w)`` (not normalised) for normalised images ``x``."""
    v = model.visual
    if _is_vit(model):
        x = v._embeds(x)
        blocks = v.transformer.resblocks
        for blk in blocks[:-1]:
            x = blk(x)
        last = blocks[-1]
        d = x.shape[-1]
        y = last.ln_1(x)
        w_v = last.attn.in_proj_weight[2 * d:]
        b_v = last.attn.in_proj_bias[2 * d:]
        val = F.linear(y, w_v, b_v)
        x = x + last.ls_1(last.attn.out_proj(val))
        x = x + last.ls_2(last.mlp(last.ln_2(x)))
        x = v.ln_post(x)
        x = x @ v.proj
        x = x[:, 1:]  # drop the class token
        n, l, c = x.shape
        g = int(round(l ** 0.5))
        return x.transpose(1, 2).reshape(n, c, g, g)
    # ModifiedResNet
    x = v.stem(x)
    x = v.layer4(v.layer3(v.layer2(v.layer1(x))))
    x = x.permute(0, 2, 3, 1)
    x = v.attnpool.c_proj(v.attnpool.v_proj(x))
    return x.permute(0, 3, 1, 2)


@torch.no_grad()
def dense_logits(model, images: np.ndarray, text_emb: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """Cosine logits ``(N, C, H, W)`` upsampled bilinearly to the image size."""
    outs = []
    h, w = images.shape[1:3]
    for i in range(0, len(images), batch):
        f = F.normalize(dense_features(model, preprocess(images[i:i + batch], model)), dim=1)
        logits = torch.einsum("nchw,kc->nkhw", f, text_emb)
        outs.append(F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False))
    return torch.cat(outs)


def confusion(pred: np.ndarray, gt: np.ndarray, n_classes: int) -> np.ndarray:
    return np.bincount(gt.ravel().astype(np.int64) * n_classes + pred.ravel(),
                       minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def miou_from_confusion(cm: np.ndarray):
    tp = np.diag(cm).astype(np.float64)
    union = cm.sum(0) + cm.sum(1) - tp
    iou = np.where(union > 0, tp / np.maximum(union, 1), np.nan)
    return float(np.nanmean(iou)), iou, float(tp.sum() / cm.sum())


def held_out(n: int = 200, seed: int = EVAL_SEED, size: int = 64):
    rng = np.random.default_rng(seed)
    ims, masks = zip(*[scenes.make_scene(rng, size)[:2] for _ in range(n)])
    return np.stack(ims), np.stack(masks)


@torch.no_grad()
def evaluate(model, tokenizer, n: int = 200, seed: int = EVAL_SEED, templates=DEFAULT_TEMPLATES,
             data=None) -> dict:
    """MaskCLIP mIoU, per-class IoU and pixel accuracy on ``n`` held-out scenes."""
    images, masks = held_out(n, seed) if data is None else data
    emb = class_text_embeddings(model, tokenizer, [[p] for p in scenes.PROMPTS], templates)
    pred = dense_logits(model, images, emb).argmax(1).numpy().astype(np.int64)
    cm = confusion(pred, masks, scenes.N_CLASSES)
    miou, iou, acc = miou_from_confusion(cm)
    # zero-shot classification with the pooled image embedding: (a) the dominant class, which is
    # always a stuff class, chosen among the stuff prompts (chance 1/4); (b) whether the top-1 of
    # all prompts names a class present in the scene (chance = mean share of classes present)
    sims = (F.normalize(model.encode_image(preprocess(images, model)), dim=-1) @ emb.T).numpy()
    dom = np.array([np.bincount(m.ravel(), minlength=scenes.N_CLASSES).argmax() for m in masks])
    zs_stuff = float((sims[:, :scenes.N_STUFF].argmax(1) == dom).mean())
    present = [set(np.unique(m).tolist()) for m in masks]
    zs_top1 = float(np.mean([int(c) in p for c, p in zip(sims.argmax(1), present)]))
    chance_top1 = float(np.mean([len(p) for p in present]) / scenes.N_CLASSES)
    return {"miou": miou, "iou": iou, "pixel_acc": acc, "zeroshot_stuff": zs_stuff,
            "zeroshot_top1_present": zs_top1, "zeroshot_top1_chance": chance_top1}


def format_result(r: dict) -> str:
    per = "  ".join(f"{c}={v:.2f}" for c, v in zip(scenes.CLASSES, r["iou"]))
    return (f"MaskCLIP mIoU {r['miou']:.3f}  pixel acc {r['pixel_acc']:.3f}\n"
            f"zero-shot: dominant (stuff) class {r['zeroshot_stuff']:.3f} (chance 0.25), "
            f"top-1 class present {r['zeroshot_top1_present']:.3f} "
            f"(chance {r['zeroshot_top1_chance']:.2f})\n  per class: {per}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="MaskCLIP mIoU of a toy CLIP on held-out toy-world scenes")
    p.add_argument("--model", default="toyclip-vit", help="config stem in tests/fixtures/toyclip")
    p.add_argument("--weights", default=None, help="safetensors file (default: the fixture)")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--seed", type=int, default=EVAL_SEED)
    p.add_argument("--templates", nargs="+", default=list(DEFAULT_TEMPLATES))
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    model, tok = load_model(a.model, a.weights)
    t = time.time()
    r = evaluate(model, tok, a.n, a.seed, tuple(a.templates))
    print(format_result(r))
    print(f"({a.n} scenes, seed {a.seed}, templates {a.templates}, {time.time() - t:.1f}s)")


if __name__ == "__main__":
    main()
