"""Finding the images to label and reading them as RGB, whatever the file holds."""
from __future__ import annotations

import hashlib
import io
import os
import stat
import sys
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable, Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from . import storage
from .errors import UsageError
from .layout import OUTPUT_FOLDERS, PER_IMAGE, is_run_folder
from .storage import inputs as remote_inputs
from .storage.tar_shards import Member, read_member

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
DEFAULT_MAX_PIXELS = 178_956_970  # twice PIL's own decompression-bomb warning level


class ImageError(UsageError):
    """An image that cannot be labelled (a per-file problem of a run; exit 2 only where it stops a
    command); ``str()`` is path and reason."""

    def __init__(self, path: str | Path, reason: str) -> None:
        shown = printable(path)
        super().__init__(f"{shown}: {reason}")
        self.path, self.reason = shown, reason


def printable(path: str | Path) -> str:
    """A path as text that can be printed and written to JSON: bytes of a file name that are not
    UTF-8 (held by Python as lone surrogates) are shown as ``\\xNN``."""
    text = os.fspath(path)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


@dataclass(frozen=True)
class ImageItem:
    path: Path | str  # where to read it: a local path; a URL (str); for a photo in a tar shard, "SHARD#MEMBER"
    rel: str  # posix path relative to its input root; outputs mirror it
    member: Member | None = None  # a photo inside a WebDataset tar shard (storage.tar_shards)
    listed: tuple[int, str] | None = None  # a URL's (bytes, ETag) as listed: a rerun knows it unchanged by them

    @property
    def key(self) -> str:
        """The relative output path without suffix: ``x/a.jpg`` -> ``x/a``."""
        return str(PurePosixPath(self.rel).with_suffix(""))

    @property
    def remote(self) -> bool:
        """Read through the storage layer (a URL, or a photo inside a tar shard), not as a local file."""
        return isinstance(self.path, str)

    @property
    def root(self) -> str:
        """What ``rel`` is relative to (where preview and export look for the photo): a folder, a
        URL prefix, or the tar shard that holds it."""
        if self.member is not None:
            return self.member.shard
        if isinstance(self.path, str):
            if not self.path.endswith("/" + self.rel):
                return self.path.rsplit("/", 1)[0]
            base = self.path[: len(self.path) - len(self.rel)]
            return base if base.endswith("://") else base[:-1]  # "s3://" for a listed URL kept whole
        path = os.path.abspath(self.path)
        if not path.endswith(os.sep + self.rel):  # an item made by hand: its own folder
            return os.path.dirname(path)
        return path[: len(path) - len(self.rel)].rstrip(os.sep) or os.sep


@dataclass
class Inputs:
    items: list[ImageItem]
    problems: list[ImageError]  # inputs that exist but cannot be used (missing list entries, clashes)
    skipped_outputs: list[str] = field(default_factory=list)  # seglabel output folders found, not labelled


