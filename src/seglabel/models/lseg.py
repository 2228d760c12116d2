"""LSeg checkpoints as segmenters: ``--model lseg:demo_e200.ckpt``.

A released checkpoint is a PyTorch-Lightning file: the weights under ``state_dict`` with a ``net.``
prefix, the CLIP ViT-B/32 (both towers) stored inside. Loading never runs code from the file
(``weights_only=True`` with only the plain types of a Lightning checkpoint allowed), needs no
network, drops the CLIP image tower, and memory-maps the file: the network is built on the meta
device and its parameters are the mapped tensors themselves (no copy), so peak memory stays near
the size of the used weights rather than twice the file.
"""
from __future__ import annotations

import argparse
import re
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..checkpoints import CheckpointError, load_weights, pickle_globals
from ..labelset import LabelSet
from ..text import cached_text_embeddings, class_max, encode_prompts, indistinct_warnings
from .base import Segmenter
from .lseg_net import LOGIT_SCALE, LSegConfig, LSegNet, build_lseg_net

# Keys of the stored CLIP that LSeg does not use: the image tower and CLIP's own temperature.
_UNUSED = ("clip_pretrained.visual.", "clip_pretrained.logit_scale")


class _LightningStub:
    """Stands in for Lightning classes that a checkpoint names (e.g. callback types used as dict
    keys); it has no behaviour, so allowing it cannot run anything."""


# Plain types a Lightning checkpoint may name besides tensors. AttributeDict is a dict subclass
# pickled as "new object + dict items", so plain ``dict`` can stand in for it.
_LIGHTNING_NAMES = [
    f"{pkg}.{name}" for pkg in ("pytorch_lightning", "lightning.pytorch") for name in (
        "callbacks.model_checkpoint.ModelCheckpoint", "callbacks.early_stopping.EarlyStopping",
        "callbacks.lr_monitor.LearningRateMonitor", "callbacks.progress.ProgressBar",
        "callbacks.progress.tqdm_progress.TQDMProgressBar")]
_DICT_NAMES = ["pytorch_lightning.utilities.parsing.AttributeDict",
               "lightning.pytorch.utilities.parsing.AttributeDict",
               "lightning.fabric.utilities.data.AttributeDict"]
