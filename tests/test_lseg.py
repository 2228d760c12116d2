"""LSeg: the official layout (full size, meta device), loading of Lightning checkpoints, the pieces
of the forward pass against direct computations, the multi-scale protocol, and the CLI."""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import write_images
from seglabel.checkpoints import CheckpointError
from seglabel.labelset import LabelSet
from seglabel.models.lseg import build_lseg, load_lseg_net, read_checkpoint
from seglabel.models.lseg_net import LOGIT_SCALE, build_lseg_net
from seglabel.tta import multiscale_logits

OFFICIAL = Path(__file__).parent / "data" / "lseg_official_keys.json"
SMALL_TEXT = dict(width=64, layers=2, output_dim=32)
SMALL = {
    "vit": dict(vit_dim=64, vit_depth=4, vit_grid=4, vit_classes=10, reassemble=(16, 32, 64, 64),
                features=16, out_dim=32, text=SMALL_TEXT),
    "resnet": dict(resnet_layers=(1, 1, 2, 1), resnet_width=8, features=16, out_dim=32, text=SMALL_TEXT),
}


def small_net(variant: str, seed: int = 0):
    torch.manual_seed(seed)
    net = build_lseg_net(variant, device="cpu", **SMALL[variant])
    for m in net.modules():  # random batch-norm statistics exercise more than (0, 1)
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return net.eval()


def lightning_checkpoint(net, **extra):
    """A dict laid out as a PyTorch-Lightning .ckpt of the official LSeg module, CLIP image tower
    (partly fp16, as clip.load on CUDA leaves it) included."""
    sd = {f"net.{k}": v.clone() for k, v in net.state_dict().items()}
    for k in list(sd):
        if k.startswith("net.clip_pretrained.transformer."):
            sd[k] = sd[k].half()
    sd["net.clip_pretrained.logit_scale"] = torch.tensor(math.log(100.0))
    sd["net.clip_pretrained.visual.proj"] = torch.randn(48, 32).half()
    sd["net.clip_pretrained.visual.conv1.weight"] = torch.randn(48, 3, 32, 32).half()
    return {"epoch": 199, "global_step": 12345, "pytorch-lightning_version": "1.3.5", "state_dict": sd,
            "callbacks": {}, "optimizer_states": [{"state": {}, "param_groups": [{"lr": 0.004, "params": [0]}]}],
            "lr_schedulers": [{"last_epoch": 200, "base_lrs": [0.004]}], **extra}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lseg")
    out = {}
    for variant in SMALL:
        net = small_net(variant)
        out[variant] = (folder / f"{variant}.ckpt", net)
        torch.save(lightning_checkpoint(net), out[variant][0])
    return out


# -- the official layout ----------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["vit", "resnet"])
def test_full_size_layout_equals_the_official_keys(variant):
    official = json.loads(OFFICIAL.read_text())
    vit = official["LSegNet_clip_vitl16_384_arch0"]
    clip = {k: v for k, v in vit.items() if k.startswith("net.clip_pretrained.")}
    assert len(clip) == 302  # the json's _meta: the ResNet section lists the non-CLIP keys only
    expected = vit if variant == "vit" else {**official["LSegRNNetZS_clip_resnet101_non_clip_keys"], **clip}
    # The CLIP image tower and CLIP's logit scale are stored but unused: the only keys not built.
    dropped = {k for k in expected if k.startswith(("net.clip_pretrained.visual.", "net.clip_pretrained.logit_scale"))}
    assert len(dropped) == 153
    net = build_lseg_net(variant, device="meta")
    got = {f"net.{k}": list(v.shape) for k, v in net.state_dict().items()}
    assert got == {k: v["shape"] for k, v in expected.items() if k not in dropped}
    assert all(p.is_meta for p in net.parameters())


def test_full_size_mean_std_per_variant():
    assert build_lseg_net("vit").cfg.mean == (0.5, 0.5, 0.5)
    assert build_lseg_net("resnet").cfg.std == (0.229, 0.224, 0.225)


