"""Finding the images to label and reading them as RGB, whatever the file holds."""
from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterable

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"})
DEFAULT_MAX_PIXELS = 178_956_970  # twice PIL's own decompression-bomb warning level


class ImageError(Exception):
    """An image that cannot be labelled; ``str()`` is one line: path and reason."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = str(path), reason


@dataclass(frozen=True)
class ImageItem:
    path: Path  # where to read it
    rel: str  # posix path relative to its input root; outputs mirror it

    @property
    def key(self) -> str:
        """The relative output path without suffix: ``x/a.jpg`` -> ``x/a``."""
        return str(PurePosixPath(self.rel).with_suffix(""))


@dataclass
class Inputs:
    items: list[ImageItem]
    problems: list[ImageError]  # inputs that exist but cannot be used (missing list entries, clashes)


def find_images(paths: Iterable[str | Path] = (), listed: Iterable[str] = (),
                exclude: Iterable[str | Path] = ()) -> Inputs:
    """Images from directories (walked recursively, sorted), files, and a list of files.

    Directory entries are relative to their directory; listed files to their common folder; a
    single file is its own name. Folders in ``exclude`` (outputs) are never entered. Two inputs
    whose outputs would clash keep the first in sorted order; the others become problems."""
    excluded = {os.path.realpath(p) for p in exclude}
    found: list[ImageItem] = []
    problems: list[ImageError] = []
    for p in map(Path, paths):
        if p.is_dir():
            found.extend(_walk(p, excluded))
        elif p.is_file():
            found.append(ImageItem(p, p.name))
        else:
            raise FileNotFoundError(f"{p}: no such file or folder")
    listed = [Path(line) for line in (s.strip() for s in listed) if line]
    if listed:
        root = Path(os.path.commonpath([os.path.abspath(p.parent) for p in listed]))
        for p in listed:
            if p.is_file():
                found.append(ImageItem(p, Path(os.path.abspath(p)).relative_to(root).as_posix()))
            else:
                problems.append(ImageError(p, "listed but not found"))
    found.sort(key=lambda item: (item.rel, str(item.path)))
    items, owner = [], {}
    for item in found:
        if item.key in owner:
            problems.append(ImageError(item.path, f"its mask would be {item.key}.png, already made from {owner[item.key]}"))
            continue
        owner[item.key] = item.path
        items.append(item)
    return Inputs(items, problems)


def _walk(root: Path, excluded: set[str]) -> list[ImageItem]:
    out = []
    for folder, dirs, files in os.walk(root, onerror=_report_walk_error):
        dirs[:] = sorted(d for d in dirs if os.path.realpath(os.path.join(folder, d)) not in excluded)
        for name in sorted(files):
            if os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES:
                path = Path(folder) / name
                out.append(ImageItem(path, path.relative_to(root).as_posix()))
    return out


def _report_walk_error(err: OSError) -> None:
    print(f"warning: {err.filename}: cannot read folder ({err.strerror})", file=sys.stderr)


def read_lines(source: str) -> list[str]:
    """Lines of a list file, or of standard input for '-'."""
    if source == "-":
        return sys.stdin.read().splitlines()
    return Path(source).read_text(encoding="utf-8", errors="surrogateescape").splitlines()


def load_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """An image file as RGB uint8 (H, W, 3), EXIF orientation applied; ``ImageError`` otherwise."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # checked below instead
            try:
                img = Image.open(path)
            finally:
                Image.MAX_IMAGE_PIXELS = previous
            with img:
                w, h = img.size
                if w * h > max_pixels:
                    raise ImageError(path, f"{w}x{h} is more than --max-pixels {max_pixels}")
                img.seek(0)  # animations: the first frame
                img = ImageOps.exif_transpose(img)
                return _to_rgb(img)
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(path, "vanished before it could be read") from None
    except UnidentifiedImageError:
        raise ImageError(path, "not an image PIL can read") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:  # truncated or corrupt data
        raise ImageError(path, f"cannot decode ({str(e) or type(e).__name__})") from None


def _to_rgb(img: Image.Image) -> np.ndarray:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grey: keep the top 8 bits of range
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        grey = np.clip(np.round(arr * (255.0 / top)), 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (0, 0, 0, 255))  # transparent pixels read as black
        img = Image.alpha_composite(background, img)
    return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()
