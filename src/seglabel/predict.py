"""Images in, per-pixel labels out: resize, whole image or sliding window, upsample, softmax.

Upsampling is done with explicit bilinear interpolation matrices (the same weights as
``F.interpolate(mode='bilinear', align_corners=False)``), row band by row band, so a 171-class
map of a 4000-pixel-wide photo never needs (K, H, W) floats at once.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .errors import UsageError
from .labelset import LabelSet
from .models.base import Segmenter


@dataclass(frozen=True)
class Protocol:
    """How an image is fed to the model. Defaults: the official MaskCLIP protocol."""

    short_side: int = 512  # resize keeping the aspect ratio so the short side is this
    max_long_side: int = 2048  # ... unless the long side would exceed this
    window: int = 0  # sliding-window crop size in resized pixels; 0 = whole image
    window_stride: int = 0  # 0 = half the window
    tta: bool = False  # LSeg's official evaluation: scales of 520, flip, 480 sliding window (see tta.py)
    pamr: bool = False  # PAMR refinement of the logits upsampled to the resized image (refine.py)
    scales: tuple[float, ...] = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)  # with tta: the official evaluation's
    flip: bool = True  # with tta: the mirror image too; (1.0,) without flip is its single-scale protocol


@dataclass(frozen=True)
class ProtocolOptions:
    """The protocol as a user gives it: each field None where not given (``Protocol``'s fields,
    and ``paper``: ``--protocol paper``). ``resolve_protocol`` turns it into the ``Protocol`` a run
    uses, once."""

    paper: bool = False  # the method's own protocol (models/trainingfree.paper_protocol)
    short_side: int | None = None
    max_long_side: int | None = None
    window: int | None = None
    window_stride: int | None = None
    tta: bool | None = None
    pamr: bool | None = None
    scales: tuple[float, ...] | None = None
    flip: bool | None = None

    def given(self) -> dict[str, Any]:
        """The ``Protocol`` fields given, with a window given without a stride getting half the
        given window (stride 0)."""
        given = {f.name: getattr(self, f.name) for f in fields(Protocol) if getattr(self, f.name) is not None}
        if given.get("scales") is not None:
            given["scales"] = tuple(given["scales"])
        if "window" in given and "window_stride" not in given:
            given["window_stride"] = 0
        return given


def resolve_protocol(segmenter: Segmenter | None, options: ProtocolOptions = ProtocolOptions()) -> Protocol:
    """The protocol a run uses, decided once: what was given wins; then, for the rest, the model's
    own protocol (``Segmenter.default_protocol``: LSeg's official single-scale evaluation, a
    student's training scale) or, with ``paper``, the method's published one; then seglabel's
    defaults (``Protocol()``). A model's own protocol gives way to a short side given, and an own
    evaluation protocol (LSeg's) also to a window, --tta or --pamr given (a given --max-long-side
    still caps huge photos first). ``segmenter`` None: a model with no protocol of its own, and
    no ``paper`` (what ``recipe.check`` knows before the model is built)."""
    given = options.given()
    own = getattr(segmenter, "default_protocol", None) or {}
    if own and "short_side" not in given and not (own.get("tta") and (options.tta or options.window or options.pamr)):
        base = dict(own)  # the model's own protocol is its published one too
    elif options.paper:
        from .models.trainingfree import paper_protocol

        if segmenter is None:
            raise UsageError("--protocol paper: the method's protocol is known once its model is built")
        base = paper_protocol(getattr(segmenter, "method", "maskclip"))
    else:
        base = {}
    return Protocol(**{**base, **given})


@dataclass
class Prediction:
    labels: np.ndarray  # (H, W) class index (uint8 up to 256 classes, else int32), original image size
    confidence: np.ndarray  # (H, W) float32 probability of that class
    # (H, W) float32 logit of that class minus the second best's, with Predictor(margins=True): a
    # ranking of sureness that does not saturate where probabilities round to 1 (distill's teacher)
    margin: np.ndarray | None = None


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` (CUDA, else MPS, else the CPU), ``cpu``, ``cuda``, ``cuda:N``, ``mps``; a device
    this machine does not have is a ``UsageError``, before any model is built for it."""
    mps = getattr(torch.backends, "mps", None)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if mps and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise UsageError(f"--device {name}: not a device (choose auto, cpu, cuda, cuda:N or mps)") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count:
            raise UsageError(f"--device {name}: no CUDA device is available here")
        if device.index is not None and device.index >= count:
            raise UsageError(f"--device {name}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
        return device
    backend = mps if device.type == "mps" else getattr(torch, device.type, None)
    if backend is not None and getattr(backend, "is_available", lambda: False)():
        return device
    raise UsageError(f"--device {name}: not available here (choose auto, cpu, cuda, cuda:N or mps)")


def check_protocol_options(protocol: Protocol, max_pixels: int | None = None) -> None:
    """Refuse a protocol no model can run, or one that would resize every image to more pixels
    than ``max_pixels`` (an allocation that cannot succeed), before a model is loaded."""
    for flag, value, least in (("--short-side", protocol.short_side, 1), ("--max-long-side", protocol.max_long_side, 0),
                               ("--window", protocol.window, 0), ("--window-stride", protocol.window_stride, 0)):
        if value < least:
            raise UsageError(f"{flag} {value}: must be at least {least}")
    if protocol.pamr and protocol.tta:
        raise UsageError("PAMR refines a single-scale prediction: give --pamr or --tta, not both")
    if protocol.tta and protocol.window:
        raise UsageError("--tta and --window are two different protocols: give one")
    side = min(protocol.short_side, protocol.max_long_side or protocol.short_side)
    if max_pixels is not None and not protocol.tta and side * side > max_pixels:
        raise UsageError(f"--short-side {protocol.short_side}: every image would be resized to at least "
                         f"{side}x{side} = {side * side} pixels, more than --max-pixels {max_pixels}")


def check_protocol(protocol: Protocol, segmenter: Segmenter) -> None:
    """Refuse a protocol the segmenter cannot run (before anything is written)."""
    check_protocol_options(protocol)
    if protocol.window and protocol.window % segmenter.pad_to:
        raise UsageError(f"--window {protocol.window} must be a multiple of {segmenter.pad_to} for this model")


def resized_size(height: int, width: int, protocol: Protocol) -> tuple[int, int]:
    scale = protocol.short_side / min(height, width)
    if protocol.max_long_side:
        scale = min(scale, protocol.max_long_side / max(height, width))
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


def bilinear_matrix(n_in: int, n_out: int, device: torch.device | str = "cpu",
                    align_corners: bool = False) -> torch.Tensor:
    """(n_out, n_in) weights of 1-D bilinear resizing, no antialias, as F.interpolate's."""
    dst = torch.arange(n_out, dtype=torch.float64, device=device)
    if align_corners:  # the first and last samples sit on the first and last input pixels
        src = dst * ((n_in - 1) / (n_out - 1) if n_out > 1 else 0.0)
    else:
        src = ((dst + 0.5) * (n_in / n_out) - 0.5).clamp_min(0)
    i0 = src.floor().long().clamp_max(n_in - 1)
    i1 = (i0 + 1).clamp_max(n_in - 1)
    frac = src - i0
    m = torch.zeros(n_out, n_in, dtype=torch.float64, device=device)
    m[torch.arange(n_out, device=device), i0] += 1 - frac
    m[torch.arange(n_out, device=device), i1] += frac
    return m.float()


def prepare_image(rgb: np.ndarray, protocol: Protocol, mean: Sequence[float] | torch.Tensor,
                  std: Sequence[float] | torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """RGB uint8 (H, W, 3) -> normalised float (3, H', W') resized to the protocol's size
    (antialiased bilinear). A plain function so loader processes can run it."""
    pixels = torch.from_numpy(np.ascontiguousarray(rgb)).to(device).permute(2, 0, 1)
    return prepare_pixels(pixels, protocol, mean, std)


def prepare_pixels(pixels: torch.Tensor, protocol: Protocol, mean: Sequence[float] | torch.Tensor,
                   std: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """``prepare_image`` of RGB uint8 pixels (3, H, W) already in a tensor, on its device (e.g.
    decoded on the GPU). Pass ``mean`` and ``std`` as tensors on that device to spare a copy."""
    h, w = pixels.shape[1:]
    x = pixels.float().div_(255)
    size = resized_size(h, w, protocol)
    if size != (h, w):
        x = F.interpolate(x[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
    mean = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(3, 1, 1)
    std = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return (x - mean) / std


class Predictor:
    """Runs a segmenter on RGB images under a protocol, used as given, and returns full-size
    labels. The protocol a run of this model would use: ``resolve_protocol(segmenter)``."""

    def __init__(self, segmenter: Segmenter, protocol: Protocol = Protocol(), batch_size: int = 1,
                 margins: bool = False) -> None:
        check_protocol(protocol, segmenter)
        self.model = segmenter.eval()
        self.protocol = protocol
        self.batch_size = max(1, batch_size)
        self.margins = margins
        self.device = segmenter.device
        self.mean = torch.tensor(segmenter.mean, device=self.device).view(3, 1, 1)
        self.std = torch.tensor(segmenter.std, device=self.device).view(3, 1, 1)

    def prepare(self, rgb: np.ndarray) -> torch.Tensor:
        """RGB uint8 (H, W, 3) -> normalised float (3, H', W') at the protocol's size."""
        return prepare_image(rgb, self.protocol, self.mean, self.std, self.device)

    @torch.no_grad()
    def predict(self, images: Sequence[np.ndarray]) -> list[Prediction]:
        if self.protocol.tta:
            return [self._tta(img) for img in images]
        return self.predict_prepared([self.prepare(img) for img in images], [img.shape[:2] for img in images])

    @torch.no_grad()
    def predict_prepared(self, prepared: Sequence[torch.Tensor], sizes: Sequence[Sequence[int]]) -> list[Prediction]:
        """Like ``predict`` for images already through ``prepare_image`` (e.g. in a loader
        process); ``sizes`` are the original (H, W). Not for the TTA protocol."""
        if self.protocol.tta:
            raise UsageError("this protocol resizes the photo per scale itself: give the pixels to predict()")
        prepared = [x.to(self.device, non_blocking=True) for x in prepared]
        if self.protocol.window:
            return [self._finish(*self._refine(self._slide(x), 1, x), x.shape[1:], size)
                    for x, size in zip(prepared, sizes)]
        out: list[Prediction | None] = [None] * len(prepared)
        padded = [self._pad(x) for x in prepared]
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, x in enumerate(padded):  # equal shapes share a forward pass
            groups.setdefault(tuple(x.shape), []).append(i)
        for members in groups.values():
            for start in range(0, len(members), self.batch_size):
                chunk = members[start:start + self.batch_size]
                logits = self.model(torch.stack([padded[i] for i in chunk]))
                maps = [self._label_maps(*self._refine(lg, self.model.stride, prepared[i]),
                                         prepared[i].shape[1:], sizes[i]) for i, lg in zip(chunk, logits)]
                for i, pred in zip(chunk, _to_host(maps)):
                    out[i] = pred
        return out  # type: ignore[return-value]

    def _tta(self, rgb: np.ndarray) -> Prediction:
        from .tta import multiscale_logits, scale_logits

        h, w = rgb.shape[:2]
        x = torch.from_numpy(rgb).to(self.device).permute(2, 0, 1).float().div_(255)
        cap = self.protocol.max_long_side
        if cap and max(h, w) > cap:  # only huge photos are reduced first
            s = cap / max(h, w)
            x = F.interpolate(x[None], size=(max(1, round(h * s)), max(1, round(w * s))), mode="bilinear",
                              align_corners=False, antialias=True)[0]
        x = (x - self.mean) / self.std
        scales, flip = self.protocol.scales, self.protocol.flip
        if len(scales) == 1:  # logits at the scale's own size, upsampled to the photo as the official code does
            logits = scale_logits(self.model, x, scales[0], flip=flip)
            return self._finish(logits, 1, logits.shape[1:], (h, w), align_corners=True)
        k = min(1.0, 910 / max(x.shape[1:]))  # no scale exceeds ceil(520 * 1.75) px: bounds K*H*W memory
        size = (max(1, round(x.shape[1] * k)), max(1, round(x.shape[2] * k)))
        logits = multiscale_logits(self.model, x, scales=scales, flip=flip, out_size=size)
        return self._finish(logits, 1, logits.shape[1:], (h, w))

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        s = self.model.pad_to
        return F.pad(x, (0, (-x.shape[2]) % s, 0, (-x.shape[1]) % s))

    def _slide(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (K, H, W) at the resized size, averaged over overlapping windows."""
        _, height, width = x.shape
        win = self.protocol.window
        step = self.protocol.window_stride or max(1, win // 2)
        tops = _starts(height, win, step)
        lefts = _starts(width, win, step)
        boxes = [(t, l, min(t + win, height), min(l + win, width)) for t in tops for l in lefts]
        whole_image = getattr(self.model, "image_context", None)  # e.g. CorrCLIP's regions (models/base.py)
        context = whole_image(x) if whole_image else None
        total = count = None
        for start in range(0, len(boxes), self.batch_size):
            chunk = boxes[start:start + self.batch_size]
            crops = [self._pad(x[:, t:b, l:r]) for t, l, b, r in chunk]
            shape = max(c.shape[1] for c in crops), max(c.shape[2] for c in crops)
            crops = [F.pad(c, (0, shape[1] - c.shape[2], 0, shape[0] - c.shape[1])) for c in crops]
            logits = self.model(torch.stack(crops)) if context is None else \
                self.model(torch.stack(crops), context=context, boxes=chunk)
            logits = F.interpolate(logits, scale_factor=self.model.stride, mode="bilinear", align_corners=False)
            if total is None:
                total = logits.new_zeros(logits.shape[1], height, width)
                count = logits.new_zeros(1, height, width)
            for (t, l, b, r), lg in zip(chunk, logits):
                total[:, t:b, l:r] += lg[:, : b - t, : r - l]
                count[:, t:b, l:r] += 1
        return total / count if context is None else self.model.finish_image(total / count, context)

    def _refine(self, logits: torch.Tensor, cell: int, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """With ``protocol.pamr``: logits (K, h, w) of ``cell``-pixel cells -> PAMR-refined logits
        (K, H', W') at the resized image ``x`` (3, H', W'), upsampled bilinearly first; else as given.
        The size is the protocol's, not the photo's, which bounds the memory."""
        if not self.protocol.pamr:
            return logits, cell
        from .refine import pamr

        up = logits.float()[None]
        if cell != 1:
            up = F.interpolate(up, scale_factor=cell, mode="bilinear", align_corners=False)
        return pamr(x.float(), up[0, :, :x.shape[1], :x.shape[2]]), 1

    def _finish(self, logits: torch.Tensor, cell: int, resized: Sequence[int], original: Sequence[int],
                align_corners: bool = False) -> Prediction:
        """Logits (K, h, w) whose cells are ``cell`` resized pixels -> labels at the original size:
        upsampled to the (padded) resized image, cropped, resized to the original (``align_corners``:
        as F.interpolate's), then softmax."""
        return _to_host([self._label_maps(logits, cell, resized, original, align_corners)])[0]

    def _label_maps(self, logits: torch.Tensor, cell: int, resized: Sequence[int],
                    original: Sequence[int], align_corners: bool = False) -> tuple[torch.Tensor, ...]:
        """``_finish`` up to the copy to the host: (labels, confidence[, margin]) on the model's device.
        Labels are uint8 up to 256 classes: all that crosses to the host is 5 bytes a pixel."""
        (h, w), (rh, rw), (oh, ow) = logits.shape[1:], resized, original
        dev = logits.device
        k = logits.shape[0]
        same = cell == 1 and (h, w) == (rh, rw) == (oh, ow)  # logits of every pixel at the photo's size
        if not same:
            my = bilinear_matrix(rh, oh, dev, align_corners) @ bilinear_matrix(h, h * cell, dev)[:rh]
            mx = bilinear_matrix(rw, ow, dev, align_corners) @ bilinear_matrix(w, w * cell, dev)[:rw]
            cols = torch.einsum("khw,xw->khx", logits.float(), mx)  # (K, h, W0)
        band = max(1, (1 << 24) // max(1, k * ow))
        labels = torch.empty(oh, ow, dtype=torch.uint8 if k <= 256 else torch.int32, device=dev)
        conf = torch.empty(oh, ow, dtype=torch.float32, device=dev)
        margin = torch.full((oh, ow), float("inf"), dtype=torch.float32, device=dev) if self.margins else None
        for y in range(0, oh, band):
            scores = logits[:, y:y + band].float() if same else torch.einsum("yh,khx->kyx", my[y:y + band], cols)
            conf[y:y + band], labels[y:y + band] = scores.softmax(dim=0).max(dim=0)
            if margin is not None and k > 1:
                top2 = scores.topk(2, dim=0).values
                margin[y:y + band] = top2[0] - top2[1]
        return (labels, conf) if margin is None else (labels, conf, margin)


def _to_host(maps: Sequence[tuple[torch.Tensor, ...]]) -> list[Prediction]:
    """(labels, confidence[, margin]) tensors -> Predictions of NumPy arrays. From a GPU the copies of
    a whole batch are queued (into pinned memory) and waited for once, not image by image."""
    if not maps or maps[0][0].device.type != "cuda":
        return [Prediction(*(t.cpu().numpy() for t in m)) for m in maps]
    copies = [tuple(t.to("cpu", non_blocking=True) for t in m) for m in maps]
    torch.cuda.current_stream(maps[0][0].device).synchronize()
    return [Prediction(*(t.numpy() for t in m)) for m in copies]


def _starts(length: int, win: int, step: int) -> list[int]:
    if length <= win:
        return [0]
    starts = list(range(0, length - win, step))
    return starts + [length - win]  # the last window ends at the border


def to_mask(pred: Prediction, labelset: LabelSet, min_confidence: float | None = None) -> np.ndarray:
    """Class indices as written to disk: ignored classes and unconfident pixels -> ignore index."""
    ignore = labelset.ignore_index
    dtype = np.uint8 if ignore == 255 else np.uint16
    mask = pred.labels.astype(dtype)
    ignored = [i for i, c in enumerate(labelset.classes) if c.ignore]
    if ignored:
        mask[np.isin(mask, ignored)] = ignore
    threshold = labelset.min_confidence if min_confidence is None else min_confidence
    if threshold > 0:
        mask[pred.confidence < threshold] = ignore
    return mask
