"""MaskCLIP's dense features against a direct computation from the CLIP weights."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import build_tiny_clip
from seglabel.models.maskclip import MaskCLIP, resize_pos_embed


def _ln(x, sd, name):
    return F.layer_norm(x, x.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"])


def _mha(x, sd, name, heads):
    """Standard multi-head self-attention written out."""
    b, n, d = x.shape
    q, k, v = (x @ sd[f"{name}.in_proj_weight"].T + sd[f"{name}.in_proj_bias"]).chunk(3, dim=-1)
    split = lambda t: t.view(b, n, heads, d // heads).transpose(1, 2)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    att = (q @ k.transpose(-1, -2) / math.sqrt(d // heads)).softmax(dim=-1)
    y = (att @ v).transpose(1, 2).reshape(b, n, d)
    return y @ sd[f"{name}.out_proj.weight"].T + sd[f"{name}.out_proj.bias"]


def _mlp(x, sd, name):
    h = F.gelu(x @ sd[f"{name}.c_fc.weight"].T + sd[f"{name}.c_fc.bias"])
    return h @ sd[f"{name}.c_proj.weight"].T + sd[f"{name}.c_proj.bias"]


def vit_reference(model, images):
    """The official MaskCLIP ViT path, from the state_dict alone."""
    sd = {k: v.float() for k, v in model.state_dict().items()}
    width = sd["visual.class_embedding"].shape[0]
    p = sd["visual.conv1.weight"].shape[-1]
    heads = width // 16  # head_width of the tiny config
    b, _, h, w = images.shape
    images = F.pad(images, (0, -w % p, 0, -h % p))
    x = F.conv2d(images, sd["visual.conv1.weight"], stride=p)
    gh, gw = x.shape[-2:]
    x = x.flatten(2).transpose(1, 2)
    pos = sd["visual.positional_embedding"]
    g0 = int(math.isqrt(pos.shape[0] - 1))
    grid = pos[1:].reshape(1, g0, g0, width).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False)
    pos = torch.cat([pos[:1], grid.permute(0, 2, 3, 1).reshape(gh * gw, width)])
    x = torch.cat([sd["visual.class_embedding"].expand(b, 1, width), x], dim=1) + pos
    x = _ln(x, sd, "visual.ln_pre")
    layers = len({k.split(".")[3] for k in sd if k.startswith("visual.transformer.resblocks.")})
    for i in range(layers - 1):
        blk = f"visual.transformer.resblocks.{i}"
        x = x + _mha(_ln(x, sd, f"{blk}.ln_1"), sd, f"{blk}.attn", heads)
        x = x + _mlp(_ln(x, sd, f"{blk}.ln_2"), sd, f"{blk}.mlp")
    blk = f"visual.transformer.resblocks.{layers - 1}"
    y = _ln(x, sd, f"{blk}.ln_1")
    _, k, v = (y @ sd[f"{blk}.attn.in_proj_weight"].T + sd[f"{blk}.attn.in_proj_bias"]).chunk(3, dim=-1)
    out_proj = lambda t: t @ sd[f"{blk}.attn.out_proj.weight"].T + sd[f"{blk}.attn.out_proj.bias"]  # noqa: E731
    v1 = x + out_proj(v)
    v2 = v1 + _mlp(_ln(v1, sd, f"{blk}.ln_2"), sd, f"{blk}.mlp")
    feat = (_ln(v2, sd, "visual.ln_post") @ sd["visual.proj"])[:, 1:]
    keys = out_proj(k)[:, 1:]
    to_map = lambda t: t.transpose(1, 2).reshape(b, -1, gh, gw)  # noqa: E731
    return to_map(feat), to_map(keys)


def resnet_reference(model, images):
    """layer4 of the unchanged trunk, then attnpool's v_proj and c_proj as per-pixel matmuls."""
    sd = model.state_dict()
    v = model.visual
    with torch.no_grad():
        x = v.layer4(v.layer3(v.layer2(v.layer1(v.stem(images))))).permute(0, 2, 3, 1)
    vp = x @ sd["visual.attnpool.v_proj.weight"].T + sd["visual.attnpool.v_proj.bias"]
    feat = vp @ sd["visual.attnpool.c_proj.weight"].T + sd["visual.attnpool.c_proj.bias"]
    keys = x @ sd["visual.attnpool.k_proj.weight"].T + sd["visual.attnpool.k_proj.bias"]
    return feat.permute(0, 3, 1, 2), keys.permute(0, 3, 1, 2)


