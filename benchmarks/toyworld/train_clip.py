"""Train a tiny open_clip CLIP on toy-world scenes (CPU, minutes) and save it as a test fixture.

Every step draws a fresh batch of scenes and captions from ``scenes.make_scene`` with a seeded
generator, and takes one AdamW step on the CLIP contrastive loss (captions that name the same set
of classes count as matches of each other, so the loss has no false negatives within a batch),
plus (``--dense-loss``, on by default) a FILIP-style token-wise contrastive loss
between the MaskCLIP patch embeddings (ViT: the last block's value path; ResNet:
``c_proj(v_proj(layer4))``) and the prompts of the classes the caption names. Only captions are
used, never masks. Without that term (``--dense-loss 0``) the ViT's patch embeddings carry the
whole scene's context and MaskCLIP labels reach only ~0.25 mIoU; with it ~0.76 (see README.md).

Outputs, in ``--out`` (default ``tests/fixtures/toyclip``):

* ``toyclip-<arch>.json``: the open_clip model config (the model name is the file stem), registered
  with ``open_clip.add_model_config(path)`` and built with ``open_clip.create_model(name)``;
* ``toyclip-<arch>.safetensors``: the fp16 state_dict, loadable with
  ``open_clip.create_model(name, pretrained=path)``.  Token-embedding rows of tokens that the
  toy vocabulary never uses were never trained; they are written as zeros so the file compresses.

Images are normalised with open_clip's default CLIP mean/std (``model.visual.preprocess_cfg``).

Usage (the committed fixtures; deterministic for a seed)::

    python benchmarks/toyworld/train_clip.py --arch vit --steps 300 --seed 0
    python benchmarks/toyworld/train_clip.py --arch rn --steps 300 --seed 0
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
import maskclip_probe as probe  # noqa: E402
import scenes  # noqa: E402

CONFIGS = {
    "vit": {
        "embed_dim": 128,
        "vision_cfg": {"image_size": 64, "layers": 4, "width": 128, "head_width": 32, "patch_size": 8},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 3},
    },
    "rn": {
        "embed_dim": 128,
        "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16, "head_width": 32,
                       "patch_size": None},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 3},
    },
}
# Caption templates drawn during training (the label set's templates should be among them).
TRAIN_TEMPLATES = ("a photo of {}.",)


def build(arch: str, out: Path, cfg_overrides: dict | None = None):
    import open_clip

    name = f"toyclip-{arch}"
    cfg = json.loads(json.dumps(CONFIGS[arch]))
    for k, v in (cfg_overrides or {}).items():
        tower, key = k.split(".", 1) if "." in k else (None, k)
        (cfg[tower] if tower else cfg)[key] = v
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    open_clip.add_model_config(path)
    return name, open_clip.create_model(name), open_clip.get_tokenizer(name)


def vocabulary_ids(tokenizer) -> torch.Tensor:
    """Token ids used by any caption or prompt of the toy world (plus start/end of text)."""
    texts = list(scenes.PROMPTS) + [t.format("x, y and z") for t in TRAIN_TEMPLATES + probe.DEFAULT_TEMPLATES]
    ids = torch.unique(tokenizer(texts))
    return ids[ids != 0]


def batch(rng: np.random.Generator, n: int, size: int, p_simple: float, p_zoom: float = 0.0,
          max_zoom: float = 3.0):
    """``n`` fresh scenes: images uint8 (n,H,W,3), captions, and a class-set key per scene."""
    ims, caps, keys = [], [], []
    for _ in range(n):
        zoom = float(np.exp(rng.uniform(0, np.log(max_zoom)))) if rng.uniform() < p_zoom else 1.0
        if rng.uniform() < p_simple:  # a plain scene: one stuff class, 0-1 things
            im, m, _ = scenes.make_scene(rng, size, n_stuff=1, n_things=int(rng.integers(0, 2)), zoom=zoom)
        else:
            im, m, _ = scenes.make_scene(rng, size, zoom=zoom)
        present = np.unique(m)
        tmpl = TRAIN_TEMPLATES[rng.integers(len(TRAIN_TEMPLATES))]
        ims.append(im)
        caps.append(scenes.caption_for(present, rng, tmpl))
        keys.append(int(sum(1 << int(c) for c in present)))
    return np.stack(ims), caps, torch.tensor(keys)


def clip_loss(img, txt, scale, keys):
    """Symmetric InfoNCE; pairs whose captions name the same class set are all positives."""
    logits = scale * img @ txt.T
    same = (keys[:, None] == keys[None, :]).float()
    target = same / same.sum(1, keepdim=True)
    return 0.5 * (torch.sum(-target * F.log_softmax(logits, 1), 1).mean()
                  + torch.sum(-target * F.log_softmax(logits.T, 1), 1).mean())


def encode_image_and_dense(model, x):
    """The pooled image embedding (as ``encode_image``) and, for a ViT, the MaskCLIP value-path
    patch embeddings ``(N, L, D)`` of the same forward pass (shared first blocks)."""
    v = model.visual
    if not hasattr(v, "transformer"):  # ModifiedResNet: c_proj(v_proj(layer4)) per pixel
        f = v.layer4(v.layer3(v.layer2(v.layer1(v.stem(x)))))
        dense = v.attnpool.c_proj(v.attnpool.v_proj(f.flatten(2).transpose(1, 2)))
        return v.attnpool(f), dense
    t = v._embeds(x)
    for blk in v.transformer.resblocks[:-1]:
        t = blk(t)
    last = v.transformer.resblocks[-1]
    pooled, _ = v._pool(last(t))
    d = t.shape[-1]
    val = F.linear(last.ln_1(t), last.attn.in_proj_weight[2 * d:], last.attn.in_proj_bias[2 * d:])
    dense = t + last.ls_1(last.attn.out_proj(val))
    dense = dense + last.ls_2(last.mlp(last.ln_2(dense)))
    dense = v.ln_post(dense[:, 1:]) @ v.proj
    return pooled @ v.proj, dense


def filip_loss(patches, cls_txt, scale, keys):
    """FILIP-style token-wise contrastive loss between MaskCLIP patch embeddings ``(N, P, D)``
    and the single-class prompt embeddings ``(C, D)`` of the classes a caption names.

    Image i vs caption j: the mean over patches of the best match among j's classes, averaged
    with the mean over j's classes of their best-matching patch; then the same soft-target
    InfoNCE as ``clip_loss``. Only image-level caption content is used (no masks)."""
    n_cls = cls_txt.shape[0]
    named = ((keys[:, None] >> torch.arange(n_cls)[None, :]) & 1).bool()  # (N captions, C)
    sims = patches @ cls_txt.T  # (N images, P, C)
    neg = torch.finfo(sims.dtype).min
    masked = sims[:, None].masked_fill(~named[None, :, None, :], neg)  # (Ni, Nj, P, C)
    i2t = masked.max(-1).values.mean(-1)  # every patch finds its class in the caption
    per_cls = sims.max(1).values  # (Ni, C) best patch per class
    t2i = (per_cls[:, None, :] * named[None]).sum(-1) / named.sum(-1)[None]
    logits = scale * 0.5 * (i2t + t2i)
    same = (keys[:, None] == keys[None, :]).float()
    target = same / same.sum(1, keepdim=True)
    return 0.5 * (torch.sum(-target * F.log_softmax(logits, 1), 1).mean()
                  + torch.sum(-target * F.log_softmax(logits.T, 1), 1).mean())


def param_groups(model, wd: float):
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if p.ndim < 2 or any(k in n for k in ("ln_", "bn", "logit_scale", "embedding", "positional")):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]


def save(model, tokenizer, path: Path) -> None:
    from safetensors.torch import save_file

    sd = {k: v.detach().to(torch.float16).contiguous().clone() for k, v in model.state_dict().items()}
    keep = vocabulary_ids(tokenizer)
    emb = torch.zeros_like(sd["token_embedding.weight"])
    emb[keep] = sd["token_embedding.weight"][keep]
    sd["token_embedding.weight"] = emb
    save_file(sd, str(path), metadata={"format": "pt"})


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=sorted(CONFIGS), default="vit")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--wd", type=float, default=0.1)
    p.add_argument("--warmup", type=float, default=0.1, help="fraction of steps of linear warmup")
    p.add_argument("--p-simple", type=float, default=0.2, help="share of one-stuff, 0-1-thing scenes")
    p.add_argument("--dense-loss", type=float, default=1.0,
                   help="weight of the FILIP-style loss on MaskCLIP patch embeddings, 0: plain CLIP")
    p.add_argument("--p-zoom", type=float, default=0.0, help="share of close-ups (scenes zoomed 1-max-zoom x)")
    p.add_argument("--max-zoom", type=float, default=3.0)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--out", default=str(ROOT / "tests" / "fixtures" / "toyclip"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--eval-n", type=int, default=200, help="held-out scenes for the final probe (0: skip)")
    p.add_argument("--cfg", nargs="*", default=[], help="config overrides, e.g. vision_cfg.width=128")
    a = p.parse_args(argv)

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    rng = np.random.default_rng([a.seed, 7])  # training stream; held-out scenes use another seed
    overrides = {k: json.loads(v) for k, v in (kv.split("=", 1) for kv in a.cfg)}
    name, model, tokenizer = build(a.arch, Path(a.out), overrides)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{name}: {n_params / 1e6:.2f}M parameters, {a.steps} steps of {a.batch_size}", flush=True)

    opt = torch.optim.AdamW(param_groups(model, a.wd), lr=a.lr, betas=(0.9, 0.98), eps=1e-6)
    warm = max(1, int(a.warmup * a.steps))

    def lr_at(step):
        if step < warm:
            return a.lr * (step + 1) / warm
        t = (step - warm) / max(1, a.steps - warm)
        return a.lr * 0.5 * (1 + math.cos(math.pi * t))

    class_tokens = tokenizer([TRAIN_TEMPLATES[0].format(p) for p in scenes.PROMPTS])
    model.train()
    t0 = time.time()
    run = 0.0
    for step in range(a.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        ims, caps, keys = batch(rng, a.batch_size, a.size, a.p_simple, a.p_zoom, a.max_zoom)
        x = probe.preprocess(ims, model)
        if a.dense_loss > 0:
            img, dense = encode_image_and_dense(model, x)
        else:
            img, dense = model.encode_image(x), None
        img = F.normalize(img, dim=-1)
        txt = F.normalize(model.encode_text(tokenizer(caps)), dim=-1)
        loss = clip_loss(img, txt, model.logit_scale.exp(), keys)
        if dense is not None:
            cls_txt = F.normalize(model.encode_text(class_tokens), dim=-1)
            loss = loss + a.dense_loss * filip_loss(F.normalize(dense, dim=-1), cls_txt,
                                                    model.logit_scale.exp(), keys)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        run = loss.item() if step == 0 else 0.9 * run + 0.1 * loss.item()
        if (step + 1) % a.log_every == 0 or step == 0:
            print(f"step {step + 1:5d}  loss {run:.3f}  lr {lr_at(step):.2e}  "
                  f"scale {model.logit_scale.exp().item():.1f}  {time.time() - t0:.0f}s", flush=True)
    train_s = time.time() - t0
    model.eval()
    path = Path(a.out) / f"{name}.safetensors"
    save(model, tokenizer, path)
    print(f"trained in {train_s:.0f}s; wrote {path} ({path.stat().st_size / 1e6:.1f} MB)", flush=True)

    if a.eval_n:
        import open_clip

        reloaded = open_clip.create_model(name, pretrained=str(path)).eval()  # what users will load
        r = probe.evaluate(reloaded, tokenizer, n=a.eval_n)
        print(f"{a.eval_n} held-out scenes (seed {probe.EVAL_SEED}):")
        print(probe.format_result(r), flush=True)


if __name__ == "__main__":
    main()
