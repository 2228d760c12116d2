"""ProxyCLIP and CorrCLIP against their formulas written out plainly, on a random 12-block tiny CLIP
and tiny random second models built with the packages' own classes (timm ViTs for DINO, DINOv2
and MAE, segment-anything's image encoder for SAM).

The references compute from state_dicts and plain loops; CorrCLIP's region tokens run, as in the
authors' code, through the CLIP blocks in one sequence with the patches under an attention mask."""
from __future__ import annotations

import math
from collections import deque
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from seglabel.models.corrclip import CorrCLIP, merge_regions, vote
from seglabel.models.proxyclip import ProxyCLIP
from seglabel.models.regions import RegionSource, paint_masks
from seglabel.models.vfm import VFM
from test_maskclip import _ln, _mlp
from test_methods import HEAD_WIDTH, attention_out, deep_clip, embed, head, qkv  # noqa: F401 (fixture)

timm = pytest.importorskip("timm")

SIZES = [(56, 56), (40, 64), (70, 50)]  # square; padded to 56 x 112 and 112 x 56


# -- tiny second models ---------------------------------------------------------------------------
def tiny_vit(kind: str, seed: int = 3):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    if kind == "dinov2":
        model = VisionTransformer(img_size=28, patch_size=14, embed_dim=32, depth=2, num_heads=2, num_classes=0,
                                  reg_tokens=4, no_embed_class=True, init_values=1.0)
    else:
        model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=0)
    with torch.no_grad():
        model.pos_embed.normal_(0, 1)
        model.cls_token.normal_(0, 1)
    return model.eval()


def tiny_sam_encoder():
    from segment_anything.modeling import ImageEncoderViT

    torch.manual_seed(4)
    return ImageEncoderViT(img_size=64, patch_size=16, in_chans=3, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2,
                           out_chans=16, qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
                           use_rel_pos=True, window_size=2, global_attn_indexes=(1,)).eval()


def make_vfm(kind: str) -> VFM:
    if kind == "sam":
        return VFM("sam", tiny_sam_encoder())
    return VFM(kind, tiny_vit(kind), input_side=48 if kind == "mae" else None)


# -- the formulas, written out ----------------------------------------------------------------------
def pad56(images):
    h, w = images.shape[-2:]
    dh, dw = -h % 56, -w % 56
    return F.pad(images, (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2)), dh // 2, dw // 2


def imagenet(images):
    clip_mean, clip_std = torch.tensor([0.48145466, 0.4578275, 0.40821073]), torch.tensor([0.26862954, 0.26130258, 0.27577711])
    rgb = images * clip_std.view(1, 3, 1, 1) + clip_mean.view(1, 3, 1, 1)
    return (rgb - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def vit_tokens(model, kind, x):
    """Tokens entering the last block of a timm ViT, each model's own way of placing positions."""
    if kind == "mae":  # the input resized to a 48 x 48 square, positions resized by size once
        x = F.interpolate(x, size=(48, 48), mode="bilinear", align_corners=False)
    t = F.conv2d(x, model.patch_embed.proj.weight, model.patch_embed.proj.bias, stride=model.patch_embed.proj.stride)
    gh, gw = t.shape[-2:]
    t = t.flatten(2).transpose(1, 2)
    pos = model.pos_embed[0]
    m0 = model.patch_embed.grid_size[0]
    if kind == "dinov2":  # no class entry; by size, antialiased
        grid = pos.reshape(1, m0, m0, -1).permute(0, 3, 1, 2)
        if (gh, gw) != (m0, m0):
            grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", antialias=True)
        t = torch.cat([model.cls_token.expand(len(t), -1, -1), model.reg_token.expand(len(t), -1, -1),
                       t + grid.flatten(2).transpose(1, 2)], dim=1)
    else:
        grid = pos[1:].reshape(1, m0, m0, -1).permute(0, 3, 1, 2)
        if (gh, gw) != (m0, m0):
            if kind == "dino":  # DINO's hub code: scale factor (n + 0.1) / n0
                grid = F.interpolate(grid, scale_factor=((gh + 0.1) / m0, (gw + 0.1) / m0), mode="bicubic")
            else:
                grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False)
        pos = torch.cat([pos[:1], grid.flatten(2).transpose(1, 2)[0]])
        t = torch.cat([model.cls_token.expand(len(t), -1, -1), t], dim=1) + pos
    for blk in model.blocks[:-1]:
        t = blk(t)
    return t, (gh, gw), 5 if kind == "dinov2" else 1