@pytest.mark.parametrize("size", [(32, 32), (40, 56), (37, 50), (64, 24)])
def test_vit_dense_features_match_direct_computation(size):
    model, _ = build_tiny_clip("tiny-vit", seed=1)
    images = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
    feats, keys = MaskCLIP(model).dense_features(images)
    ref_feats, ref_keys = vit_reference(model, images)
    assert feats.shape == (2, 32, math.ceil(size[0] / 8), math.ceil(size[1] / 8))
    torch.testing.assert_close(feats, ref_feats, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(keys, ref_keys, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("size", [(64, 64), (96, 160)])
def test_resnet_dense_features_match_direct_computation(size):
    model, _ = build_tiny_clip("tiny-rn", seed=2)
    images = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(1))
    feats, keys = MaskCLIP(model).dense_features(images)
    ref_feats, ref_keys = resnet_reference(model, images)
    assert feats.shape[-2:] == (size[0] // 32, size[1] // 32)
    torch.testing.assert_close(feats, ref_feats, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(keys, ref_keys, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["tiny-vit", "tiny-rn"])
def test_patch_logits_are_cosines(name):
    model, _ = build_tiny_clip(name)
    mc = MaskCLIP(model)
    images = torch.randn(1, 3, 64, 96)
    text = F.normalize(torch.randn(5, 32), dim=-1)
    logits = mc.patch_logits(images, text)
    feats, _ = mc.dense_features(images)
    expected = torch.einsum("bdhw,kd->bkhw", F.normalize(feats, dim=1), text)
    torch.testing.assert_close(logits, expected)
    assert logits.shape[:2] == (1, 5) and logits.abs().max() <= 1 + 1e-5


def test_pos_embed_kept_at_native_size_and_class_token_never_resized():
    model, _ = build_tiny_clip("tiny-vit", seed=3)
    v = model.visual
    pos = v.positional_embedding
    assert resize_pos_embed(pos, v.grid_size, v.grid_size) is pos
    resized = resize_pos_embed(pos, v.grid_size, (6, 3))
    assert resized.shape == (1 + 18, pos.shape[1])
    torch.testing.assert_close(resized[0], pos[0])


def test_pos_embed_resize_has_no_antialias():
    model, _ = build_tiny_clip("tiny-vit")
    pos = model.visual.positional_embedding.detach()
    down = resize_pos_embed(pos, (4, 4), (2, 2))[1:].reshape(2, 2, -1).permute(2, 0, 1)[None]
    grid = pos[1:].reshape(4, 4, -1).permute(2, 0, 1)[None]
    plain = F.interpolate(grid, size=(2, 2), mode="bicubic", align_corners=False, antialias=False)
    smooth = F.interpolate(grid, size=(2, 2), mode="bicubic", align_corners=False, antialias=True)
    torch.testing.assert_close(down, plain)
    assert not torch.allclose(down, smooth)


def test_unsupported_tower_is_refused():
    class Fake(torch.nn.Module):
        visual = torch.nn.Linear(2, 2)

    with pytest.raises(ValueError, match="ViT and ModifiedResNet"):
        MaskCLIP(Fake())


@pytest.mark.parametrize("name", ["tiny-vit", "tiny-rn"])
def test_trimmed_text_encoder_equals_encode_text(name):
    from seglabel.models.clip import text_encoder

    model, tokenizer = build_tiny_clip(name, seed=4)
    tokens = tokenizer(["a photo of a traffic light.", "sky", "there is the potted plant in the scene."])
    with torch.no_grad():
        torch.testing.assert_close(text_encoder(model)(tokens), model.encode_text(tokens), atol=1e-5, rtol=1e-5)