# -- loading --------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["vit", "resnet"])
def test_checkpoint_loads_and_reproduces_the_network(ckpts, variant):
    path, net = ckpts[variant]
    model = build_lseg(str(path))
    assert model.net.cfg == net.cfg  # sizes and depths read from the shapes
    assert model.weights_info["epoch"] == 199 and model.weights_info["weights_file"] == str(path)
    assert model.pad_to == 32 and model.stride == 2 and model.mean == net.cfg.mean
    assert not any(k.startswith("clip_pretrained.visual") for k in model.net.state_dict())
    x = torch.randn(1, 3, 64, 96)
    torch.testing.assert_close(model.net(x), net(x), rtol=0, atol=0)
    tokens = torch.randint(1, 1000, (2, 77))
    # text weights went through fp16 in the file, so compare with the fp16-rounded original
    ref = build_lseg_net(variant, device="cpu", **SMALL[variant])
    ref.load_state_dict({k: v.half().float() if k.startswith("clip_pretrained.transformer.") else v
                         for k, v in net.state_dict().items()})
    torch.testing.assert_close(model.net.encode_text(tokens), ref.encode_text(tokens))


def test_parameters_are_the_mapped_tensors_not_copies(ckpts, monkeypatch):
    import seglabel.models.lseg as lseg

    seen = {}

    def spy(path):
        seen["sd"], info = read_checkpoint(path)
        return seen["sd"], info

    monkeypatch.setattr(lseg, "read_checkpoint", spy)
    net, _ = load_lseg_net(ckpts["vit"][0])
    assert not any(k.startswith("clip_pretrained.visual") for k in seen["sd"])
    # fp32 weights are used in place (memory-mapped from the file), so loading does not copy them
    for key in ("pretrained.model.blocks.0.attn.qkv.weight", "scratch.head1.weight"):
        assert dict(net.named_parameters())[key].data_ptr() == seen["sd"][key].data_ptr()


def test_labels_through_the_predictor(ckpts):
    from seglabel.predict import Predictor, Protocol

    model = build_lseg(str(ckpts["vit"][0]))
    labels = LabelSet.from_names(["sky", "road", "car"], catch_all="other")
    model.set_labels(labels)
    rgb = np.random.default_rng(0).integers(0, 256, (45, 70, 3), dtype=np.uint8)
    [pred] = Predictor(model, Protocol(short_side=64)).predict([rgb])
    assert pred.labels.shape == (45, 70) and pred.labels.max() < 4 and (pred.confidence > 0).all()


def test_mismatched_keys_are_named(tmp_path, ckpts):
    _, net = ckpts["vit"]
    ckpt = lightning_checkpoint(net)
    del ckpt["state_dict"]["net.scratch.refinenet2.out_conv.bias"]
    ckpt["state_dict"]["net.scratch.extra.weight"] = torch.zeros(1)
    path = tmp_path / "bad.ckpt"
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError) as e:
        build_lseg(str(path))
    msg = str(e.value)
    assert str(path) in msg and "\n" not in msg
    assert "1 missing keys (net.scratch.refinenet2.out_conv.bias)" in msg
    assert "1 unexpected keys (net.scratch.extra.weight)" in msg


def test_not_an_lseg_file(tmp_path):
    path = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"net.foo.weight": torch.zeros(2)}}, path)
    with pytest.raises(CheckpointError, match="not an LSeg checkpoint"):
        build_lseg(str(path))
    torch.save({k: v for k, v in lightning_checkpoint(small_net("resnet"))["state_dict"].items()}, path)
    assert build_lseg(str(path)).net.cfg.backbone == "resnet"  # a bare state_dict (official --export) loads too
    torch.save({"epoch": 1}, path)
    with pytest.raises(CheckpointError, match="no 'state_dict'"):
        build_lseg(str(path))


class _Evil:
    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (Path.touch, (Path(self.target),))


def test_code_in_a_checkpoint_is_refused_and_never_runs(tmp_path, ckpts):
    _, net = ckpts["vit"]
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save(lightning_checkpoint(net, hyper_parameters={"x": _Evil(str(marker))}), path)
    assert not marker.exists()
    with pytest.raises(CheckpointError) as e:
        build_lseg(str(path))
    assert "refused" in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value)
    assert "pathlib" in str(e.value)  # names what it would have run
    assert not marker.exists()


