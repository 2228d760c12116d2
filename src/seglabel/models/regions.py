"""Region sources for CorrCLIP (``--regions``): an image in, an int map of regions out (0: pixels no
region covers, 1.. one id per region).

- ``sam2:FILE`` (or ``sam2:hiera-large``, ``sam2.1:hiera-large``, ... from the Hugging Face cache):
  SAM 2's automatic mask generator as CorrCLIP runs it: an 8 x 8 point grid, predicted-IoU and
  stability thresholds 0.4, one mask per point, no post-processing.
- ``sam:FILE`` (or ``sam:vitb|vitl|vith`` from torch hub's cache): SAM's automatic mask generator
  with the same grid and thresholds (it keeps SAM's three masks per point).
- ``slic`` or ``slic:N``: scikit-image SLIC superpixels (N segments, default 64, one per point of
  that grid; compactness 10): no weights, no GPU.

Masks are painted smallest first with ids 1, 2, ... so a larger mask overwrites the smaller ones
it covers, as CorrCLIP's code does.
"""
from __future__ import annotations

import re
from typing import Any

import numpy as np
import torch

from ..checkpoints import CheckpointError, load_weights, state_dict_of
from ..errors import UsageError
from .weights import WeightSource, file_identity, resolve_weights

SLIC_SEGMENTS = 64
SLIC_COMPACTNESS = 10.0
AMG_OPTIONS = {"points_per_side": 8, "pred_iou_thresh": 0.4, "stability_score_thresh": 0.4}

_SAM_NAMES = {"vitb": ("vit_b", "sam_vit_b_01ec64.pth"), "vitl": ("vit_l", "sam_vit_l_0b3195.pth"),
              "vith": ("vit_h", "sam_vit_h_4b8939.pth")}
_SAM2_SIZES = {"tiny": "t", "small": "s", "base-plus": "b+", "large": "l"}
_SAM2_WIDTHS = {96: ("t", "s"), 112: ("b+",), 144: ("l",)}


class RegionSource:
    spec: str = ""

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        """RGB uint8 (H, W, 3) -> int64 (H, W) region ids, 0 where no region is."""
        raise NotImplementedError

    def identity(self) -> dict[str, Any]:
        return {"regions": self.spec}


class SLIC(RegionSource):
    def __init__(self, segments: int = SLIC_SEGMENTS, compactness: float = SLIC_COMPACTNESS) -> None:
        try:
            import skimage.segmentation  # noqa: F401
        except ImportError:
            raise ImportError("--regions slic needs scikit-image: pip install 'seglabel[vfm]'") from None
        self.segments, self.compactness = segments, compactness
        self.spec = "slic" if segments == SLIC_SEGMENTS else f"slic:{segments}"

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        from skimage.segmentation import slic

        return slic(rgb, n_segments=self.segments, compactness=self.compactness, start_label=1).astype(np.int64)


class MaskGenerator(RegionSource):
    """SAM's or SAM 2's automatic mask generator (``generator.generate(rgb)``) -> region ids."""

    def __init__(self, spec: str, generator: Any, weights_file: str | None = None) -> None:
        self.spec, self.generator, self.weights_file = spec, generator, weights_file

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            masks = self.generator.generate(np.ascontiguousarray(rgb))
        return paint_masks([m["segmentation"] for m in masks], rgb.shape[:2])

    def identity(self) -> dict[str, Any]:
        kind = self.spec.split(":")[0]
        return {"regions": kind, "regions_weights": file_identity(self.weights_file)}