def find_images(paths: Iterable[str | Path] = (), listed: Iterable[str] = (),
                exclude: Iterable[str | Path] = (), root: str | Path | None = None) -> Inputs:
    """Images from folders (walked recursively, sorted), files, and a list of files (``listed``:
    lines of a list file; blank lines and lines starting with ``#`` are skipped).

    An image's output path (its ``rel``) depends on nothing but the image and ``root``:
    with ``root``, it is the path relative to ``root`` (relative list entries are taken relative
    to ``root``; listed files outside it are problems, folders and files given outside it are
    refused); without, a folder's images are relative to the folder, a file given is its own
    name, and a listed file mirrors its absolute path (``/data/a/b.jpg`` -> ``data/a/b.jpg``).

    Folders in ``exclude`` (outputs) are never entered. Symbolic links to folders are followed,
    each folder entered once (no loops, no duplicates). Unreadable folders, inputs that are not
    regular files (FIFOs, devices) and file names that are not UTF-8 become problems, so nothing
    is skipped silently. Two inputs whose outputs would clash keep the first in sorted order;
    the others become problems.

    seglabel's own outputs are never inputs: an output folder (``masks/``, ``overlays/``...) of a
    folder that ``layout.is_run_folder`` recognises is not walked, and files given or listed inside
    one are left out; those folders are listed in ``skipped_outputs``. List entries are reported as
    written (URLs too, which are not read)."""
    local_excluded, remote_excluded = [], []
    for e in exclude:
        text = os.fspath(e)
        if storage.is_remote(text):
            remote_excluded.append(text)
        else:
            local_excluded.append(storage.local_path(text) if storage.is_url(text) else text)
    excluded = [os.path.realpath(p) for p in local_excluded]
    base, root_url = _root(root)
    found: list[ImageItem] = []
    problems: list[ImageError] = []
    outputs = _OutputFolders()
    remote = remote_inputs.RemoteInputs()
    for given in paths:
        text = os.fspath(given)
        if storage.is_remote(text):
            remote_inputs.given_url(text, root_url, remote_excluded, IMAGE_SUFFIXES, remote)
            continue
        p = Path(storage.local_path(text) if storage.is_url(text) else text)
        if root_url is not None:
            raise UsageError(f"{printable(p)}: given, but not inside --root {storage.redact(root_url)}")
        under = _under(base, p, "given") if base is not None else None
        if p.is_dir():
            found.extend(_walk(p, excluded, problems, outputs, prefix=under or ""))
        elif p.is_file() and remote_inputs.is_shard(p.name):
            remote_inputs.shard(str(p), IMAGE_SUFFIXES, remote)
        elif p.is_file():
            if not outputs.holds(p):
                found.append(ImageItem(p, under or p.name))
        elif os.path.lexists(p):
            problems.append(ImageError(p, _not_regular(p)))
        else:
            raise UsageError(f"{printable(p)}: no such file or folder")
    for line in listed:
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        if storage.is_remote(entry) and base is not None:
            problems.append(ImageError(entry, f"listed, but not inside --root {printable(base)} (a URL)"))
            continue
        if storage.is_remote(entry) or (root_url is not None and not storage.is_url(entry)):
            remote_inputs.listed_url(entry, root_url, IMAGE_SUFFIXES, remote)
            continue
        p = Path(base, entry) if base is not None else Path(entry)
        looked = "" if str(p) == entry else f" (looked for {printable(p)})"
        if not p.is_file():
            problems.append(ImageError(entry, (_not_regular(p) if os.path.lexists(p) else "listed but not found") + looked))
        elif outputs.holds(p):
            continue
        elif remote_inputs.is_shard(p.name):
            remote_inputs.shard(str(p), IMAGE_SUFFIXES, remote, entry)
        elif base is None:
            found.append(ImageItem(p, PurePosixPath(os.path.abspath(p)).relative_to("/").as_posix()))
        elif (rel := _under(base, p, "listed", strict=False)) is None:
            problems.append(ImageError(entry, f"listed, but not inside --root {printable(base)}{looked}"))
        else:
            found.append(ImageItem(p, rel))
    found += [ImageItem(f.source, f.rel, member=f.member, listed=f.listed) for f in remote.found]
    problems += [ImageError(source, reason) for source, reason in remote.problems]
    outputs.skipped |= remote.skipped_outputs
    found.sort(key=lambda item: (item.rel, str(item.path)))
    items, owner = [], {}
    for item in found:
        if not _utf8(item.rel):
            problems.append(ImageError(item.path, "file name is not valid UTF-8, so its outputs and "
                                                  "coco.json entry cannot name it; rename it (e.g. with convmv)"))
            continue
        if item.key in owner:
            problems.append(ImageError(item.path, f"its mask would be {item.key}.png, already made from "
                                                  f"{printable(owner[item.key])}"))
            continue
        owner[item.key] = item.path
        items.append(item)
    return Inputs(items, problems, sorted(outputs.skipped))


def _root(root: str | Path | None) -> tuple[str | None, str | None]:
    """(local --root, URL --root); the other None."""
    if root is None:
        return None, None
    text = os.fspath(root)
    if storage.is_remote(text):
        return None, storage.check_url(text.rstrip("/"), "--root")
    base = os.path.abspath(storage.local_path(text) if storage.is_url(text) else text)
    if not os.path.isdir(base):
        raise UsageError(f"--root {printable(root)}: no such folder")
    return base, None


class _OutputFolders:
    """Which folders are seglabel's outputs (an output folder name inside a run folder), asked
    once per folder; the ones met are remembered in ``skipped``."""

    def __init__(self) -> None:
        self.runs: dict[str, bool] = {}
        self.inside: dict[str, bool] = {}
        self.skipped: set[str] = set()

    def is_output(self, folder: str) -> bool:
        """Whether ``folder`` (as spelled) is an output folder of a seglabel run."""
        parent, name = os.path.split(folder.rstrip(os.sep))
        if name not in OUTPUT_FOLDERS:
            return False
        if parent not in self.runs:
            self.runs[parent] = is_run_folder(parent or os.curdir)
        if self.runs[parent]:
            self.skipped.add(folder.rstrip(os.sep))
        return self.runs[parent]

    def holds(self, path: Path) -> bool:
        """Whether file ``path`` lies inside an output folder of a seglabel run."""
        return self._inside(os.path.dirname(os.path.abspath(path)))

    def _inside(self, folder: str) -> bool:
        if folder not in self.inside:
            up = os.path.dirname(folder)
            self.inside[folder] = self.is_output(folder) or (up != folder and self._inside(up))
        return self.inside[folder]


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _under(base: str, path: Path, how: str, strict: bool = True) -> str | None:
    """``path`` relative to ``base`` as a posix path ("" for ``base`` itself); outside ``base``:
    None, or with ``strict`` a refusal (a path given on the command line)."""
    path_abs = os.path.abspath(path)
    for spelled, folder in ((path_abs, base), (_real(path_abs), os.path.realpath(base))):
        # as spelled first; then with links resolved, so a root or an entry spelled through a
        # symbolic link (either side) gives the same output path
        if _inside(spelled, folder):
            rel = os.path.relpath(spelled, folder)
            return "" if rel == "." else PurePosixPath(rel).as_posix()
    if strict:
        raise UsageError(f"{printable(path)}: {how}, but not inside --root {printable(base)}")
    return None