def test_plain_lightning_entries_are_allowed(tmp_path, ckpts, monkeypatch):
    """Old Lightning keys callback states by the callback class and keeps hparams in an
    AttributeDict; both are read without Lightning installed and without running anything."""
    mods = {}
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint",
                 "pytorch_lightning.utilities", "pytorch_lightning.utilities.parsing"):
        mods[name] = types.ModuleType(name)
        monkeypatch.setitem(sys.modules, name, mods[name])
    ModelCheckpoint = type("ModelCheckpoint", (), {"__module__": "pytorch_lightning.callbacks.model_checkpoint"})
    AttributeDict = type("AttributeDict", (dict,), {"__module__": "pytorch_lightning.utilities.parsing"})
    mods["pytorch_lightning.callbacks.model_checkpoint"].ModelCheckpoint = ModelCheckpoint
    mods["pytorch_lightning.utilities.parsing"].AttributeDict = AttributeDict
    _, net = ckpts["vit"]
    hp = AttributeDict(backbone="clip_vitl16_384", args=argparse.Namespace(lr=0.004, widehead=True))
    path = tmp_path / "pl.ckpt"
    torch.save(lightning_checkpoint(net, hyper_parameters=hp,
                                    callbacks={ModelCheckpoint: {"best_model_score": torch.tensor(0.5)}}), path)
    for name in mods:  # the loader must not need Lightning
        monkeypatch.delitem(sys.modules, name)
    model = build_lseg(str(path))
    assert model.weights_info["global_step"] == 12345


def test_arch_option_heads_are_refused_clearly(tmp_path, ckpts):
    _, net = ckpts["vit"]
    ckpt = lightning_checkpoint(net)
    ckpt["state_dict"]["net.scratch.head_block.depthwise.depthwise.weight"] = torch.zeros(1, 1, 3, 3)
    path = tmp_path / "arch1.ckpt"
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match="arch_option"):
        build_lseg(str(path))


# -- pieces of the forward pass against direct computations --------------------------------------------
def test_readout_project_is_linear_on_token_and_class_token():
    net = small_net("vit")
    ro = net.pretrained.act_postprocess1._modules["0"]
    tokens = torch.randn(2, 1 + 6, 64)
    lin = ro.project[0]
    direct = []
    for b in range(2):
        rows = [torch.cat([tokens[b, 1 + i], tokens[b, 0]]) for i in range(6)]
        pre = torch.stack(rows) @ lin.weight.T + lin.bias
        direct.append(0.5 * pre * (1 + torch.erf(pre / math.sqrt(2))))  # exact GELU
    torch.testing.assert_close(ro(tokens), torch.stack(direct))


@pytest.mark.parametrize("grid", [(4, 4), (3, 5), (7, 2)])
def test_pos_embed_resize_equals_timm(grid):
    from timm.layers import resample_abs_pos_embed

    net = small_net("vit")
    pos = net.pretrained.model.pos_embed
    ref = resample_abs_pos_embed(pos, list(grid), old_size=[4, 4], num_prefix_tokens=1,
                                 interpolation="bilinear", antialias=False)
    torch.testing.assert_close(net.pretrained.pos_embed(grid), ref)


def test_vit_taps_blocks_before_the_final_norm():
    net = small_net("vit")
    vit = net.pretrained.model
    x = torch.randn(1, 3, 64, 48)
    taken = []
    hooks = [vit.blocks[i].register_forward_hook(lambda m, i, o: taken.append(o)) for i in range(4)]
    feats = net.pretrained(x)
    [h.remove() for h in hooks]
    assert [f.shape[-2:] for f in feats] == [(16, 12), (8, 6), (4, 3), (2, 2)]
    # act_postprocess3 is readout + 1x1 conv of the third tapped block
    conv = net.pretrained.act_postprocess3._modules["3"]
    ro = net.pretrained.act_postprocess3._modules["0"]
    direct = F.conv2d(ro(taken[2]).transpose(1, 2).reshape(1, 64, 4, 3), conv.weight, conv.bias)
    torch.testing.assert_close(feats[2], direct)