SAFE_GLOBALS: list[Any] = ([argparse.Namespace] + [(_LightningStub, n) for n in _LIGHTNING_NAMES]
                           + [(dict, n) for n in _DICT_NAMES])


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The network's tensors (``net.`` removed, unused CLIP parts dropped) and a few facts about
    the file (epoch, global_step). Tensors stay memory-mapped."""
    try:
        ckpt = load_weights(path, extra_safe_globals=SAFE_GLOBALS)
    except CheckpointError as e:
        if "refused" not in str(e):
            raise
        names = ", ".join(_foreign_globals(path)[:3]) or "objects other than tensors and plain data"
        raise CheckpointError(
            f"{path}: refused: it names {names}, which could run code when loaded; an LSeg checkpoint "
            "needs only tensors and the plain entries of a Lightning checkpoint") from None
    sd = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    if sd is None and isinstance(ckpt, dict) and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        sd, ckpt = ckpt, {}  # a bare state_dict, as the official test script's --export writes
    if not isinstance(sd, dict) or not sd:
        raise CheckpointError(f"{path}: not an LSeg checkpoint (no 'state_dict' entry)")
    out = {}
    for key, value in sd.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: state_dict entry '{key}' is not a tensor")
        name = key.removeprefix("net.")
        if not name.startswith(_UNUSED):
            out[name] = value
    info = {k: ckpt[k] for k in ("epoch", "global_step") if isinstance(ckpt.get(k), int)}
    return out, info


def _foreign_globals(path: str | Path) -> list[str]:
    """Names a torch.save archive's pickle imports beyond torch, collections and the allowed
    Lightning names; read with pickletools, which lists opcodes without executing any."""
    allowed = {"argparse.Namespace", *_LIGHTNING_NAMES, *_DICT_NAMES}
    return [n for n in pickle_globals(path) if not n.startswith(("torch.", "collections.")) and n not in allowed]


def config_from_state_dict(sd: dict[str, torch.Tensor], path: str | Path = "<checkpoint>") -> LSegConfig:
    """Sizes of the network read from the shapes (and block counts from the key indices)."""
    def shape(key: str) -> tuple[int, ...]:
        if key not in sd:
            raise CheckpointError(f"{path}: not an LSeg checkpoint: missing key net.{key}")
        return tuple(sd[key].shape)

    def count(prefix: str) -> int:
        idx = {int(m.group(1)) for k in sd if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
        return max(idx) + 1 if idx else 0

    if any(k.startswith("scratch.head_block.") for k in sd):
        raise CheckpointError(f"{path}: LSeg arch_option 1/2 (scratch.head_block) is not supported; "
                              "the released checkpoints use arch_option 0")
    text = dict(width=shape("clip_pretrained.token_embedding.weight")[1],
                vocab_size=shape("clip_pretrained.token_embedding.weight")[0],
                context_length=shape("clip_pretrained.positional_embedding")[0],
                output_dim=shape("clip_pretrained.text_projection")[1],
                layers=count("clip_pretrained.transformer.resblocks."))
    common = dict(features=shape("scratch.head1.weight")[1], out_dim=shape("scratch.head1.weight")[0], text=text)
    if "pretrained.model.patch_embed.proj.weight" in sd:
        pos = shape("pretrained.model.pos_embed")[1] - 1
        return LSegConfig(
            backbone="vit", vit_dim=shape("pretrained.model.patch_embed.proj.weight")[0],
            vit_depth=count("pretrained.model.blocks."), vit_grid=int(round(pos ** 0.5)),
            vit_classes=shape("pretrained.model.head.weight")[0],
            reassemble=tuple(shape(f"pretrained.act_postprocess{i}.3.weight")[0] for i in range(1, 5)),
            **common)
    if "pretrained.layer1.0.weight" in sd:
        return LSegConfig(
            backbone="resnet", resnet_width=shape("pretrained.layer1.4.0.conv1.weight")[0],
            resnet_layers=(count("pretrained.layer1.4."), count("pretrained.layer2."),
                           count("pretrained.layer3."), count("pretrained.layer4.")),
            **common)
    raise CheckpointError(f"{path}: not an LSeg checkpoint: neither a ViT (net.pretrained.model.*) "
                          "nor a ResNet (net.pretrained.layer1.*) backbone")


def load_lseg_net(path: str | Path) -> tuple[LSegNet, dict[str, Any]]:
    """The checkpoint's network in fp32 on the CPU, loaded strictly; and facts about the file."""
    sd, info = read_checkpoint(path)
    cfg = config_from_state_dict(sd, path)
    net = build_lseg_net(cfg.backbone, device="meta", **{k: v for k, v in vars(cfg).items() if k != "backbone"})
    expected = net.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        parts = [f"{len(ks)} {what} (net.{', net.'.join(ks[:3])}{', ...' if len(ks) > 3 else ''})"
                 for what, ks in (("missing keys", missing), ("unexpected keys", unexpected)) if ks]
        raise CheckpointError(f"{path}: does not match the LSeg {cfg.backbone} layout: " + "; ".join(parts))
    for k, v in expected.items():
        if tuple(v.shape) != tuple(sd[k].shape):
            raise CheckpointError(f"{path}: net.{k} has shape {tuple(sd[k].shape)}, "
                                  f"the layout read from the file needs {tuple(v.shape)}")
    # assign=True: the parameters become the memory-mapped tensors instead of copies of them.
    net.load_state_dict(sd, strict=True, assign=True)
    text = net.clip_pretrained
    text.attn_mask = text.build_causal_mask()  # a non-persistent buffer, still on the meta device
    net.float()  # CLIP's fp16 weights (the rest is fp32 and is not copied)
    net.requires_grad_(False)
    return net.eval(), info


