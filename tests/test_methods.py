"""ClearCLIP, SCLIP, NACLIP, SC-CLIP and PAMR against direct computations of their formulas.

The references below are written from the formulas (the state_dict alone, plain loops where the
method is a loop), not from seglabel's implementation. A 12-block tiny CLIP gives SC-CLIP the
block indices its authors use."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import build_tiny_clip
from seglabel.models.maskclip import MaskCLIP
from seglabel.models.trainingfree import (
    METHODS, fill_outliers, gaussian_bias, outlier_tokens, paper_protocol, resize_pos_embed_by_scale,
    scclip_indices)
from seglabel.predict import Predictor, Protocol
from seglabel.refine import pamr
from test_maskclip import _ln, _mlp

HEAD_WIDTH = 16


@pytest.fixture(scope="module")
def deep_clip(tmp_path_factory):
    """A random tiny CLIP with 12 vision blocks (SC-CLIP reads block outputs 3..9)."""
    import open_clip

    cfg = {"embed_dim": 32,
           "vision_cfg": {"image_size": 32, "layers": 12, "width": 48, "head_width": HEAD_WIDTH, "patch_size": 8},
           "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    path = tmp_path_factory.mktemp("cfg") / "tiny-vit12.json"
    path.write_text(json.dumps(cfg))
    open_clip.add_model_config(path)
    torch.manual_seed(5)
    model = open_clip.create_model("tiny-vit12").eval()
    with torch.no_grad():  # larger position embeddings and biases: every term matters
        model.visual.positional_embedding.mul_(20)
        for name, p in model.visual.named_parameters():
            if name.endswith("in_proj_bias"):
                p.normal_(0, 0.5)
    return model


# -- the formulas, written out ----------------------------------------------------------------------
def linear(x, sd, name):
    return x @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]


def qkv(y, sd, blk):
    """Per-head q, k, v: lists over heads of (B, N, d)."""
    q, k, v = (y @ sd[f"{blk}.attn.in_proj_weight"].T + sd[f"{blk}.attn.in_proj_bias"]).chunk(3, dim=-1)
    heads = y.shape[-1] // HEAD_WIDTH
    cut = lambda t: [t[..., h * HEAD_WIDTH:(h + 1) * HEAD_WIDTH] for h in range(heads)]  # noqa: E731
    return cut(q), cut(k), cut(v)


def attention_out(weights, vs, sd, blk):
    """O(A v): per-head weights (list of (B, N, N) or one shared) applied to v, concatenated, out_proj."""
    out = torch.cat([w @ v for w, v in zip(weights, vs)], dim=-1)
    return linear(out, sd, f"{blk}.attn.out_proj")


def softmax_self(t):
    return torch.softmax(t @ t.transpose(-1, -2) / math.sqrt(t.shape[-1]), dim=-1)


def embed(model, images, resize):
    """Tokens after ln_pre and the outputs of every block but the last, and the grid."""
    sd = {k: v.float() for k, v in model.state_dict().items()}
    width = sd["visual.class_embedding"].shape[0]
    p = sd["visual.conv1.weight"].shape[-1]
    b, _, h, w = images.shape
    images = F.pad(images, (0, -w % p, 0, -h % p))
    x = F.conv2d(images, sd["visual.conv1.weight"], stride=p)
    gh, gw = x.shape[-2:]
    x = x.flatten(2).transpose(1, 2)
    pos = sd["visual.positional_embedding"]
    g0 = int(math.isqrt(pos.shape[0] - 1))
    grid = pos[1:].reshape(1, g0, g0, width).permute(0, 3, 1, 2)
    if (gh, gw) != (g0, g0):
        if resize == "size":
            grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False)
        else:  # the successors: scale factor (n + 0.1) / n0
            grid = F.interpolate(grid, scale_factor=((gh + 0.1) / g0, (gw + 0.1) / g0), mode="bicubic",
                                 align_corners=False, recompute_scale_factor=False)
    pos = torch.cat([pos[:1], grid.permute(0, 2, 3, 1).reshape(gh * gw, width)])
    x = torch.cat([sd["visual.class_embedding"].expand(b, 1, width), x], dim=1) + pos
    x = _ln(x, sd, "visual.ln_pre")
    layers = len({k.split(".")[3] for k in sd if k.startswith("visual.transformer.resblocks.")})
    outputs = []
    for i in range(layers - 1):
        blk = f"visual.transformer.resblocks.{i}"
        y = _ln(x, sd, f"{blk}.ln_1")
        qs, ks, vs = qkv(y, sd, blk)
        x = x + attention_out([torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(HEAD_WIDTH), -1)
                               for q, k in zip(qs, ks)], vs, sd, blk)
        x = x + _mlp(_ln(x, sd, f"{blk}.ln_2"), sd, f"{blk}.mlp")
        outputs.append(x)
    return sd, outputs, (gh, gw), f"visual.transformer.resblocks.{layers - 1}"


def head(z, sd):
    return _ln(z, sd, "visual.ln_post") @ sd["visual.proj"]


def reference(model, images, method):
    sd, outputs, (gh, gw), blk = embed(model, images, "size" if method == "maskclip" else "scale")
    x = outputs[-1]
    y = _ln(x, sd, f"{blk}.ln_1")
    qs, ks, vs = qkv(y, sd, blk)
    if method == "maskclip":  # attention replaced by the identity on the value path
        z = x + attention_out([torch.eye(x.shape[1])] * len(vs), vs, sd, blk)
        z = z + _mlp(_ln(z, sd, f"{blk}.ln_2"), sd, f"{blk}.mlp")
    elif method == "clearclip":
        z = attention_out([softmax_self(q) for q in qs], vs, sd, blk)
    elif method == "sclip":
        z = x + attention_out([softmax_self(q) + softmax_self(k) for q, k in zip(qs, ks)], vs, sd, blk)
        z = z + _mlp(_ln(z, sd, f"{blk}.ln_2"), sd, f"{blk}.mlp")
    elif method == "naclip":
        n = gh * gw
        g = torch.zeros(n + 1, n + 1)
        for a in range(n):
            for c in range(n):
                d2 = (a // gw - c // gw) ** 2 + (a % gw - c % gw) ** 2
                g[a + 1, c + 1] = math.exp(-d2 / (2 * 5.0 ** 2))
        z = attention_out([torch.softmax(k @ k.transpose(-1, -2) / math.sqrt(HEAD_WIDTH) + g, -1) for k in ks],
                          vs, sd, blk)
    elif method == "scclip":
        z = torch.stack([scclip_reference(sd, [o[i] for o in outputs], (gh, gw), blk) for i in range(len(x))])
        return to_map(head(z, sd), gh, gw)
    return to_map(head(z, sd)[:, 1:], gh, gw)


def to_map(t, gh, gw):
    return t.transpose(1, 2).reshape(t.shape[0], -1, gh, gw)


def lof_outliers(tokens, k=30, contamination=0.05):
    """Local outlier factor as SC-CLIP computes it, one token at a time."""
    t = tokens.double().numpy()
    n = len(t)
    k = k if n > k else n // 2  # seglabel's choice for grids smaller than the authors ever use
    d = ((t[:, None] - t[None]) ** 2).sum(-1)
    nbrs, reach_mean = [], []
    for p in range(n):
        order = [o for o in np.argsort(d[p], kind="stable") if o != p][:k]
        kdist = d[p, order[-1]]
        nbrs.append(order)
        reach_mean.append(np.mean([max(d[p, o], kdist) for o in order]))
    lrd = k / np.array(reach_mean)
    lof = np.array([np.mean([lrd[o] / lrd[p] for o in nbrs[p]]) for p in range(n)])
    return torch.from_numpy(lof > np.quantile(lof, 1 - contamination))


def fill_reference(tokens, outliers, gh, gw):
    out = tokens.clone()
    for i in range(gh * gw):
        if not outliers[i]:
            continue
        r, c = i // gw, i % gw
        good = [(r + dr) * gw + c + dc for dr in (-1, 0, 1) for dc in (-1, 0, 1)
                if (dr or dc) and 0 <= r + dr < gh and 0 <= c + dc < gw and not outliers[(r + dr) * gw + c + dc]]
        if good:
            out[i] = tokens[good].mean(0)
    return out


def scclip_reference(sd, outputs, grid, blk):
    gh, gw = grid
    cls, patches = outputs[-1][0], outputs[-1][1:]
    bad = lof_outliers(patches)
    x = fill_reference(patches, bad, gh, gw)
    cos = lambda t: F.normalize(t, dim=-1) @ F.normalize(t, dim=-1).T  # noqa: E731
    mid = cos(fill_reference(outputs[8][1:], bad, gh, gw))
    rownorm = lambda s: s / (s.sum(-1, keepdim=True) + 1e-6)  # noqa: E731
    x = rownorm(torch.where(mid >= 0.4, mid, torch.zeros_like(mid))) @ x
    m = 3 * (mid - mid.mean())
    guide = torch.softmax(torch.where(m < 0, torch.full_like(m, -math.inf), m), -1)

    def last_block(tokens, cls_token):
        _, ks, vs = qkv(_ln(tokens, sd, f"{blk}.ln_1"), sd, blk)
        return attention_out([(guide + softmax_self(k)) / 2 for k in ks], vs, sd, blk) + 0.3 * cls_token

    x = last_block(x, cls)
    after = cos(outputs[3][1:])
    after = rownorm(torch.where(after >= 0.4, after, torch.zeros_like(after)))
    x = after @ x
    r = sum(outputs[i] for i in range(3, 10))
    return x + after @ last_block(r[1:], r[0])


# -- dense features -------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("method", [m for m in METHODS if m != "scclip"])
@pytest.mark.parametrize("size", [(32, 32), (40, 64), (37, 50)])
def test_dense_features_match_the_formulas(deep_clip, method, size):
    images = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    feats, _ = MaskCLIP(deep_clip, method=method).dense_features(images)
    expected = reference(deep_clip, images, method)
    assert feats.shape == expected.shape == (2, 32, math.ceil(size[0] / 8), math.ceil(size[1] / 8))
    torch.testing.assert_close(feats, expected, atol=2e-4, rtol=2e-4)


@pytest.mark.slow
@pytest.mark.parametrize("size", [(48, 48), (40, 64), (32, 32), (56, 40)])
def test_scclip_dense_features_match_the_formulas(deep_clip, size):
    images = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(2))
    feats, _ = MaskCLIP(deep_clip, method="scclip").dense_features(images)
    expected = reference(deep_clip, images, "scclip")
    assert feats.shape == expected.shape
    torch.testing.assert_close(feats, expected, atol=2e-4, rtol=2e-4)


def test_scclip_images_are_independent_in_a_batch(deep_clip):
    images = torch.randn(3, 3, 40, 48, generator=torch.Generator().manual_seed(3))
    mc = MaskCLIP(deep_clip, method="scclip")
    together, _ = mc.dense_features(images)
    alone, _ = mc.dense_features(images[1:2])
    torch.testing.assert_close(together[1:2], alone, atol=1e-5, rtol=1e-5)


def test_the_methods_differ(deep_clip):
    images = torch.randn(1, 3, 40, 48, generator=torch.Generator().manual_seed(4))
    feats = [MaskCLIP(deep_clip, method=m).dense_features(images)[0] for m in METHODS]
    for i in range(len(feats)):
        for j in range(i):
            assert not torch.allclose(feats[i], feats[j], atol=1e-3)


def test_lof_and_outlier_filling_pieces():
    torch.manual_seed(0)
    tokens = torch.randn(42, 8)
    tokens[[5, 17]] += 6  # two obvious outliers
    found = outlier_tokens(tokens)
    assert found[5] and found[17]
    assert torch.equal(found, lof_outliers(tokens))
    filled = fill_outliers(tokens, found, (6, 7))
    torch.testing.assert_close(filled, fill_reference(tokens, found, 6, 7))
    assert torch.equal(filled[~found], tokens[~found])


def test_gaussian_bias_and_pos_embed_resize_by_scale():
    g = gaussian_bias((3, 4), 5.0)
    assert g.shape == (12, 12) and torch.allclose(g.diagonal(), torch.ones(12))
    assert math.isclose(g[0, 11].item(), math.exp(-(2 ** 2 + 3 ** 2) / 50), rel_tol=1e-6)  # (0,0) to (2,3)
    pos = torch.randn(1 + 16, 6)
    assert resize_pos_embed_by_scale(pos, (4, 4), (4, 4)) is pos
    out = resize_pos_embed_by_scale(pos, (4, 4), (3, 7))
    grid = pos[1:].reshape(1, 4, 4, 6).permute(0, 3, 1, 2)
    by_size = F.interpolate(grid, size=(3, 7), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(21, 6)
    torch.testing.assert_close(out[0], pos[0])
    assert out.shape == (22, 6) and not torch.allclose(out[1:], by_size, atol=1e-3)


def test_scclip_block_indices():
    assert scclip_indices(12) == {"mid": 8, "after": 3, "multi_first": 3, "multi_last": 9}
    assert scclip_indices(4) == {"mid": 2, "after": 1, "multi_first": 1, "multi_last": 2}
    assert all(0 <= i <= 1 for i in scclip_indices(3).values())


# -- labels, towers, protocols ----------------------------------------------------------------------
def test_synonyms_take_the_max_probability_over_a_class_prompts(deep_clip):
    from seglabel.labelset import parse_labelset

    mc = MaskCLIP(deep_clip, method="naclip")
    ls = parse_labelset({"classes": ["a", {"name": "b", "prompts": ["b1", "b2", "b3"]}, "c"]})
    mc.prompt_class, mc.num_classes = ls.prompt_class, len(ls)
    cos = torch.rand(1, 5, 2, 3) * 2 - 1
    probs = torch.softmax(40 * cos, dim=1)  # over all five prompts, then max per class
    expected = torch.stack([probs[:, 0], probs[:, 1:4].max(dim=1).values, probs[:, 4]], dim=1)
    logits = mc.class_logits(cos)
    torch.testing.assert_close(logits.exp(), expected)
    assert torch.equal(logits.argmax(1), expected.argmax(1))


def test_logit_scales_and_paper_protocols(deep_clip):
    assert MaskCLIP(deep_clip, method="clearclip").logit_scale == 50
    assert MaskCLIP(deep_clip, method="sclip").logit_scale == 40
    assert MaskCLIP(deep_clip, method="naclip", logit_scale=65).describe()["logit_scale"] == 65
    assert "logit_scale" not in MaskCLIP(deep_clip).describe()
    assert Protocol(**paper_protocol("clearclip")) == Protocol(short_side=448, window=448, window_stride=224)
    for m in ("sclip", "naclip", "scclip"):
        assert Protocol(**paper_protocol(m)) == Protocol(short_side=336, window=224, window_stride=112)
    assert Protocol(**paper_protocol("maskclip")) == Protocol()


def test_resnet_towers_refuse_the_vit_methods():
    model, _ = build_tiny_clip("tiny-rn")
    with pytest.raises(ValueError, match="needs a ViT"):
        MaskCLIP(model, method="naclip")
    with pytest.raises(ValueError, match="unknown method"):
        MaskCLIP(model, method="nope")


def test_openai_weights_are_built_with_quickgelu(tmp_path, monkeypatch, tiny_weights):
    """A pretrained tag whose config says QuickGELU (as every 'openai' tag does) gets it, even for
    an architecture whose own config uses exact GELU."""
    import open_clip
    from open_clip.transformer import QuickGELU

    from seglabel.models import clip as clip_mod

    assert open_clip.get_pretrained_cfg("ViT-B-16", "openai").get("quick_gelu")
    assert not open_clip.get_model_config("ViT-B-16").get("quick_gelu")
    build_tiny_clip("tiny-vit")
    monkeypatch.setattr(open_clip, "get_pretrained_cfg", lambda name, tag: {"quick_gelu": True, "hf_hub": "x/y/"})
    monkeypatch.setattr(clip_mod, "_cached_or_download", lambda *a, **k: str(tiny_weights["tiny-vit"]))
    model, _, info = clip_mod.create_clip("tiny-vit", "openai")
    assert info["quick_gelu"]
    acts = [m for m in model.visual.modules() if isinstance(m, (QuickGELU, torch.nn.GELU))]
    assert acts and all(isinstance(a, QuickGELU) for a in acts)


# -- PAMR -----------------------------------------------------------------------------------------
def pamr_reference(image, mask, iterations=10, dilations=(8, 16)):
    """PAMR written with unfold over replicate-padded dilated 3x3 neighbourhoods."""
    def neighbourhood(t, d):  # (C, 9, H, W), centre at index 4
        c, h, w = t.shape
        padded = F.pad(t[None], (d,) * 4, mode="replicate")
        return F.unfold(padded, 3, dilation=d).view(c, 9, h, w)

    ring = [0, 1, 2, 3, 5, 6, 7, 8]
    full = torch.cat([neighbourhood(image, d) for d in dilations], dim=1)  # (3, 18, H, W)
    std = full.std(dim=1, unbiased=True)
    diffs = torch.cat([(image[:, None] - neighbourhood(image, d)[:, ring]).abs() for d in dilations], dim=1)
    aff = torch.softmax((-diffs / (1e-8 + 0.1 * std[:, None])).mean(0), dim=0)  # (16, H, W)
    for _ in range(iterations):
        m = torch.cat([neighbourhood(mask, d)[:, ring] for d in dilations], dim=1)
        mask = (m * aff[None]).sum(1)
    return mask


@pytest.mark.parametrize("size", [(24, 40), (50, 33)])
def test_pamr_matches_the_formula_and_class_groups_change_nothing(size):
    g = torch.Generator().manual_seed(7)
    image = torch.randn(3, *size, generator=g)
    logits = torch.randn(5, *size, generator=g) * 3
    expected = pamr_reference(image, logits)
    torch.testing.assert_close(pamr(image, logits), expected, atol=1e-5, rtol=1e-5)
    grouped = pamr(image, logits, iterations=2, dilations=(1, 2), max_elements=2 * size[0] * size[1])
    torch.testing.assert_close(grouped, pamr_reference(image, logits, 2, (1, 2)), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pamr(image, 40 * logits), 40 * expected, atol=1e-3, rtol=1e-5)  # linear


def test_predictor_refines_upsampled_logits_with_pamr():
    from test_predict import ConstantGrid

    torch.manual_seed(0)
    grid = torch.randn(1, 4, 5, 7)
    rgb = np.random.default_rng(0).integers(0, 256, (74, 100, 3), dtype=np.uint8)
    model = ConstantGrid(lambda x: grid.expand(x.shape[0], -1, -1, -1))
    protocol = Protocol(short_side=37, max_long_side=0, pamr=True)
    [pred] = Predictor(model, protocol).predict([rgb])
    x = Predictor(model, protocol).prepare(rgb)  # (3, 37, 50)
    up = F.interpolate(grid, size=(40, 56), mode="bilinear", align_corners=False)[0, :, :37, :50]
    refined = pamr_reference(x, up)
    probs = F.interpolate(refined[None], size=(74, 100), mode="bilinear", align_corners=False)[0].softmax(0)
    np.testing.assert_array_equal(pred.labels, probs.argmax(0).numpy())
    np.testing.assert_allclose(pred.confidence, probs.max(0).values.numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="PAMR"):
        Predictor(model, Protocol(pamr=True, tta=True))


# -- the command line -----------------------------------------------------------------------------
@pytest.mark.slow
def test_cli_method_pamr_and_paper_protocol(tmp_path, tiny_weights, small_labelset):
    from conftest import write_images
    from test_annotate_cli import annotate

    photos = tmp_path / "photos"
    write_images(photos, ["a.png", "b.png"], size=(40, 56))
    out = tmp_path / "out"
    r = annotate([photos], out, small_labelset, tiny_weights, "tiny-vit", "--method", "naclip", "--pamr",
                 "--protocol", "paper", "--short-side", "48")
    assert r.returncode == 0, r.stderr
    settings = json.loads((out / "run.json").read_text())["settings"]
    assert settings["method"]["method"] == "naclip" and not settings["method"]["key_smoothing"]
    assert settings["protocol"] == {"short_side": 48, "max_long_side": 2048, "window": 224, "window_stride": 112,
                                    "tta": False, "pamr": True, "scales": [0.5, 0.75, 1.0, 1.25, 1.5, 1.75],
                                    "flip": True}
    r = annotate([photos], out, small_labelset, tiny_weights, "tiny-vit", "--method", "sclip")
    assert r.returncode == 2 and "other settings" in r.stderr  # never mixed into one --out
    r = annotate([photos], tmp_path / "rn", small_labelset, tiny_weights, "tiny-rn", "--method", "scclip")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "ViT" in r.stderr


@pytest.mark.slow
def test_cli_defaults_sclip_on_vits_and_maskclip_with_its_refinements_on_resnets(tmp_path, tiny_weights,
                                                                                  small_labelset):
    from conftest import write_images
    from test_annotate_cli import annotate

    photos = tmp_path / "photos"
    write_images(photos, ["a.png"], size=(64, 64))
    for name, method, refined in (("tiny-vit", "sclip", False), ("tiny-rn", "maskclip", True)):
        r = annotate([photos], tmp_path / name, small_labelset, tiny_weights, name)
        assert r.returncode == 0, r.stderr
        described = json.loads((tmp_path / name / "run.json").read_text())["settings"]["method"]
        assert described["method"] == method and described["key_smoothing"] is refined
