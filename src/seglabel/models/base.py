"""What every segmenter gives the labelling pipeline."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..labelset import LabelSet


class Segmenter(nn.Module):
    """A model that scores every class of a label set at every position of an image batch.

    ``forward(images)`` takes normalised images (B, 3, H, W) whose sides are multiples of
    ``pad_to`` and returns class logits (B, K, H / stride, W / stride), ready for a softmax;
    the grid covers the input exactly, so upsampling by ``stride`` aligns it with the pixels.
    """

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    stride: int  # input pixels per output cell
    # Protocol fields (seglabel.predict.Protocol) replacing seglabel's whole-image default for this
    # model, e.g. its authors' own evaluation; None: the default suits it
    default_protocol: dict[str, Any] | None = None
    # What set_labels found worth a look, one line each (classes this model's tokenizer cannot tell
    # apart, text.indistinct_warnings); the command line prints them as warnings
    label_warnings: tuple[str, ...] = ()

    @property
    def pad_to(self) -> int:
        """Input sides must be multiples of this (the stride unless a model needs more)."""
        return self.stride

    def set_labels(self, labelset: LabelSet) -> None:
        raise NotImplementedError

    def text_identity(self) -> dict[str, Any] | None:
        """What decides this model's text embeddings, keying the on-disk cache (None: no cache).
        Set by ``load_segmenter``: the spec and the weights it was built from."""
        spec, info = getattr(self, "spec", None), getattr(self, "weights_info", None)
        if spec is None or not info:
            return None
        from ..text import weights_identity

        return {"spec": spec, "weights": weights_identity(info.get("weights_file") or info.get("pretrained")),
                "quick_gelu": info.get("quick_gelu")}

    def image_context(self, image: torch.Tensor) -> Any:
        """What the model needs of a whole image (3, H, W) before labelling it window by window
        (e.g. CorrCLIP's regions); None for most models. When not None, the sliding window calls
        ``forward(crops, context=..., boxes=[(top, left, bottom, right), ...])`` and then
        ``finish_image(averaged logits, context)``."""
        return None

    def finish_image(self, logits: torch.Tensor, context: Any) -> torch.Tensor:
        return logits

    def describe(self) -> dict[str, Any]:
        """What the run record says about the model beyond its spec and weights."""
        return {}

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device
