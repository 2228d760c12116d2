"""Photos to label at URLs: a prefix given as an input (listed recursively), a URL listed in
``--from-list``, and the photos of WebDataset tar shards (local or URL). ``images.find_images``
turns what these find into its items and problems.

Output paths, as for local inputs, depend on nothing but the photo and ``--root``: a prefix's
objects are relative to the prefix (or to a URL ``--root``); a listed URL without ``--root``
mirrors its bucket (or host) and path (``s3://b/a/x.jpg`` -> ``b/a/x.jpg``, as ``/data/a/x.jpg`` ->
``data/a/x.jpg``); a tar shard's photos are their sample keys (tar_shards.py).

seglabel's own outputs are never photos here either: a listing skips the output folders
(``masks/``...) of any run folder under the prefix (``layout.is_run_folder``'s test, on the heads
of a few objects) and those of ``--out`` when it lies under the prefix.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

from ..errors import UsageError
from ..layout import OUTPUT_FOLDERS, RECORDS, RUN_FILE, RUNS
from .objects import Listed, list_files, read_bytes
from .problems import StorageError
from .tar_shards import Member, index_shard, is_compressed_tar, is_tar_shard
from .urls import check_url, is_url, join, redact, relative, safe_relative, secrets_in


@dataclass(frozen=True)
class Found:
    source: str  # the URL, or "SHARD#MEMBER" for a photo in a tar shard
    rel: str
    member: Member | None = None
    listed: tuple[int, str] | None = None  # (bytes, ETag) as listed


@dataclass
class RemoteInputs:
    found: list[Found] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)  # (source as shown, reason)
    skipped_outputs: set[str] = field(default_factory=set)


def is_shard(name: str) -> bool:
    bare = name.split("?", 1)[0]
    return is_tar_shard(bare) or is_compressed_tar(bare)


def given_url(url: str, root_url: str | None, excluded: Iterable[str], suffixes: Iterable[str],
              result: RemoteInputs) -> None:
    """The photos at or under a URL given as an input. What cannot be listed refuses the run
    (``UsageError``, one line): nothing has been written yet."""
    url = check_url(url)
    if is_shard(url):
        shard(url, suffixes, result)
        return
    try:
        listing = list_files(url)
    except StorageError as e:
        raise UsageError(f"{redact(url)}: {e.reason}") from None
    if not listing:
        raise UsageError(f"{redact(url)}: no such object or prefix (nothing listed there)")
    single = len(listing) == 1 and listing[0].url == url  # one object named: taken whatever its suffix
    skipped = _outputs_in(url, listing, list(excluded))
    result.skipped_outputs.update(shown for prefix, shown in skipped.items()
                                  if any(o.rel.startswith(prefix) for o in listing))
    ends = tuple(s.lower() for s in suffixes)
    for obj in listing:
        if not single and (not obj.rel.lower().endswith(ends) or any(obj.rel.startswith(p) for p in skipped)):
            continue
        rel = obj.rel if root_url is None else relative(obj.url, root_url)
        if rel is None:
            raise UsageError(f"{redact(url)}: given, but not inside --root {redact(root_url or '')}")
        if not safe_relative(rel):
            result.problems.append((obj.url, f"its name cannot name an output path ({rel!r})"))
            continue
        result.found.append(Found(obj.url, rel, listed=(obj.size, obj.etag or "")))


def listed_url(entry: str, root_url: str | None, suffixes: Iterable[str], result: RemoteInputs) -> None:
    """A list line naming a URL (or, under a URL ``--root``, a path relative to it). Not looked
    up now: an object that is not there is that image's failure when it is read."""
    url = entry if is_url(entry) else join(root_url or "", entry)
    if secrets_in(url):
        try:
            check_url(url)
        except UsageError as e:
            result.problems.append((redact(entry), str(e).split(": ", 1)[1]))
        return
    if is_shard(url):
        shard(url, suffixes, result, redact(entry))
        return
    bare = url.split("?", 1)[0]
    if root_url is not None:
        rel = relative(bare, root_url)
        if rel is None:
            result.problems.append((entry, f"listed, but not inside --root {redact(root_url)}"))
            return
    else:
        rel = bare.split("://", 1)[1].lstrip("/")  # its bucket or host, then its path, as a local list mirrors /
    if not safe_relative(rel):
        result.problems.append((entry, f"its name cannot name an output path ({rel!r})"))
        return
    result.found.append(Found(url, rel))


def shard(source: str, suffixes: Iterable[str], result: RemoteInputs, shown: str | None = None) -> None:
    """The photos of a WebDataset tar shard (a local path or a URL); a shard that cannot be read,
    and each sample that cannot be labelled, are problems."""
    try:
        index = index_shard(source, suffixes)
    except StorageError as e:
        result.problems.append((shown or redact(source), e.reason))
        return
    except OSError as e:
        result.problems.append((shown or source, f"cannot read ({(e.strerror or type(e).__name__).lower()})"))
        return
    result.problems.extend(index.problems)
    result.found.extend(Found(m.source, m.rel, member=m) for m in index.members)


def _outputs_in(url: str, listing: list[Listed], excluded: list[str]) -> dict[str, str]:
    """Prefixes (relative to ``url``, ending in "/") of seglabel output folders in a listing ->
    their URL, as ``skipped_outputs`` shows them."""
    names = {obj.rel for obj in listing}
    top = url.rstrip("/")
    found: dict[str, str] = {}
    runs: dict[str, bool] = {}
    for obj in listing:
        parts = obj.rel.split("/")
        for i, part in enumerate(parts[:-1]):
            if part not in OUTPUT_FOLDERS:
                continue
            parent = "/".join(parts[:i])
            if parent not in runs:
                runs[parent] = _run_folder(top, parent, names)
            if runs[parent]:
                found["/".join(parts[: i + 1]) + "/"] = join(top, "/".join(parts[: i + 1]))
                break
    for out in excluded:  # --out under this input: its outputs are never photos, even before its first record
        inside = relative(out.rstrip("/"), top)
        if inside is not None:
            for sub in OUTPUT_FOLDERS:
                found[(f"{inside}/" if inside else "") + f"{sub}/"] = join(out.rstrip("/"), sub)
    return found


def _run_folder(top: str, parent: str, names: set[str]) -> bool:
    """``layout.is_run_folder`` for a prefix: a run record naming ``seglabel_version``, or a
    per-image record starting with ``settings_id``, among the objects listed."""
    lead = f"{parent}/" if parent else ""
    parts = [n for n in sorted(names) if n.startswith(f"{lead}{RUNS}/") and n.endswith(".json")
             and "/" not in n[len(lead) + len(RUNS) + 1:]]
    records = [n for n in sorted(names) if n.startswith(f"{lead}{RECORDS}/") and n.endswith(".json")]
    candidates = [(f"{lead}{RUN_FILE}", b'"seglabel_version"')] + [(n, b'"seglabel_version"') for n in parts[:4]]
    candidates += [(n, b'"settings_id"') for n in records[:1]]
    for name, mark in candidates:
        if name not in names:
            continue
        try:
            if mark in read_bytes(join(top, name), 0, 4096):
                return True
        except StorageError:
            continue
    return False
