"""ProxyCLIP and CorrCLIP through `seglabel annotate`: the weight-free region source (SLIC) end to
end with the CLIP tower as its own second model, resume and the settings check, the one-line
errors for missing and hostile second-model weights, and loading real architectures' files."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import TINY_CONFIGS, write_images
from test_annotate_cli import annotate
from test_hostile_checkpoints import plant

pytest.importorskip("skimage")


def settings(out):
    return json.loads((out / "run.json").read_text())["settings"]


@pytest.mark.slow
def test_corrclip_with_slic_regions_end_to_end(tmp_path, tiny_weights, small_labelset):
    photos = tmp_path / "photos"
    write_images(photos, ["a.png", "b.png"], size=(40, 56))
    write_images(photos, ["c.png"], size=(64, 48), seed=1)
    out = tmp_path / "out"
    flags = ("--method", "corrclip", "--regions", "slic", "--proxy", "clip", "--window", "48", "--window-stride", "24")
    r = annotate([photos], out, small_labelset, tiny_weights, "tiny-vit", *flags, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["labelled"] == 3
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["a.png", "b.png", "c.png"]
    assert settings(out)["method"] == {"method": "corrclip", "tower": "vit", "proxy": "clip", "regions": "slic"}
    r = annotate([photos], out, small_labelset, tiny_weights, "tiny-vit", *flags, "--json")  # resumed: all done
    assert r.returncode == 0 and json.loads(r.stdout)["skipped"] == 3, r.stderr
    r = annotate([photos], out, small_labelset, tiny_weights, "tiny-vit", *flags[:3], "slic:16", *flags[4:])
    assert r.returncode == 2 and "other settings" in r.stderr and r.stderr.count("\n") == 1


def test_proxyclip_with_the_clip_tower_as_proxy_and_paper_protocol(tmp_path, tiny_weights, small_labelset):
    photos = tmp_path / "photos"
    write_images(photos, ["a.png", "b.png"], size=(40, 56))
    out = tmp_path / "out"
    r = annotate([photos], out, small_labelset, tiny_weights, "tiny-vit", "--method", "proxyclip", "--proxy", "clip",
                 "--protocol", "paper", "--short-side", "64")
    assert r.returncode == 0, r.stderr
    s = settings(out)
    assert s["method"] == {"method": "proxyclip", "tower": "vit", "proxy": "clip"}
    assert s["protocol"]["window"] == 336 and s["protocol"]["window_stride"] == 112


BAD = [
    (dict(method="sclip", proxy="clip"), "--proxy applies to --method proxyclip or corrclip"),
    (dict(method="sclip", regions="slic"), "--regions applies to --method proxyclip or corrclip"),
    (dict(method="corrclip", proxy="clip"), "needs --regions"),
    (dict(method="proxyclip", proxy="clip", regions="slic"), "--regions applies to --method corrclip"),
    (dict(method="corrclip", proxy="sam:vitb", regions="slic"), "plain ViT"),
    (dict(method="proxyclip", proxy="dino:vitx"), "unknown --proxy"),
    (dict(method="proxyclip", proxy="clip", proxy_weights="x.pth"), "give no --proxy-weights"),
    (dict(method="corrclip", proxy="clip", regions="slic:x"), "slic:N"),
    (dict(method="corrclip", proxy="clip", regions="watershed"), "sam2:FILE"),
    (dict(method="proxyclip", proxy="clip", key_smoothing=True), "--key-smoothing applies"),
]


@pytest.mark.parametrize("options, message", BAD)
def test_bad_combinations_are_refused(tiny_weights, options, message):
    from seglabel.models.registry import load_segmenter

    with pytest.raises(ValueError, match=message.replace("+", "[+]")):
        load_segmenter("maskclip:tiny-vit", pretrained=str(tiny_weights["tiny-vit"]),
                       model_config=str(TINY_CONFIGS["tiny-vit"]), **options)


def test_a_bad_combination_is_a_one_line_usage_error(tmp_path, tiny_weights, small_labelset):
    photos = tmp_path / "photos"
    write_images(photos, ["a.png"])
    r = annotate([photos], tmp_path / "out", small_labelset, tiny_weights, "tiny-vit", "--regions", "slic")
    assert r.returncode == 2 and "--regions applies to" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert not (tmp_path / "out").exists()


def test_missing_second_model_weights_say_how_to_supply_them(tmp_path, tiny_weights, small_labelset, monkeypatch):
    from seglabel.models.clip import WeightsUnavailable
    from seglabel.models.registry import load_segmenter

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    common = dict(pretrained=str(tiny_weights["tiny-vit"]), model_config=str(TINY_CONFIGS["tiny-vit"]),
                  cache_dir=str(tmp_path / "hf"))
    with pytest.raises(WeightsUnavailable) as e:
        load_segmenter("maskclip:tiny-vit", method="proxyclip", proxy="dinov2:vitb14-reg", **common)
    assert "DINOv2 ViT-B/14 with registers weights are not cached" in str(e.value) and "\n" not in str(e.value)
    assert "--proxy-weights FILE" in str(e.value) and "dinov2_vitb14_reg4_pretrain.pth" in str(e.value)
    with pytest.raises(WeightsUnavailable, match="SAM weights are not cached"):
        load_segmenter("maskclip:tiny-vit", method="corrclip", proxy="clip", regions="sam:vitb", **common)
    from seglabel.checkpoints import CheckpointError

    with pytest.raises(CheckpointError, match="nothing.pt: no such file"):
        load_segmenter("maskclip:tiny-vit", method="corrclip", proxy="clip", regions="sam2:nothing.pt", **common)
    # and through the command line: exit 2, one line
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TORCH_HOME": str(tmp_path / "torch"), "HF_HUB_CACHE": str(tmp_path / "hf")}
    photos = tmp_path / "photos"
    write_images(photos, ["a.png"])
    r = subprocess.run([sys.executable, "-m", "seglabel", "annotate", str(photos), "-l", str(small_labelset),
                        "-o", str(tmp_path / "out"), "--model", "maskclip:tiny-vit",
                        "--model-config", str(TINY_CONFIGS["tiny-vit"]), "--pretrained", str(tiny_weights["tiny-vit"]),
                        "--method", "proxyclip"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "DINO ViT-B/8 weights are not cached" in r.stderr, r.stderr


def test_hostile_second_model_weights_are_refused_and_never_run(tmp_path, tiny_weights, small_labelset):
    from seglabel.checkpoints import CheckpointError
    from seglabel.models.registry import load_segmenter

    marker = tmp_path / "PAYLOAD_RAN"
    evil = plant(tmp_path / "evil.pth", marker)
    with pytest.raises(CheckpointError, match="refused"):
        load_segmenter("maskclip:tiny-vit", pretrained=str(tiny_weights["tiny-vit"]),
                       model_config=str(TINY_CONFIGS["tiny-vit"]), method="corrclip", proxy="clip",
                       regions=f"sam2:{evil}")
    photos = tmp_path / "photos"
    write_images(photos, ["a.png"])
    r = annotate([photos], tmp_path / "out", small_labelset, tiny_weights, "tiny-vit", "--method", "proxyclip",
                 "--proxy", "dino:vitb8", "--proxy-weights", evil)
    assert r.returncode == 2 and "refused" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_real_architectures_load_their_official_and_timm_files(tmp_path):
    """DINO ViT-S/8 from a timm-layout safetensors file, DINOv2 ViT-S/14-reg from the official
    layout (class token's position inside pos_embed, register_tokens, mask_token), wrong files refused."""
    import timm
    from safetensors.torch import save_file

    from seglabel.checkpoints import CheckpointError
    from seglabel.models.vfm import build_vfm

    torch.manual_seed(0)
    dino = timm.create_model("vit_small_patch8_224.dino", pretrained=False, num_classes=0)
    save_file({k: v.contiguous() for k, v in dino.state_dict().items()}, str(tmp_path / "dino.safetensors"))
    vfm = build_vfm("dino:vits8", str(tmp_path / "dino.safetensors"))
    x = torch.randn(1, 3, 224, 224)
    torch.testing.assert_close(vfm.features(x).flatten(2).transpose(1, 2), dino.forward_features(x)[:, 1:],
                               atol=1e-5, rtol=1e-5)
    assert vfm.identity() == {"proxy": "dino:vits8",
                              "proxy_weights": ["dino.safetensors", (tmp_path / "dino.safetensors").stat().st_size]}

    v2 = timm.create_model("vit_small_patch14_reg4_dinov2.lvd142m", pretrained=False, num_classes=0)
    sd = dict(v2.state_dict())
    cls_pos = torch.randn(1, 1, sd["pos_embed"].shape[-1])
    official = {k: v for k, v in sd.items() if k not in ("reg_token", "cls_token", "pos_embed")}
    official.update(register_tokens=sd["reg_token"], cls_token=sd["cls_token"] - cls_pos,
                    pos_embed=torch.cat([cls_pos, sd["pos_embed"]], dim=1), mask_token=torch.zeros(1, sd["cls_token"].shape[-1]))
    torch.save(official, tmp_path / "dinov2_vits14_reg4_pretrain.pth")
    vfm = build_vfm("dinov2:vits14-reg", str(tmp_path / "dinov2_vits14_reg4_pretrain.pth"))
    x = torch.randn(1, 3, 518, 518)
    torch.testing.assert_close(vfm.features(x).flatten(2).transpose(1, 2), v2.forward_features(x)[:, 5:],
                               atol=1e-4, rtol=1e-4)
    with pytest.raises(CheckpointError, match="does not fit DINO ViT-B/8"):
        build_vfm("dino:vitb8", str(tmp_path / "dino.safetensors"))
