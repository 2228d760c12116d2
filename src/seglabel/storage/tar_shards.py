"""WebDataset tar shards as input: the photos in ``.tar`` files, local or at a URL.

A WebDataset shard is a plain tar whose members are grouped into samples by name, as the
``webdataset`` package groups them: a member's key is its path up to the first dot of its file
name, the rest is its field (``a/0001.jpg``: key ``a/0001``, field ``jpg``; ``0001.seg.png``: field
``seg.png``), and consecutive members with one key are one sample. A sample's photo is its member
whose field is an image extension alone (``jpg``, ``png``...: not ``seg.png``), or the field asked
for. A sample with no photo or with several (``jpg`` and ``png``) is a problem of its own, reported,
never a guess.

A photo's output path is its key, percent-decoded, with its field as suffix: ``0001.jpg`` ->
``masks/0001.png``, and ``x%2Fa.jpg`` (seglabel's own ``--format webdataset`` export of
``x/a.jpg``) -> ``masks/x/a.png``: labels depend on the sample, not on which shard holds it.

Shards are indexed first (member headers: name, offset, size; nothing is decoded), then each photo
is read alone by its offset: a range read at a URL, so loader processes read photos of one shard
in parallel. Indexing a shard at a URL reads its headers through a read-ahead buffer. Compressed
tars (``.tar.gz``...) cannot be read by range and are refused in one line.
"""
from __future__ import annotations

import os
import re
import tarfile
from dataclasses import dataclass, field
from typing import Iterable
from urllib.parse import unquote

from .filesystems import filesystem
from .objects import read_bytes, retried
from .problems import StorageError
from .urls import is_remote, is_url, local_path, redact, safe_relative

TAR_SUFFIX = ".tar"
COMPRESSED_SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2", ".tbz", ".tar.xz", ".txz", ".tar.zst")
_KEY_FIELD = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # how webdataset splits a name (base_plus_ext)
HEADER_BLOCK = 8 << 20  # read-ahead when indexing a shard at a URL: 500 photos of 100 kB in 0.6 s from moto here (1 MiB: 3.5 s)


@dataclass(frozen=True)
class Member:
    shard: str  # the tar's path or URL, as given
    name: str  # the photo's member name in the tar
    offset: int  # where its bytes start in the tar
    size: int
    mtime: int  # the member's modification time (seconds), as the tar records it
    rel: str  # output path: the key percent-decoded, with the field as suffix

    @property
    def source(self) -> str:
        """How messages name it: ``shard.tar#member``."""
        return f"{redact(self.shard)}#{self.name}"


@dataclass
class ShardIndex:
    members: list[Member] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)  # (source, reason)


def is_tar_shard(name: str) -> bool:
    return name.lower().endswith(TAR_SUFFIX)


def is_compressed_tar(name: str) -> bool:
    return name.lower().endswith(COMPRESSED_SUFFIXES)


def key_and_field(name: str) -> tuple[str, str] | None:
    """(key, field) of a member name as webdataset splits it; None for a name without a field."""
    found = _KEY_FIELD.match(name[2:] if name.startswith("./") else name)
    return (found.group(1), found.group(2)) if found else None


def _open(shard: str):
    path = local_path(shard)
    if path is not None:
        return open(path, "rb")
    fs, inner = filesystem(shard)
    return retried(shard, "open", lambda: fs.open(inner, "rb", block_size=HEADER_BLOCK, cache_type="readahead"))


def index_shard(shard: str, suffixes: Iterable[str], photo_field: str | None = None) -> ShardIndex:
    """The photos of one shard (``suffixes``: image extensions with their dot, as ``.jpg``), and a
    problem per sample that cannot be labelled. A shard that cannot be opened is a
    ``StorageError`` (a URL) or ``OSError`` (a local file); one truncated midway gives the samples
    before the damage and a problem."""
    if is_compressed_tar(shard):
        return ShardIndex([], [(redact(shard), "a compressed tar cannot be read photo by photo; decompress it "
                                              "to a plain .tar")])
    images = {s.lower().lstrip(".") for s in suffixes}
    index, sample, key = ShardIndex(), [], None
    with _open(shard) as f:
        try:
            with tarfile.open(fileobj=f, mode="r:") as tar:
                while True:
                    try:
                        info = tar.next()
                    except (tarfile.ReadError, EOFError) as e:
                        index.problems.append((redact(shard), f"truncated or corrupt tar after {len(index.members)} "
                                                              f"photos ({' '.join(str(e).split()) or type(e).__name__})"))
                        break
                    if info is None:
                        break
                    split = key_and_field(info.name)
                    if not (info.isreg() or info.issym() or info.islnk()):
                        continue  # folders
                    if split is None:  # webdataset takes no sample from it either: say so for a photo
                        if info.name.lower().endswith(tuple(f".{s}" for s in images)):
                            index.problems.append((f"{redact(shard)}#{info.name}", "a name webdataset takes no "
                                                   "sample key from (it starts with a dot): not labelled"))
                        continue
                    if split[0] != key and sample:
                        _add(index, shard, sample, images, photo_field)
                        sample = []
                    key = split[0]
                    sample.append((info, split[1]))
        except tarfile.ReadError as e:
            raise StorageError(shard, f"not a tar file ({' '.join(str(e).split())})") from None
    if sample:
        _add(index, shard, sample, images, photo_field)
    return index


def _add(index: ShardIndex, shard: str, sample: list, images: set[str], photo_field: str | None) -> None:
    fields = [f for _, f in sample]
    photos = [(info, f) for info, f in sample if (f == photo_field if photo_field else f.lower() in images)]
    first = sample[0][0].name
    key = key_and_field(first)[0]
    source = f"{redact(shard)}#{key}"
    if len(photos) != 1:
        what = "no photo" if not photos else f"{len(photos)} photos ({', '.join(f for _, f in photos)})"
        hint = f"field {photo_field!r} not among" if photo_field else "choose one of"
        index.problems.append((source, f"{what} in this sample; {hint} its files ({', '.join(fields)})"))
        return
    info, ext = photos[0]
    if not info.isreg():
        index.problems.append((f"{redact(shard)}#{info.name}", "a link inside the tar, not a photo"))
        return
    rel = f"{unquote(key, errors='surrogateescape')}.{ext}"
    if not safe_relative(rel):
        index.problems.append((f"{redact(shard)}#{info.name}", f"its key cannot name an output path ({rel!r})"))
        return
    index.members.append(Member(shard, info.name, info.offset_data, info.size, int(info.mtime), rel))


def read_member(member: Member) -> bytes:
    """The photo's bytes: a range read at a URL, a seek in a local file. ``StorageError`` or
    ``OSError`` if they cannot be read whole."""
    path = local_path(member.shard)
    if path is not None:
        with open(path, "rb") as f:
            f.seek(member.offset)
            data = f.read(member.size)
    else:
        data = read_bytes(member.shard, member.offset, member.offset + member.size)
    if len(data) != member.size:
        raise StorageError(member.source, f"truncated: {len(data)} of {member.size} bytes", "other")
    return data


def is_url_shard(name: str) -> bool:
    return is_remote(name) and is_tar_shard(name.split("?", 1)[0])


def local_shard(path: str) -> bool:
    return not is_url(path) and is_tar_shard(path) and os.path.isfile(path)