def test_residual_unit_and_fusion_block():
    net = small_net("vit")
    block = net.scratch.refinenet2
    x, skip = torch.randn(1, 16, 5, 7), torch.randn(1, 16, 5, 7)

    def bn(t, m):
        return (t - m.running_mean[:, None, None]) / torch.sqrt(m.running_var[:, None, None] + m.eps) \
            * m.weight[:, None, None] + m.bias[:, None, None]

    def rcu(t, u):
        out = bn(F.conv2d(t.clamp_min(0), u.conv1.weight, padding=1), u.bn1)
        return bn(F.conv2d(out.clamp_min(0), u.conv2.weight, padding=1), u.bn2) + t

    torch.testing.assert_close(block.resConfUnit1(skip), rcu(skip, block.resConfUnit1))
    fused = rcu(x + rcu(skip, block.resConfUnit1), block.resConfUnit2)
    # bilinear x2 with align_corners=True: output i samples input i * (n - 1) / (2n - 1)
    def up_matrix(n):
        m = torch.zeros(2 * n, n)
        for i in range(2 * n):
            s = i * (n - 1) / (2 * n - 1)
            i0 = min(int(math.floor(s)), n - 1)
            i1 = min(i0 + 1, n - 1)
            m[i, i0] += 1 - (s - i0)
            m[i, i1] += s - i0
        return m
    up = torch.einsum("yh,bchw,xw->bcyx", up_matrix(5), fused, up_matrix(7))
    direct = F.conv2d(up, block.out_conv.weight, block.out_conv.bias)
    torch.testing.assert_close(block(x, skip), direct)