class LSeg(Segmenter):
    """LSeg as a segmenter: 1/0.07-scaled cosines of pixel and label embeddings at half the
    input resolution; label strings are encoded as they are (no prompt templates). By default
    images go through the official single-scale evaluation (``default_protocol``)."""

    stride = 2
    # The official single-scale evaluation (seglabel.tta): long side 520, 480 windows with stride 320,
    # black padding, align_corners=True upsampling; instead of one whole-image pass at short side 512.
    default_protocol = {"tta": True, "scales": (1.0,), "flip": False}

    def __init__(self, net: LSegNet) -> None:
        super().__init__()
        self.net = net
        self.mean, self.std = net.cfg.mean, net.cfg.std
        self.text_embeddings: torch.Tensor | None = None
        self.prompt_class: list[int] = []
        self.num_classes = 0
        self.weights_info: dict[str, Any] = {}

    @property
    def pad_to(self) -> int:
        return 32  # four halvings below the 1/2 output (and the ViT's 16-pixel patches)

    @torch.no_grad()
    def set_labels(self, labelset: LabelSet) -> None:
        from open_clip.tokenizer import SimpleTokenizer

        tokenizer = SimpleTokenizer(context_length=self.net.cfg.text["context_length"])
        self.label_warnings = tuple(indistinct_warnings(labelset, tokenizer, (), "LSeg's text encoder"))
        self.text_embeddings = cached_text_embeddings(
            self.text_identity(), labelset.prompts, (),
            lambda: encode_prompts(self.net.encode_text, tokenizer, labelset.prompts, (), self.device),
        ).to(self.device)
        self.prompt_class = labelset.prompt_class
        self.num_classes = len(labelset)

    def pixel_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised pixel embeddings (B, D, H/2, W/2) in fp32. The precision is the caller's:
        under its autocast (``--precision fp16``) the network runs in half precision, else fp32."""
        feats = self.net(images)
        device = images.device.type
        if torch.is_autocast_enabled(device) and not torch.isfinite(feats).all():
            # half precision overflowed on this input: this one needs fp32
            warnings.warn("LSeg: half precision overflowed on this input; recomputed in fp32")
            with torch.autocast(device, enabled=False):
                feats = self.net(images.float())
        return F.normalize(feats.float(), dim=1)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.text_embeddings is None:
            raise RuntimeError("call set_labels(labelset) before labelling images")
        if images.shape[2] % 32 or images.shape[3] % 32:
            raise ValueError(f"LSeg needs image sides that are multiples of 32, got {tuple(images.shape[2:])}")
        feats = self.pixel_embeddings(images)
        with torch.autocast(images.device.type, enabled=False):  # scores in fp32 whatever the network ran in
            cos = torch.einsum("bdhw,kd->bkhw", feats, self.text_embeddings.to(feats))
            return LOGIT_SCALE * class_max(cos, self.prompt_class, self.num_classes)

    @staticmethod
    def upsample_logits(logits: torch.Tensor) -> torch.Tensor:
        """Output logits (B, K, H/2, W/2) -> (B, K, H, W) as the official head does (bilinear x2,
        align_corners=True); used by the multi-scale protocol in seglabel.tta."""
        return F.interpolate(logits, scale_factor=2, mode="bilinear", align_corners=True)

    def describe(self) -> dict[str, Any]:
        cfg = self.net.cfg
        return {"method": "lseg", "backbone": "ViT-L/16" if cfg.backbone == "vit" else "ResNet-101",
                "config": cfg.to_dict(), "prompts": "label strings as they are (no templates)",
                "logit_scale": LOGIT_SCALE}


def build_lseg(path: str, device: str | torch.device = "cpu") -> Segmenter:
    """``lseg:PATH``: an official (or user-trained) LSeg Lightning checkpoint; no network access."""
    net, info = load_lseg_net(path)
    model = LSeg(net).to(device).eval()
    model.weights_info = {"pretrained": str(path), "weights_file": str(path),
                          "variant": net.cfg.backbone, **info}
    return model
