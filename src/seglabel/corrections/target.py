"""The run folder ``seglabel import`` writes into: a run of ``seglabel annotate`` (its label set, its
images by key and file name, where its photos are), or a new run (``--into NEW --labels L``).

Finding an image of the source in a run: a name of the source (a seglabel key, a file path the
tool kept) is the run image's key or file name, or ends with it on a folder boundary
(``/data/photos/sub/b.jpg`` is the run's ``sub/b.jpg``); a bare file name (``b.jpg``, as uploads
keep them) is also the run image of that name if only one has it. Never a guess between two.
"""
from __future__ import annotations

import json
import os
import posixpath
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any, Sequence

from .. import __version__
from ..errors import UsageError
from ..images import ImageError, file_fingerprint, oriented_size, printable
from ..labelset import LabelSet, load_labelset, name_key, parse_labelset
from ..layout import RUN_FILE, is_run_folder
from ..records import HEAD_BYTES, iter_records, read_record
from ..writers import check_output_folder, write_json
from .source import ItemProblem, SourceError


MADE_BY = "seglabel import"  # run.json's made_by: a run of corrections alone, no model


@dataclass
class Placed:
    """Where one image of the source goes."""
    key: str
    file_name: str
    record: dict[str, Any] | None  # the run's record of it; None: a new image (new run)


class Target:
    """``of_imports``: a run made by imports (``--into NEW --labels``): images it lacks are added,
    and its run.json is written by the import; ``created``: this import makes it."""

    def __init__(self, out: Path, labelset: LabelSet, run: dict[str, Any], of_imports: bool, created: bool,
                 roots: Sequence[Path]) -> None:
        self.out, self.labelset, self.run, self.of_imports, self.created = out, labelset, run, of_imports, created
        self.roots = list(dict.fromkeys(Path(os.path.abspath(r)) for r in roots))
        self.records: dict[str, Path] = {key: Path(out) / rel for key, rel in iter_records(out)}
        self._by_name: dict[str, set[str]] = {}
        self._by_stem: dict[str, set[str]] = {}
        self._file_names: dict[str, str] = {}
        for key, path in self.records.items():
            file_name = _file_name(path) or key
            self._file_names[key] = file_name
            for name in {key, file_name}:
                self._by_name.setdefault(name, set()).add(key)
            self._by_stem.setdefault(PurePosixPath(file_name).stem, set()).add(key)

    # -- finding the source's images ---------------------------------------------------------------
    def place(self, names: Sequence[str]) -> Placed:
        """The run image ``names`` identify (in a run of imports, a new one if none); else
        ``ItemProblem``."""
        for name in names:
            parts = _parts(name)
            for i in range(len(parts)):
                suffix = "/".join(parts[i:])
                for candidate in dict.fromkeys((suffix, str(PurePosixPath(suffix).with_suffix("")))):
                    found = self._by_name.get(candidate)
                    if found:
                        return self._one(found, name)
        for name in names:
            parts = _parts(name)
            if len(parts) == 1 and self._by_stem.get(PurePosixPath(parts[0]).stem):
                return self._one(self._by_stem[PurePosixPath(parts[0]).stem], name)
        if self.of_imports:
            return self._new_image(names)
        raise ItemProblem(f"not an image of the run {self.out} (no image there has the file name "
                          f"{printable(names[-1] if names else '?')!r})")

    def _one(self, keys: set[str], name: str) -> Placed:
        if len(keys) > 1:
            shown = ", ".join(sorted(self._file_names[k] for k in keys)[:3])
            raise ItemProblem(f"{printable(name)!r} could be any of {len(keys)} images of the run ({shown}); "
                              "not imported rather than guessed")
        key = next(iter(keys))
        return Placed(key, self._file_names[key], read_record(self.records[key]))

    def _new_image(self, names: Sequence[str]) -> Placed:
        """A new run's image: the longest end of a name that is a photo under ``--images``, else
        the seglabel key the tool kept with its photo's extension, else the first name that is a
        file path (a bare name for an absolute path)."""
        for name in names:
            parts = _parts(name)
            for i in range(len(parts)):
                if self.photo("/".join(parts[i:])):
                    return self._checked_new("/".join(parts[i:]))
        paths = [n for n in names if PurePosixPath(n).suffix] or list(names)
        if not paths:
            raise ItemProblem("the source gives no name for this image")
        keys = [n for n in names if not PurePosixPath(n).suffix]  # a seglabel key the tool kept
        for key in keys:
            for path in paths:
                stem = str(PurePosixPath(path.replace("\\", "/")).with_suffix(""))
                if stem == key or stem.endswith("/" + key):
                    return self._checked_new(key + PurePosixPath(path).suffix)
        first = paths[0].replace("\\", "/")
        return self._checked_new(posixpath.basename(first) if first.startswith("/") or ":" in first else first)

    def _checked_new(self, file_name: str) -> Placed:
        parts = [p for p in file_name.split("/") if p not in ("", ".")]
        if not parts or ".." in parts:
            raise ItemProblem(f"{printable(file_name)!r}: not a relative file name inside the run; not imported")
        file_name = "/".join(parts)
        key = str(PurePosixPath(file_name).with_suffix("")) or file_name
        if key in self.records:  # the same key as an image it has: that image
            return Placed(key, self._file_names[key], read_record(self.records[key]))
        return Placed(key, file_name, None)

    # -- photos --------------------------------------------------------------------------------------
    def photo(self, file_name: str) -> Path | None:
        for root in self.roots:
            path = root / file_name
            if path.is_file():
                return path
        return None

    def photo_fingerprint(self, file_name: str) -> tuple[dict[str, Any] | None, str | None]:
        """The photo's fingerprint as records keep it (``None`` when it is not found), and why it
        cannot be read (None when it can)."""
        path = self.photo(file_name)
        if path is None:
            return None, None
        try:
            width, height = oriented_size(path)
            return {"width": width, "height": height, **file_fingerprint(path)}, None
        except ImageError as e:
            return None, f"its photo {printable(path)}: {e.reason}"
        except OSError as e:
            return None, f"its photo {printable(path)} cannot be read ({e.strerror or type(e).__name__})"