def test_logits_are_fixed_scale_cosines_max_over_prompts(ckpts):
    from open_clip.tokenizer import SimpleTokenizer

    model = build_lseg(str(ckpts["vit"][0]))
    labels = LabelSet.from_names([{"name": "road", "prompts": ["road", "street"]}, "sky"])
    model.set_labels(labels)
    x = torch.randn(1, 3, 64, 64)
    feats = model.net(x)[0]  # (D, 32, 32)
    texts = model.net.encode_text(SimpleTokenizer()(["road", "street", "sky"]))  # raw strings, no template
    cos = torch.einsum("dhw,kd->khw", feats / feats.norm(dim=0), texts / texts.norm(dim=1, keepdim=True))
    direct = torch.stack([torch.maximum(cos[0], cos[1]), cos[2]]) / 0.07
    assert LOGIT_SCALE == pytest.approx(14.2857, abs=1e-4)
    torch.testing.assert_close(model(x)[0], direct, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(model.upsample_logits(model(x)),
                               F.interpolate(model(x), size=(64, 64), mode="bilinear", align_corners=True))


class _CudaLooking(torch.Tensor):
    """A CPU tensor that says it is on CUDA: what LSeg decides from the device can be seen here."""

    @property
    def device(self):
        return torch.device("cuda")


def test_lseg_opens_no_autocast_of_its_own(ckpts, monkeypatch):
    """`--precision fp32` (annotate's default) must mean fp32 on CUDA too: LSeg used to open an fp16
    autocast region itself on any CUDA input."""
    model = build_lseg(str(ckpts["vit"][0]))
    model.set_labels(LabelSet.from_names(["a", "b"]))
    opened = []
    real = torch.autocast

    def spy(*args, **kwargs):
        if kwargs.get("enabled", True):  # regions that turn autocast off are fine
            opened.append((args, kwargs))
        return real("cpu", enabled=False)

    monkeypatch.setattr(torch, "autocast", spy)
    feats = torch.randn(1, 32, 32, 32)
    monkeypatch.setattr(model.net, "forward", lambda x: feats)
    x = torch.randn(1, 3, 64, 64).as_subclass(_CudaLooking)
    assert x.device.type == "cuda"
    out = model(x)
    assert opened == [] and out.dtype == torch.float32 and out.shape == (1, 2, 32, 32)
    assert "precision" not in model.describe()


def test_lseg_runs_in_the_callers_precision(ckpts):
    model = build_lseg(str(ckpts["vit"][0]))
    model.set_labels(LabelSet.from_names(["a", "b"]))
    seen = []
    model.net.scratch.head1.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    x = torch.randn(1, 3, 64, 64)
    plain = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what annotate does for --precision bf16
        half = model(x)
    assert seen == [torch.float32, torch.bfloat16]
    assert plain.dtype == half.dtype == torch.float32
    assert (plain.argmax(1) == half.argmax(1)).float().mean() > 0.9


def test_half_precision_overflow_is_recomputed_in_fp32(ckpts, monkeypatch, caplog):
    model = build_lseg(str(ckpts["vit"][0]))
    model.set_labels(LabelSet.from_names(["a", "b"]))
    x = torch.randn(1, 3, 64, 64)
    expected = model(x)
    real = model.net.forward

    def overflowing(images):
        out = real(images)
        return out.masked_fill(torch.zeros_like(out, dtype=torch.bool).index_fill_(1, torch.tensor([0]), True),
                               float("inf")) if torch.is_autocast_enabled("cpu") else out

    monkeypatch.setattr(model.net, "forward", overflowing)
    with torch.autocast("cpu", dtype=torch.bfloat16), caplog.at_level(logging.WARNING, logger="seglabel"):
        out = model(x)
    torch.testing.assert_close(out, expected)
    assert [r.getMessage() for r in caplog.records] == ["LSeg: half precision overflowed on this input; "
                                                        "recomputed in fp32"]


# -- the multi-scale protocol ---------------------------------------------------------------------------
class Identity(torch.nn.Module):
    """A 'segmenter' whose logits are its input channels at full resolution; records its inputs."""

    mean, std, stride, pad_to = (0.2, 0.4, 0.6), (0.5, 0.25, 0.5), 1, 8

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append(x.clone())
        return x


@pytest.mark.parametrize("size", [(20, 30), (50, 70), (70, 40)])
def test_multiscale_equals_direct_sum_over_scales(size):
    seg = Identity()
    img = torch.randn(3, *size)
    scales, base, crop, stride = (0.5, 1.0, 1.5), 40, 32, 20
    out = multiscale_logits(seg, img, scales=scales, base_size=base, crop=crop, stride=stride)
    h, w = size
    direct = 0
    for s in scales:  # windows average to the image itself; flip adds it once more
        long = math.ceil(base * s)
        hw = (long, int(w * long / h + 0.5)) if h > w else (int(h * long / w + 0.5), long)
        small = F.interpolate(img[None], size=hw, mode="bilinear", align_corners=True)
        direct = direct + 2 * F.interpolate(small, size=size, mode="bilinear", align_corners=True)
    torch.testing.assert_close(out, direct[0])
    assert all(x.shape[-2:] == (crop, crop) for x in seg.seen)  # every pass is one padded crop
    assert len(seg.seen) > len(scales)  # the larger scales were windowed


def test_multiscale_pads_with_black_and_checks_crop():
    seg = Identity()
    multiscale_logits(seg, torch.randn(3, 10, 20), scales=(1.0,), base_size=20, crop=32, flip=False)
    [x] = seg.seen
    black = -torch.tensor(seg.mean) / torch.tensor(seg.std)
    torch.testing.assert_close(x[0, :, 10:, :], black[:, None, None].expand(3, 22, 32))
    with pytest.raises(ValueError, match="multiple of 8"):
        multiscale_logits(seg, torch.randn(3, 10, 20), crop=30)


def test_multiscale_with_lseg(ckpts):
    model = build_lseg(str(ckpts["resnet"][0]))
    model.set_labels(LabelSet.from_names(["a", "b"]))
    out = multiscale_logits(model, torch.randn(3, 40, 60), scales=(0.5, 1.0), base_size=64, crop=64, stride=32)
    assert out.shape == (2, 40, 60) and torch.isfinite(out).all()


# -- the default: the official single-scale evaluation (issue 15, item 20) ------------------------------
def official_single_scale(net, text: torch.Tensor, rgb: np.ndarray, base_size: int = 520,
                          crop_size: int = 480) -> torch.Tensor:
    """Class scores (K, H, W) of an RGB photo as lang-seg's evaluation computes them with scales [1.0]
    and no flip, restated step by step from its MultiEvalModule (resize_image, pad_image, the grid
    of crops, crop_image) and LSeg.forward (normalised features, 1/0.07 * dot product with the
    normalised text features, output_conv: bilinear x2, align_corners=True). ``text``: the text
    features (K, D) of the labels (encode_text of the raw label strings, checked above)."""
    mean, std = net.cfg.mean, net.cfg.std
    image = (torch.from_numpy(rgb).permute(2, 0, 1).float() / 255 - torch.tensor(mean)[:, None, None]) \
        / torch.tensor(std)[:, None, None]  # ToTensor, Normalize
    image = image[None]
    text = text / text.norm(dim=-1, keepdim=True)

    def evaluate(x):  # LSeg.forward
        feats = net(x)
        b, c, fh, fw = feats.shape
        feats = feats.permute(0, 2, 3, 1).reshape(-1, c)
        feats = feats / feats.norm(dim=-1, keepdim=True)
        logits = (1 / 0.07) * feats @ text.t()
        out = logits.view(b, fh, fw, -1).permute(0, 3, 1, 2)
        return F.interpolate(out, scale_factor=2, mode="bilinear", align_corners=True)

    def pad_image(img):  # per channel, with the normalised value of black
        _, _, ih, iw = img.shape
        padh, padw = max(crop_size - ih, 0), max(crop_size - iw, 0)
        return torch.stack([F.pad(img[:, i], (0, padw, 0, padh), value=-mean[i] / std[i]) for i in range(3)], 1)

    _, _, h, w = image.shape
    stride = int(crop_size * 2.0 / 3.0)
    long_size = int(math.ceil(base_size * 1.0))
    if h > w:
        height, width = long_size, int(1.0 * w * long_size / h + 0.5)
        short_size = width
    else:
        width, height = long_size, int(1.0 * h * long_size / w + 0.5)
        short_size = height
    cur_img = F.interpolate(image, (height, width), mode="bilinear", align_corners=True)
    if long_size <= crop_size:
        outputs = evaluate(pad_image(cur_img))[:, :, :height, :width]
    else:
        pad_img = pad_image(cur_img) if short_size < crop_size else cur_img
        _, _, ph, pw = pad_img.shape
        h_grids = int(math.ceil(1.0 * (ph - crop_size) / stride)) + 1
        w_grids = int(math.ceil(1.0 * (pw - crop_size) / stride)) + 1
        outputs = torch.zeros(1, len(text), ph, pw)
        count_norm = torch.zeros(1, 1, ph, pw)
        for idh in range(h_grids):
            for idw in range(w_grids):
                h0, w0 = idh * stride, idw * stride
                h1, w1 = min(h0 + crop_size, ph), min(w0 + crop_size, pw)
                output = evaluate(pad_image(pad_img[:, :, h0:h1, w0:w1]))
                outputs[:, :, h0:h1, w0:w1] += output[:, :, 0:h1 - h0, 0:w1 - w0]
                count_norm[:, :, h0:h1, w0:w1] += 1
        assert (count_norm > 0).all()
        outputs = (outputs / count_norm)[:, :, :height, :width]
    return F.interpolate(outputs, (h, w), mode="bilinear", align_corners=True)[0]


def varied_text(net, rgb: np.ndarray) -> torch.Tensor:
    """Six text embeddings that split this photo into regions. Random weights map every pixel to
    nearly the same direction, so encoded label strings give one label everywhere, which no protocol
    difference could change. These point along the main directions (both signs) in which the
    photo's pixel embeddings vary, orthogonal to their mean, so each pixel's label depends on its
    own embedding."""
    with torch.no_grad():
        x = (torch.from_numpy(rgb).permute(2, 0, 1).float() / 255 - 0.5) / 0.5
        g = F.normalize(net(F.interpolate(x[None], size=(384, 512), mode="bilinear", align_corners=True)), dim=1)
    g = g[0].flatten(1)
    mean = F.normalize(g.mean(1), dim=0)
    d = g - g.mean(1, keepdim=True)
    u = torch.linalg.svd(d - mean[:, None] * (mean @ d), full_matrices=False).U[:, :3].T
    u = F.normalize(u - (u @ mean)[:, None] * mean, dim=1)
    return torch.cat([u, -u])


# photos smaller than the crop: wider than tall (two windows across), taller than wide, square (two
# by two windows); one wider than 910 px (the multi-scale path sums at most at 910 px, this one not)
PARITY_SIZES = {"vit": [(192, 256), (256, 192), (192, 192), (300, 1000)], "resnet": [(192, 256)]}


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["vit", "resnet"])
def test_default_protocol_is_the_official_single_scale_evaluation(ckpts, variant):
    from seglabel.predict import Predictor, resolve_protocol

    model = build_lseg(str(ckpts[variant][0]))
    model.set_labels(LabelSet.from_names(["a", "b", "c", "d", "e", "f"]))
    predictor = Predictor(model, resolve_protocol(model))  # what annotate runs when no protocol flag is given
    assert (predictor.protocol.tta, predictor.protocol.scales, predictor.protocol.flip) == (True, (1.0,), False)
    rng = np.random.default_rng(1)
    for h, w in PARITY_SIZES[variant]:
        rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        rgb[: h // 3] //= 3  # some structure: a dark band
        model.text_embeddings = varied_text(model.net, rgb)
        [pred] = predictor.predict([rgb])
        with torch.no_grad():
            scores = official_single_scale(model.net, model.text_embeddings, rgb)
        official = scores.argmax(0).numpy()
        assert (np.bincount(official.ravel()) > 0.01 * official.size).sum() >= 3  # labels a protocol can change
        top2 = scores.topk(2, dim=0).values
        clear = (top2[0] - top2[1] > 1e-4).numpy()  # pixels whose argmax float rounding cannot flip
        assert clear.mean() > 0.98
        np.testing.assert_array_equal(pred.labels[clear], official[clear])
        np.testing.assert_allclose(pred.confidence, scores.softmax(0).max(0).values.numpy(), atol=1e-4)


def test_protocol_flags_still_choose_seglabels_own_protocols(ckpts):
    from seglabel.predict import Protocol, ProtocolOptions, resolve_protocol

    model = build_lseg(str(ckpts["vit"][0]))
    official = resolve_protocol(model)
    assert (official.tta, official.scales, official.flip) == (True, (1.0,), False)
    capped = resolve_protocol(model, ProtocolOptions(max_long_side=0))  # the cap is still the user's
    assert (capped.tta, capped.scales, capped.max_long_side) == (True, (1.0,), 0)
    for given in ({"short_side": 300}, {"short_side": 512}, {"window": 64}, {"pamr": True}, {"tta": True}):
        assert resolve_protocol(model, ProtocolOptions(**given)) == Protocol(**given)  # 512 given is given
    assert resolve_protocol(Identity()) == Protocol()  # models without one keep the default
    paper = resolve_protocol(model, ProtocolOptions(paper=True))  # a model's own protocol is its paper's
    assert paper == official


def test_annotate_records_the_protocol_it_ran_and_resumes(ckpts, tmp_path):
    from seglabel.annotate import AnnotateConfig, annotate
    from seglabel.images import find_images
    from seglabel.predict import resolve_protocol

    model = build_lseg(str(ckpts["resnet"][0]))
    labelset = LabelSet.from_names(["sky", "road"])
    model.set_labels(labelset)
    write_images(tmp_path / "photos", ["a.png"], size=(60, 90))
    out = tmp_path / "out"
    items = find_images([tmp_path / "photos"]).items
    official = AnnotateConfig(out=out, protocol=resolve_protocol(model))
    summary = annotate(items, model, labelset, official, argv=[])
    assert summary.labelled == 1 and not summary.failures
    protocol = json.loads((out / "run.json").read_text())["settings"]["protocol"]
    assert (protocol["tta"], protocol["scales"], protocol["flip"]) == (True, [1.0], False)
    # the same command again resumes: the stored settings (JSON lists) equal the new ones (tuples)
    again = annotate(items, model, labelset, official, argv=[])
    assert (again.labelled, again.skipped) == (0, 1)
    # annotate() runs the protocol it is given, as it is: here seglabel's own
    plain = annotate(items, model, labelset, AnnotateConfig(out=tmp_path / "plain"), argv=[])
    assert plain.labelled == 1
    protocol = json.loads((tmp_path / "plain" / "run.json").read_text())["settings"]["protocol"]
    assert (protocol["tta"], protocol["short_side"]) == (False, 512)


# -- the command line -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_cli_end_to_end(tmp_path, ckpts):
    photos = tmp_path / "photos"
    write_images(photos, ["a.jpg", "b.png"], size=(45, 70))
    labels = tmp_path / "l.yaml"
    labels.write_text("name: t\nclasses: [sky, road, car]\ncatch_all: other\n")
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "seglabel", "annotate", str(photos), "--labels", str(labels),
                        "--model", f"lseg:{ckpts['vit'][0]}", "--out", str(out), "--short-side", "64", "--json"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["labelled"] == 2
    from PIL import Image

    for name in ("a", "b"):
        mask = np.asarray(Image.open(out / "masks" / f"{name}.png"))
        assert mask.shape == (45, 70) and mask.max() < 4
    coco = json.loads((out / "coco.json").read_text())
    assert [c["name"] for c in coco["categories"]] == ["sky", "road", "car", "other"]
    record = json.loads((out / "run.json").read_text())
    assert record["model"] == f"lseg:{ckpts['vit'][0]}"
