"""JPEG decoding on the model's device, in batches: nvjpeg on CUDA (through torchvision's
``decode_jpeg``), which takes the decoding off the CPU cores.

Only plain JPEGs go this way: 8-bit three-component YCbCr, no EXIF rotation, size within
``--max-pixels``, complete (ending in the end-of-image marker). Everything else - PNG and the other
formats, grey and CMYK JPEGs, rotated photos, truncated or damaged files, and any JPEG the device
decoder refuses - is read by ``images.load_image`` on the CPU exactly as before, so every image
is labelled, or reported with the same one-line reason, whichever decoder was asked for.

The two decoders differ slightly: nvjpeg (the GPU's hardware decoder on A100/H100/H200, its CUDA
decoder elsewhere) and libjpeg-turbo (PIL, and torchvision on the CPU) use different inverse DCTs
and chroma upsampling, so pixels can differ by a few levels. On a CPU device torchvision's decoder
is libjpeg-turbo, and the pixels are those PIL gives (the tests rely on this).
"""
from __future__ import annotations

import functools
import io
import warnings
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

_EOI = b"\xff\xd9"  # JPEG end-of-image marker
_ORIENTATION = 0x0112  # EXIF tag (PIL's getexif also finds it in XMP)
_ROTATED = frozenset(range(2, 9))  # the orientations ImageOps.exif_transpose acts on


def device_jpeg(path: str | Path, max_pixels: int, data: bytes | None = None) -> tuple[torch.Tensor, tuple[int, int]] | None:
    """The file's bytes (uint8, 1-D) and its (H, W), if it is a JPEG the device decoder reads to
    the pixels ``load_image`` gives; None for anything else (which then takes the CPU path, where
    unreadable files get their usual error). Reads the header only: cheap in a loader process."""
    if data is None:  # else its bytes were read already (a photo at a URL)
        try:
            data = Path(path).read_bytes()
        except OSError:
            return None
    if len(data) < 4 or not data.startswith(b"\xff\xd8") or not data.rstrip(b"\x00").endswith(_EOI):
        return None  # not a JPEG, or truncated (PIL reports those; nvjpeg might not)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL's decompression-bomb warning: the size is checked here
            with Image.open(io.BytesIO(data)) as img:
                if img.format != "JPEG" or img.mode != "RGB" or getattr(img, "bits", 8) != 8:
                    return None  # MPO, grey, CMYK/YCCK, 12-bit
                if img.info.get("adobe_transform", 1) != 1:
                    return None  # Adobe marker: colours stored as RGB, not YCbCr
                if [c[0] for c in getattr(img, "layer", [])] == ["R", "G", "B"]:
                    return None  # components named R, G, B: stored as RGB
                width, height = img.size
                if width * height > max_pixels or img.getexif().get(_ORIENTATION) in _ROTATED:
                    return None  # too big (load_image says so), or to be turned (load_image does it)
    except Exception:  # noqa: BLE001 - any header PIL cannot parse: the CPU path reports it
        return None
    return torch.frombuffer(bytearray(data), dtype=torch.uint8), (height, width)


def decode_jpegs(encoded: Sequence[torch.Tensor], device: torch.device | str) -> list[torch.Tensor | None]:
    """RGB uint8 (3, H, W) on ``device`` for each JPEG (bytes on the CPU), decoded in one batched
    call; None for any the decoder refuses (the batch is then retried image by image)."""
    if not encoded:
        return []
    try:
        return list(_decode(list(encoded), device))
    except RuntimeError:
        if len(encoded) == 1:
            return [None]
        return [decode_jpegs([e], device)[0] for e in encoded]


def _decode(encoded: list[torch.Tensor], device: torch.device | str) -> list[torch.Tensor]:
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its decoders in favour of TorchCodec; they still work.
        warnings.filterwarnings("ignore", message=".*decoding and encoding capabilities of TorchVision")
        return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)


@functools.lru_cache(maxsize=None)
def device_decoding_available(device: torch.device) -> bool:
    """Whether JPEGs can be decoded on ``device``: CUDA, and a torchvision whose decoder works
    there (built with nvjpeg). Tried once on a tiny JPEG."""
    if device.type != "cuda":
        return False
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 60)).save(buf, format="JPEG")
    try:
        [pixels] = _decode([torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)], device)
    except Exception:  # noqa: BLE001 - no torchvision, no nvjpeg, an old driver: decode on the CPU
        return False
    return tuple(pixels.shape) == (3, 16, 16)