class _Visual:
    """A CLIP image tower's state_dict under the full model's key names (what ``embed`` reads)."""

    def __init__(self, visual):
        self.visual = visual

    def state_dict(self):
        return {f"visual.{k}": v for k, v in self.visual.state_dict().items()}


def clip_tower_tokens(visual, x):
    """The CLIP tower as a second model: its blocks' outputs written out, and its grid."""
    sd, outputs, grid, blk = embed(_Visual(visual), x, "scale")
    return sd, outputs[-1], grid, blk


def ref_features(vfm: VFM, x):
    """(B, C, I, J): the last layer's patch tokens after the final norm; SAM: its encoder at 64 x 64."""
    if vfm.kind == "clip":  # the last block in full, then ln_post
        sd, t, (gh, gw), blk = clip_tower_tokens(vfm.model, x)
        qs, ks, vs = qkv(_ln(t, sd, f"{blk}.ln_1"), sd, blk)
        t = t + attention_out([torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(HEAD_WIDTH), -1)
                               for q, k in zip(qs, ks)], vs, sd, blk)
        t = _ln(t + _mlp(_ln(t, sd, f"{blk}.ln_2"), sd, f"{blk}.mlp"), sd, "visual.ln_post")[:, 1:]
        return t.transpose(1, 2).reshape(len(t), -1, gh, gw)
    if vfm.kind == "sam":
        return vfm.model(F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False))
    t, (gh, gw), prefix = vit_tokens(vfm.model, vfm.kind, x)
    t = vfm.model.norm(vfm.model.blocks[-1](t))[:, prefix:]
    return t.transpose(1, 2).reshape(len(t), -1, gh, gw)


def ref_qk(vfm: VFM, x):
    if vfm.kind == "clip":
        sd, t, (gh, gw), blk = clip_tower_tokens(vfm.model, x)
        c = t.shape[-1]
        q, k, _ = (_ln(t, sd, f"{blk}.ln_1") @ sd[f"{blk}.attn.in_proj_weight"].T
                   + sd[f"{blk}.attn.in_proj_bias"]).chunk(3, dim=-1)
        return (q + k)[:, 1:].transpose(1, 2).reshape(len(t), c, gh, gw)
    t, (gh, gw), prefix = vit_tokens(vfm.model, vfm.kind, x)
    last = vfm.model.blocks[-1]
    y = F.layer_norm(t, t.shape[-1:], last.norm1.weight, last.norm1.bias, last.norm1.eps)
    q, k, _ = (y @ last.attn.qkv.weight.T + last.attn.qkv.bias).chunk(3, dim=-1)
    return (q + k)[:, prefix:].transpose(1, 2).reshape(len(t), -1, gh, gw)


def values_to_grid(sd, blk, tokens, grid, size):
    """v of ln_1(tokens) (patches), bilinearly resized from CLIP's grid to the VFM's, (I*J, C)."""
    c = tokens.shape[-1]
    v = (_ln(tokens, sd, f"{blk}.ln_1") @ sd[f"{blk}.attn.in_proj_weight"].T + sd[f"{blk}.attn.in_proj_bias"])[:, 2 * c:]
    v = v[1:].T.reshape(1, c, *grid)
    return F.interpolate(v, size=size, mode="bilinear", align_corners=False)[0].flatten(1).T


def proxyclip_reference(clip, vfm, images, text):
    out = []
    for img in images:
        padded, top, left = pad56(img[None])
        ex = ref_features(vfm, padded if vfm.kind == "clip" else imagenet(padded))[0]
        c, i, j = ex.shape
        f = ex.reshape(c, -1)
        f = f / f.norm(dim=0, keepdim=True)
        s = f.T @ f
        s = (s - s.mean() * 1.2) * 3.0
        s[s < 0] = -math.inf
        attn = torch.softmax(s, dim=-1)
        sd, outputs, grid, blk = embed(clip, padded, "scale")
        z = attn @ values_to_grid(sd, blk, outputs[-1][0], grid, (i, j))
        z = head(z @ sd[f"{blk}.attn.out_proj.weight"].T + sd[f"{blk}.attn.out_proj.bias"], sd)
        cos = (F.normalize(z, dim=-1) @ text.T).T.reshape(1, -1, i, j)
        cos = F.interpolate(cos, size=padded.shape[-2:], mode="bilinear", align_corners=False)[0]
        out.append(40.0 * cos[:, top:top + img.shape[1], left:left + img.shape[2]])
    return torch.stack(out)