def _file_name(path: Path) -> str | None:
    """A record's ``file_name``, from its head where ``write_labelled`` puts it (after the
    fingerprints), else from the whole record: 100,000 records are read in seconds."""
    try:
        with open(path, "rb") as f:
            head = f.read(HEAD_BYTES).decode("utf-8", "replace")
        at = head.find('\n  "file_name": ')
        if at >= 0:
            name, _ = json.JSONDecoder().raw_decode(head, at + len('\n  "file_name": '))
            if isinstance(name, str):
                return name
    except (OSError, ValueError):
        pass
    name = read_record(path).get("file_name")
    return str(name) if name is not None else None


def _parts(name: str) -> list[str]:
    return [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]


def open_target(into: str | Path, labels: str | Path | None = None, images: Sequence[str | Path] = ()) -> Target:
    """The run ``into`` (refused in one line when it cannot take an import); a new run when
    ``into`` holds none and ``labels`` is given."""
    out = Path(into)
    for root in images:
        if not Path(root).is_dir():
            raise SourceError(f"--images {root}: not a folder")
    labelset = load_labelset(labels) if labels is not None else None
    run_file = out / RUN_FILE
    if run_file.is_file():
        try:
            run = json.loads(run_file.read_text(encoding="utf-8"))
            made_with = parse_labelset(run["labelset"], source=str(run_file))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SourceError(f"{run_file}: unreadable run record ({type(e).__name__}: {e})") from None
        if labelset is not None and [name_key(n) for n in labelset.names] != [name_key(n) for n in made_with.names]:
            raise SourceError(f"--labels {labels}: its classes are not those of {out} (its {RUN_FILE}); leave "
                              "--labels out to import into that run, or give --into a new folder")
        roots = [Path(r) for r in images] + [Path(r) for r in run.get("input_roots") or [] if isinstance(r, str)]
        if run.get("made_by") == MADE_BY and images:
            run["input_roots"] = sorted({*run.get("input_roots", []), *(os.path.abspath(r) for r in images)})
        return Target(out, made_with, run, run.get("made_by") == MADE_BY, False, roots)
    if is_run_folder(out):
        raise SourceError(f"--into {out}: a seglabel run without its {RUN_FILE} (shards not merged yet?); run "
                          f"seglabel merge {out} first")
    if labelset is None:
        raise SourceError(f"--into {out}: not a seglabel run (no {RUN_FILE}); to import into a new run there, "
                          "give --labels, the label set the tool's labels belong to")
    from ..runs import check_owned  # runs.py imports torch (checkpoints): only for a new run

    try:
        check_output_folder(out)
        check_owned(out)
    except UsageError as e:  # the refusals of an output folder, as annotate's, for --into
        raise SourceError(str(e).replace("--out", "--into")) from None
    run = {"seglabel_version": __version__, "made_by": MADE_BY, "started": now(), "argv": None, "cwd": os.getcwd(),
           "input_roots": [os.path.abspath(r) for r in images], "model": None,
           "labelset": labelset.to_dict(), "labelset_source": labelset.source}
    return Target(out, labelset, run, True, True, [Path(r) for r in images])


def write_run_of_imports(target: Target, argv: Sequence[str] | None, status: str,
                         summary: dict[str, Any] | None = None) -> None:
    """The run.json of a run made by imports: what made it, its label set, its photos' folders."""
    write_json(target.out / RUN_FILE, {**target.run, "argv": list(argv) if argv else None, "status": status,
                                       **({"summary": summary} if summary else {})})


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