def _real(path: str) -> str:
    """``path`` with the links of its folders resolved, its own name kept (a file that is a link
    keeps its name, as a walk would find it)."""
    return os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))


def _not_regular(path: Path) -> str:
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return f"broken symbolic link (to {printable(os.readlink(path))})" if os.path.islink(path) else "vanished"
    kind = "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"
    return f"not a regular file ({kind})"


def _walk(root: Path, excluded: list[str], problems: list[ImageError], outputs: _OutputFolders,
          prefix: str = "") -> list[ImageItem]:
    real_root = os.path.realpath(root)
    # An output folder that holds the input folder (or is it): skip only what seglabel writes there.
    skip = []
    for e in excluded:
        skip += [os.path.join(e, sub) for sub in PER_IMAGE] if _inside(real_root, e) else [e]

    def on_error(err: OSError) -> None:
        reason = err.strerror or type(err).__name__
        problems.append(ImageError(err.filename or root, f"cannot read folder ({reason}); its images were not labelled"))

    seen: set[tuple[int, int]] = set()
    out = []
    for folder, dirs, files in os.walk(root, onerror=on_error, followlinks=True):
        try:
            st = os.stat(folder)
        except OSError:
            dirs[:] = []
            continue
        if (st.st_dev, st.st_ino) in seen:  # a link back to a folder already walked (a loop)
            dirs[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirs[:] = sorted(d for d in dirs if _enter(os.path.join(folder, d), real_root, skip)
                         and not outputs.is_output(os.path.join(folder, d)))
        for name in sorted(files):
            if os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES:
                path = Path(folder) / name
                rel = path.relative_to(root).as_posix()
                out.append(ImageItem(path, f"{prefix}/{rel}" if prefix else rel))
    return out


def _enter(path: str, real_root: str, skip: list[str]) -> bool:
    """Whether the walk goes into folder ``path``: not an output folder, and not a link to a folder
    inside the tree (walked under its own name already, or a loop)."""
    real = os.path.realpath(path)
    if any(_inside(real, e) for e in skip):
        return False
    return not (os.path.islink(path) and _inside(real, real_root))


def read_lines(source: str) -> list[str]:
    """Lines of a list file, or of standard input for '-' (``find_images`` skips comments)."""
    try:
        if source == "-":
            stdin = getattr(sys.stdin, "buffer", None)  # a replaced sys.stdin may hold text only
            data = stdin.read() if stdin is not None else sys.stdin.read().encode("utf-8", "surrogateescape")
        else:
            data = Path(source).read_bytes()
    except OSError as e:
        raise UsageError(f"--from-list {printable(source)}: cannot read ({e.strerror or type(e).__name__})") from None
    # As pipelines write lists: a UTF-8 byte-order mark (Windows tools, PowerShell), CRLF line ends,
    # names in bytes that are not UTF-8. Lines end at a line feed only: a name may hold any other
    # character that str.splitlines() would break at.
    text = data.decode("utf-8", "surrogateescape").removeprefix("\ufeff")
    return [line.removesuffix("\r") for line in text.split("\n")]


def file_fingerprint(path: str | Path) -> dict[str, int | str]:
    """What a record keeps of a file to know it again: its size in bytes, its modification time
    (ns) and the SHA-256 of its content (read once, in blocks). ``OSError`` if it cannot be read."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest.hexdigest()}


def read_photo(item: ImageItem) -> bytes:
    """The bytes of a photo read through the storage layer (a URL, or a photo inside a tar shard),
    each read retried on transient errors (storage.objects); ``ImageError`` (one line) otherwise."""
    try:
        if item.member is not None:
            return read_member(item.member)
        return storage.read_bytes(str(item.path))
    except storage.StorageError as e:
        raise ImageError(item.path, f"cannot read ({e.reason})") from None
    except OSError as e:  # a local tar shard
        raise ImageError(item.path, f"cannot read ({(e.strerror or type(e).__name__).lower()})") from None


def photo_fingerprint(item: ImageItem, data: bytes) -> dict[str, int | str]:
    """``file_fingerprint`` of a photo read by ``read_photo``: its size, its version (an object's
    ETag, as listed or asked for; a tar member's mtime) and the SHA-256 of its bytes."""
    found: dict[str, int | str] = {"bytes": len(data)}
    if item.member is not None:
        found["mtime_ns"] = item.member.mtime * 1_000_000_000
    else:
        etag = item.listed[1] if item.listed else None
        if not etag:
            try:
                etag = storage.info(str(item.path)).etag
            except storage.StorageError:
                etag = None
        if etag:
            found["etag"] = etag
    found["sha256"] = hashlib.sha256(data).hexdigest()
    return found


def oriented_size(path: str | Path, data: bytes | None = None) -> tuple[int, int]:
    """(width, height) of the image as ``load_image`` gives it (EXIF orientation applied), from
    the header only; ``ImageError`` if it cannot be read."""
    with _opened(path, sys.maxsize, data) as img:
        width, height = img.size
        turned = img.getexif().get(0x0112) in (5, 6, 7, 8)  # a quarter turn: the sides swap
    return (height, width) if turned else (width, height)


def load_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS,
               fits: Callable[[int, int], str | None] | None = None, data: bytes | None = None) -> np.ndarray:
    """An image file as RGB uint8 (H, W, 3), EXIF orientation applied; ``ImageError`` otherwise.
    ``data``: the file's bytes, already read (a photo at a URL); ``path`` then only names it.

    The size is checked against ``max_pixels`` from the header, before any pixel is decoded
    (PIL's own decompression-bomb limit is replaced by this one), and given to ``fits(width,
    height)``, which may refuse it too (by returning the reason). Animations give their first frame.
    Any failure to read or decode is an ``ImageError`` with a one-line reason."""
    with _opened(path, max_pixels, data) as img:
        reason = fits(*img.size) if fits is not None else None
        if reason:
            raise ImageError(path, reason)
        img.seek(0)  # animations: the first frame
        img.load()
        return _to_rgb(ImageOps.exif_transpose(img))


def read_size(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS, data: bytes | None = None) -> tuple[int, int]:
    """(width, height) from the header, with every check ``load_image`` makes before decoding."""
    with _opened(path, max_pixels, data) as img:
        return img.size


@contextmanager
def _opened(path: str | Path, max_pixels: int, data: bytes | None = None) -> Iterator[Image.Image]:
    """The image opened (header read, nothing decoded) from ``path``, or from ``data`` (its bytes,
    read already); any failure, in here or in the body, is an ``ImageError``."""
    if data is None:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            if os.path.islink(path):
                raise ImageError(path, f"broken symbolic link (to {printable(os.readlink(path))})") from None
            raise ImageError(path, "vanished before it could be read") from None
        except OSError as e:
            raise ImageError(path, f"cannot read ({(e.strerror or type(e).__name__).lower()})") from None
        if not stat.S_ISREG(st.st_mode):
            raise ImageError(path, "not a regular file")
        size = st.st_size
    else:
        size = len(data)
    if size == 0:
        raise ImageError(path, "not an image: empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # bomb warnings (checked below), EXIF and palette notes
            with _no_pil_pixel_limit():
                img = Image.open(path if data is None else io.BytesIO(data))
            with img:
                w, h = img.size
                if w * h > max_pixels:
                    raise ImageError(path, f"{w}x{h} is {w * h} pixels, more than --max-pixels {max_pixels} "
                                           f"(raise it to label this image)")
                yield img
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(path, "vanished before it could be read") from None
    except PermissionError as e:
        raise ImageError(path, f"cannot read ({(e.strerror or 'permission denied').lower()})") from None
    except UnidentifiedImageError:
        raise ImageError(path, "not an image PIL can read (unrecognised content)") from None
    except MemoryError:
        raise ImageError(path, "not enough memory to decode it") from None
    except Exception as e:  # noqa: BLE001 - decoders raise many types on corrupt or truncated data
        detail = " ".join(str(e).split()) or type(e).__name__
        raise ImageError(path, f"cannot decode: truncated or corrupt ({detail})") from None


@contextmanager
def _no_pil_pixel_limit():
    previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # --max-pixels is checked instead
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def _to_rgb(img: Image.Image) -> np.ndarray:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grey: keep the top 8 bits of range
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        grey = np.clip(np.round(arr * (255.0 / top)), 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if img.mode == "F":  # 32-bit float grey: [0, 1] scaled to 0-255, other ranges clipped to it
        arr = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        scale = 255.0 if arr.size and arr.min() >= 0.0 and arr.max() <= 1.0 else 1.0
        grey = np.clip(np.round(arr * scale), 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (0, 0, 0, 255))  # transparent pixels read as black
        img = Image.alpha_composite(background, img)
    return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()