@pytest.fixture(scope="module")
def text():
    return F.normalize(torch.randn(5, 32, generator=torch.Generator().manual_seed(9)), dim=-1)


def with_text(model, text):
    model.text_embeddings, model.prompt_class, model.num_classes = text, list(range(len(text))), len(text)
    return model.eval()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["dino", "dinov2", "mae", "sam", "clip"])
@pytest.mark.parametrize("size", SIZES)
def test_proxyclip_matches_the_formula(deep_clip, text, kind, size):  # noqa: F811 - the fixture imported above
    vfm = VFM("clip", deep_clip.visual) if kind == "clip" else make_vfm(kind)
    images = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    model = with_text(ProxyCLIP(deep_clip, vfm), text)
    logits = model(images)
    assert logits.shape == (2, 5, *size) and model.stride == 1 and model.pad_to == 1
    torch.testing.assert_close(logits, proxyclip_reference(deep_clip, vfm, images, text), atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("kind", ["dino", "dinov2", "mae"])
def test_vfm_features_at_the_native_size_are_the_packages_own(kind):
    """Where no position embedding is resized, the features are timm's own forward_features."""
    vfm = make_vfm(kind)
    if kind != "mae":  # (MAE always resizes its input)
        x = torch.randn(1, 3, *vfm.model.patch_embed.img_size)
        own = vfm.model.forward_features(x)[:, 5 if kind == "dinov2" else 1:]
        torch.testing.assert_close(vfm.features(x).flatten(2).transpose(1, 2), own, atol=1e-5, rtol=1e-5)
    for size in [(56, 112), (112, 56)]:
        y = torch.randn(2, 3, *size)
        torch.testing.assert_close(vfm.features(y), ref_features(vfm, y), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(vfm.qk(y), ref_qk(vfm, y), atol=1e-5, rtol=1e-5)


def test_proxyclip_images_are_independent_in_a_batch(deep_clip, text):  # noqa: F811 - the fixture imported above
    model = with_text(ProxyCLIP(deep_clip, make_vfm("dino")), text)
    images = torch.randn(3, 3, 40, 64, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(model(images)[1:2], model(images[1:2]), atol=1e-5, rtol=1e-5)


# -- CorrCLIP ---------------------------------------------------------------------------------------
def components(near):
    """Connected components of a boolean adjacency (R, R) by breadth-first search."""
    label = [-1] * len(near)
    for start in range(len(near)):
        if label[start] >= 0:
            continue
        label[start] = start
        todo = deque([start])
        while todo:
            a = todo.popleft()
            for b in range(len(near)):
                if near[a][b] and label[b] < 0:
                    label[b] = start
                    todo.append(b)
    return label


def corrclip_reference(clip, vfm, images, ids, text):
    sd = {k: v.float() for k, v in clip.state_dict().items()}
    layers = len(clip.visual.transformer.resblocks)
    blk_last = f"visual.transformer.resblocks.{layers - 1}"
    out = []
    for img, reg in zip(images, ids):
        padded, top, left = pad56(img[None])
        hp, wp = padded.shape[-2:]
        reg_p = torch.full((hp, wp), int(reg.max()) + 1, dtype=torch.long)
        reg_p[top:top + img.shape[1], left:left + img.shape[2]] = reg
        d = ref_qk(vfm, padded if vfm.kind == "clip" else imagenet(padded))[0]
        i_, j_ = d.shape[-2:]
        d = F.normalize(d.flatten(1).T, dim=-1)
        on_grid = torch.tensor([[int(reg_p[a * hp // i_, b * wp // j_]) for b in range(j_)] for a in range(i_)]).flatten()
        # 1. merging
        values = sorted(set(on_grid.tolist()) - {0})
        means = torch.stack([F.normalize(d[on_grid == v].mean(0), dim=0) for v in values])
        sim = means @ means.T
        comp = components((sim.max() - sim <= 0.2).tolist())
        group = torch.tensor([0 if g == 0 else 1 + sorted(set(comp)).index(comp[values.index(g)])
                              for g in on_grid.tolist()])
        # 2. scope
        s = d @ d.T
        m = len(group)
        allowed = torch.zeros(m, m, dtype=torch.bool)
        for p in range(m):
            for q in range(m):
                gp, gq = int(group[p]), int(group[q])
                allowed[p, q] = (gp == gq != 0) or ((gp == 0 or gq == 0) and bool(s[p, q] > s.mean()))
        attn = torch.softmax((4 * s).masked_fill(~allowed, -math.inf), dim=-1)
        # 4. the region tokens go through CLIP with the patches, in one masked sequence
        width = sd["visual.class_embedding"].shape[0]
        x = F.conv2d(padded, sd["visual.conv1.weight"], stride=8)
        gh, gw = x.shape[-2:]
        x = x.flatten(2)[0].T
        _, outputs, _, _ = embed(clip, padded, "scale")
        pos = sd["visual.positional_embedding"]
        g0 = int(math.isqrt(pos.shape[0] - 1))
        grid = F.interpolate(pos[1:].reshape(1, g0, g0, width).permute(0, 3, 1, 2),
                             scale_factor=((gh + 0.1) / g0, (gw + 0.1) / g0), mode="bicubic", align_corners=False)
        x = torch.cat([sd["visual.class_embedding"][None], x]) + torch.cat([pos[:1], grid.flatten(2)[0].T])
        x = _ln(x, sd, "visual.ln_pre")
        g_clip = [int(group.view(i_, j_)[a * i_ // gh, b * j_ // gw]) for a in range(gh) for b in range(gw)]
        regions = sorted(set(g_clip))
        r = len(regions)
        seq = torch.cat([x[:1].expand(r, -1), x])
        mask = torch.zeros(len(seq), len(seq), dtype=torch.bool)  # True: may attend
        mask[r:, r:] = True
        mask[:r, r] = True
        for a, value in enumerate(regions):
            for n, g in enumerate(g_clip):
                mask[a, r + 1 + n] = g == value
        bias = torch.zeros(mask.shape).masked_fill(~mask, -math.inf)
        normal = []
        for layer in range(layers):
            blk = f"visual.transformer.resblocks.{layer}"
            if layer == layers - 1:
                last_input = seq
            qs, ks, vs = qkv(_ln(seq, sd, f"{blk}.ln_1")[None], sd, blk)
            weights = [torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(HEAD_WIDTH) + bias, -1) for q, k in zip(qs, ks)]
            seq = seq + attention_out(weights, vs, sd, blk)[0]
            seq = seq + _mlp(_ln(seq, sd, f"{blk}.ln_2"), sd, f"{blk}.mlp")
            normal.append(seq[r:])
        torch.testing.assert_close(normal[-2], outputs[-1][0], atol=1e-4, rtol=1e-4)  # unchanged by the regions
        region_tokens = seq[:r]
        # 3. main and spatial branches
        spatial = torch.stack(normal[5:10]).mean(0)
        out_proj = lambda t: t @ sd[f"{blk_last}.attn.out_proj.weight"].T + sd[f"{blk_last}.attn.out_proj.bias"]  # noqa: E731
        main = out_proj(attn @ values_to_grid(sd, blk_last, last_input[r:], (gh, gw), (i_, j_)))
        spat = out_proj(attn @ values_to_grid(sd, blk_last, spatial, (gh, gw), (i_, j_)))
        sem = torch.stack([region_tokens[regions.index(g_clip[(a * gh // i_) * gw + b * gw // j_])]
                           for a in range(i_) for b in range(j_)])
        z = (_ln(main, sd, "visual.ln_post") + _ln(spat, sd, "visual.ln_post")
             + 0.5 * _ln(sem, sd, "visual.ln_post")) @ sd["visual.proj"]
        cos = (F.normalize(z, dim=-1) @ text.T).T.reshape(1, -1, i_, j_)
        cos = F.interpolate(cos, size=(hp, wp), mode="bilinear", align_corners=False)[0]
        out.append(40.0 * cos[:, top:top + img.shape[1], left:left + img.shape[2]])
    return torch.stack(out)


def voronoi(h, w, seed, cells=9):
    rng = np.random.default_rng(seed)
    pts = rng.uniform(0, 1, (cells, 2)) * [h, w]
    yy, xx = np.mgrid[:h, :w]
    ids = ((yy[..., None] - pts[:, 0]) ** 2 + (xx[..., None] - pts[:, 1]) ** 2).argmin(-1) + 1
    ids[h // 3: h // 3 + 6] = 0  # pixels no region covers
    return torch.from_numpy(ids)


class Given(RegionSource):
    spec = "given"

    def __init__(self, maps):
        self.maps, self.calls = list(maps), 0

    def __call__(self, rgb):
        self.calls += 1
        return self.maps[(self.calls - 1) % len(self.maps)].numpy()


@pytest.mark.parametrize("kind", ["dino", "dinov2", "clip"])
@pytest.mark.parametrize("size", SIZES)
def test_corrclip_matches_the_formula(deep_clip, text, kind, size):  # noqa: F811 - the fixture imported above
    vfm = VFM("clip", deep_clip.visual) if kind == "clip" else make_vfm(kind)
    images = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    ids = torch.stack([voronoi(*size, seed) for seed in (1, 2)])
    model = with_text(CorrCLIP(deep_clip, vfm, Given(ids), vote=False), text)
    logits = model.region_logits(images, ids)
    torch.testing.assert_close(logits, corrclip_reference(deep_clip, vfm, images, ids, text), atol=2e-4, rtol=2e-4)


def test_region_merging_chains_regions_within_the_distance():
    torch.manual_seed(0)
    base = F.normalize(torch.randn(4, 16), dim=1)
    feats = torch.cat([base[0:1] + 0.1 * torch.randn(3, 16), base[1:2].expand(2, -1), base[2:3] + 0.05,
                       base[3:4].expand(4, -1)])
    feats = F.normalize(feats, dim=1)
    ids = torch.tensor([1, 1, 2, 5, 5, 0, 7, 7, 7, 7])  # region 0: no region
    groups = merge_regions(ids, feats)
    means = torch.stack([F.normalize(feats[ids == v].mean(0), dim=0) for v in (1, 2, 5, 7)])
    sim = means @ means.T
    comp = components((sim.max() - sim <= 0.2).tolist())
    expected = {v: comp[n] for n, v in enumerate((1, 2, 5, 7))}
    assert groups[5] == 0 and (groups[[0, 1, 2, 3, 4, 6, 7, 8, 9]] > 0).all()
    for a in range(10):
        for b in range(10):
            if ids[a] and ids[b]:
                assert bool(groups[a] == groups[b]) == (expected[int(ids[a])] == expected[int(ids[b])])


def test_vote_gives_each_region_its_most_frequent_label_and_keeps_the_confidence():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 12, 15, generator=g) * 3
    ids = voronoi(12, 15, 4, cells=5)
    out = vote(logits, ids)
    labels, expected = logits.argmax(0).numpy(), logits.argmax(0).numpy().copy()
    for v in np.unique(ids.numpy()):
        if v:
            inside = ids.numpy() == v
            expected[inside] = np.bincount(labels[inside], minlength=4).argmax()
    np.testing.assert_array_equal(out.argmax(0).numpy(), expected)
    torch.testing.assert_close(out.softmax(0).amax(0), logits.softmax(0).amax(0))


def test_paint_masks_paints_larger_masks_over_smaller_ones():
    small = np.zeros((4, 4), bool)
    small[0, 0] = True
    big = np.zeros((4, 4), bool)
    big[:2, :2] = True
    ids = paint_masks([big, small], (4, 4))
    assert ids[0, 0] == 2 and ids[1, 1] == 2 and ids[3, 3] == 0 and ids.max() == 2


def test_corrclip_windows_use_the_whole_image_regions_once(deep_clip, text):  # noqa: F811 - the fixture imported above
    """In the sliding window the regions come from the whole image (one call per image), each
    window reads its part of them, and the vote runs on the averaged logits."""
    from seglabel.predict import Predictor, Protocol

    ids = voronoi(48, 80, 5)
    source = Given([ids])
    model = with_text(CorrCLIP(deep_clip, make_vfm("dino"), source), text)
    x = torch.randn(3, 48, 80, generator=torch.Generator().manual_seed(6))
    predictor = Predictor(model, Protocol(short_side=48, window=48, window_stride=16))
    slid = predictor._slide(x)
    assert source.calls == 1
    boxes = [(0, left, 48, left + 48) for left in (0, 16, 32)]
    total = torch.zeros(5, 48, 80)
    count = torch.zeros(1, 48, 80)
    for t, l, b, r in boxes:
        total[:, t:b, l:r] += model.region_logits(x[None, :, t:b, l:r], ids[None, t:b, l:r])[0]
        count[:, t:b, l:r] += 1
    torch.testing.assert_close(slid, vote(total / count, ids), atol=1e-5, rtol=1e-5)
    whole = model(x[None])  # whole image: its own regions, then the vote
    torch.testing.assert_close(whole[0], vote(model.region_logits(x[None], ids[None])[0], ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_autocast_runs_and_mostly_agrees(deep_clip, text, dtype):  # noqa: F811 - the fixture imported above
    images = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(8))
    for model in (ProxyCLIP(deep_clip, make_vfm("dino")), CorrCLIP(deep_clip, make_vfm("dino"), Given([voronoi(56, 56, 1)]))):
        model = with_text(model, text)
        full = model(images)
        with torch.autocast("cpu", dtype=dtype):
            low = model(images)
        assert torch.isfinite(low).all()
        assert (low.argmax(1) == full.argmax(1)).float().mean() > 0.8


# -- region sources ---------------------------------------------------------------------------------
def test_slic_regions_cover_the_image_with_ids_from_one():
    from seglabel.models.regions import build_regions

    pytest.importorskip("skimage")
    rgb = np.zeros((40, 60, 3), np.uint8)
    rgb[:, 30:] = (200, 40, 40)
    source = build_regions("slic:6")
    ids = source(rgb)
    assert ids.shape == (40, 60) and ids.dtype == np.int64 and ids.min() >= 1
    assert len(np.unique(ids[:, :30])) >= 1 and not set(np.unique(ids[:, :28])) & set(np.unique(ids[:, 32:]))
    assert source.identity() == {"regions": "slic:6"} and build_regions("slic").identity() == {"regions": "slic"}


def tiny_sam():
    from segment_anything.modeling import MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    torch.manual_seed(5)
    return Sam(image_encoder=tiny_sam_encoder(),
               prompt_encoder=PromptEncoder(embed_dim=16, image_embedding_size=(4, 4), input_image_size=(64, 64),
                                            mask_in_chans=4),
               mask_decoder=MaskDecoder(transformer_dim=16, transformer=TwoWayTransformer(depth=1, embedding_dim=16,
                                                                                           mlp_dim=32, num_heads=2),
                                        num_multimask_outputs=3, iou_head_depth=2, iou_head_hidden_dim=16)).eval()


def test_sam_mask_generator_regions_are_painted_by_area():
    from segment_anything import SamAutomaticMaskGenerator

    from seglabel.models.regions import MaskGenerator

    generator = SamAutomaticMaskGenerator(tiny_sam(), points_per_side=8, pred_iou_thresh=-100,
                                          stability_score_thresh=-100)
    rgb = np.random.default_rng(0).integers(0, 256, (48, 72, 3), dtype=np.uint8)
    masks = generator.generate(rgb)
    ids = MaskGenerator("sam:tiny", generator)(rgb)
    assert ids.shape == (48, 72) and masks
    np.testing.assert_array_equal(ids, paint_masks([m["segmentation"] for m in masks], (48, 72)))


@pytest.mark.parametrize("width, blocks, v21, config", [
    (96, 12, False, "configs/sam2/sam2_hiera_t.yaml"), (96, 16, True, "configs/sam2.1/sam2.1_hiera_s.yaml"),
    (112, 24, False, "configs/sam2/sam2_hiera_b+.yaml"), (144, 48, True, "configs/sam2.1/sam2.1_hiera_l.yaml"),
])
def test_sam2_checkpoints_pick_their_config(width, blocks, v21, config):
    from seglabel.models.regions import _sam2_config

    sd = {"image_encoder.trunk.patch_embed.proj.weight": torch.zeros(width, 3, 7, 7)}
    sd.update({f"image_encoder.trunk.blocks.{i}.norm1.weight": torch.zeros(1) for i in range(blocks)})
    if v21:
        sd["no_obj_embed_spatial"] = torch.zeros(1, 64)
    assert _sam2_config(sd, "x.pt") == config