def paint_masks(masks: list[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Binary masks -> ids 1.. in order of increasing area, later (larger) ones painted over."""
    out = np.zeros(shape, dtype=np.int64)
    for i, m in enumerate(sorted(masks, key=lambda m: int(m.sum())), start=1):
        out[m] = i
    return out


def build_regions(spec: str, device: str | torch.device = "cpu", cache_dir: str | None = None) -> RegionSource:
    kind, _, what = spec.partition(":")
    if kind == "slic":
        if what and not (what.isdigit() and int(what) > 0):
            raise UsageError(f"--regions {spec}: give slic or slic:N with N segments")
        return SLIC(int(what) if what else SLIC_SEGMENTS)
    if kind == "sam" and what:
        return _sam(what, device, cache_dir)
    if kind in ("sam2", "sam2.1") and what:
        return _sam2(kind, what, device, cache_dir)
    raise UsageError(f"--regions {spec}: give sam2:FILE, sam:FILE or slic (see --help)")


def _sam(what: str, device, cache_dir) -> MaskGenerator:
    key, hub_file = _SAM_NAMES.get(what, (None, None))
    source = WeightSource(hub_file=hub_file, url=f"https://dl.fbaipublicfiles.com/segment_anything/{hub_file}",
                          download="torch.hub.load_state_dict_from_url of SAM's checkpoint") if key else WeightSource()
    path = resolve_weights("SAM", source, None if key else what, "--regions sam:", cache_dir)
    sd = state_dict_of(load_weights(path), path)
    try:
        from segment_anything import SamAutomaticMaskGenerator
    except ImportError:
        raise ImportError("--regions sam needs the segment-anything package: pip install 'seglabel[vfm]'") from None
    from .vfm import build_sam

    width = sd.get("image_encoder.patch_embed.proj.weight", torch.empty(0)).shape[:1]
    key = key or {(768,): "vit_b", (1024,): "vit_l", (1280,): "vit_h"}.get(tuple(width))
    if key is None:
        raise CheckpointError(f"{path}: not a SAM checkpoint (no ViT-B/L/H image encoder found)")
    sam = build_sam(key, sd, path).to(device)
    return MaskGenerator(f"sam:{what}", SamAutomaticMaskGenerator(sam, **AMG_OPTIONS), path)


def _sam2(kind: str, what: str, device, cache_dir) -> MaskGenerator:
    # The user's file is checked (and a hostile pickle refused) before the package is needed.
    named = re.fullmatch(r"hiera-(tiny|small|base-plus|large)", what)
    source = WeightSource()
    if named:
        stem = f"{kind}_hiera_{named.group(1).replace('-', '_')}"
        source = WeightSource(hf_repo=f"facebook/{kind}-hiera-{named.group(1)}", hf_file=f"{stem}.pt",
                              download=f"huggingface_hub.hf_hub_download('facebook/{kind}-hiera-{named.group(1)}', '{stem}.pt')")
    path = resolve_weights("SAM 2", source, None if named else what, "--regions sam2:", cache_dir)
    sd = state_dict_of(load_weights(path), path)
    try:
        from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator
        from sam2.build_sam import build_sam2
    except ImportError:
        raise ImportError("--regions sam2 needs the sam2 package: pip install 'seglabel[sam2]'") from None
    config = _sam2_config(sd, path)
    model = build_sam2(config, None, device=str(device), apply_postprocessing=False)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: does not fit {config}: {str(e).strip().splitlines()[0]}") from None
    generator = SAM2AutomaticMaskGenerator(model.eval(), multimask_output=False, **AMG_OPTIONS)
    return MaskGenerator(f"{kind}:{what}", generator, path)


def _sam2_config(sd: dict[str, torch.Tensor], path: str) -> str:
    """The sam2 package's config for a checkpoint: size from the trunk's width and depth, 2.1 from
    the object-pointer keys only SAM 2.1 has."""
    w = sd.get("image_encoder.trunk.patch_embed.proj.weight")
    if w is None or w.shape[0] not in _SAM2_WIDTHS:
        raise CheckpointError(f"{path}: not a SAM 2 checkpoint (no Hiera image encoder found)")
    sizes = _SAM2_WIDTHS[w.shape[0]]
    if len(sizes) > 1:  # tiny (12 blocks) or small (16)
        blocks = {k.split(".")[3] for k in sd if k.startswith("image_encoder.trunk.blocks.")}
        sizes = ("t",) if len(blocks) <= 12 else ("s",)
    version = "sam2.1" if "no_obj_embed_spatial" in sd else "sam2"
    return f"configs/{version}/{version}_hiera_{sizes[0]}.yaml"
