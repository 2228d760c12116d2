"""The names of what ``seglabel annotate`` writes under ``--out`` (ground floor: imports nothing of seglabel).

Per image: ``masks/<key>.png``, optional ``scores/<key>.png`` and ``overlays/<key>.jpg``, and
``records/<key>.json``; per run: ``coco.json``, ``run.json`` and ``runs/<part>.json``;
``preview/`` and ``export/`` from the commands that read a run.

Whose files these are is decided here too: ``is_run_folder`` (seglabel wrote this folder) and
``foreign_outputs`` (files under seglabel's names in a folder seglabel did not write).
"""
import os

MASKS, SCORES, OVERLAYS, RECORDS = "masks", "scores", "overlays", "records"
PER_IMAGE = (MASKS, SCORES, OVERLAYS, RECORDS)
COCO_FILE, RUN_FILE = "coco.json", "run.json"
RUNS = "runs"  # the run records of the parts of a job (shards, Ray actors)
PREVIEW, EXPORT = "preview", "export"  # written by `seglabel preview` and `seglabel export`
OUTPUT_FOLDERS = PER_IMAGE + (RUNS, PREVIEW, EXPORT)  # never photos: left out of any input walk
_FIRST_RECORDS = 64  # entries of records/ looked at for one of seglabel's records


def is_run_folder(folder: "str | os.PathLike[str]") -> bool:
    """Whether ``folder`` holds a seglabel run: a ``run.json``, or a part's record in ``runs/``,
    written by seglabel (it names ``seglabel_version``), or, with those deleted, a per-image
    record in ``records/`` (it starts with ``settings_id``). What reads folders of photos or masks
    uses this to leave seglabel's own outputs alone, and what writes into ``--out`` to know whose
    files it would replace."""
    candidates = [(os.path.join(folder, RUN_FILE), b'"seglabel_version"')]
    try:
        candidates += [(e.path, b'"seglabel_version"') for e in os.scandir(os.path.join(folder, RUNS))
                       if e.name.endswith(".json")]
    except OSError:
        pass
    candidates += [(path, b'"settings_id"') for path in _first_records(os.path.join(folder, RECORDS))]
    for path, mark in candidates:
        try:
            with open(path, "rb") as f:
                head = f.read(4096)
        except OSError:
            continue
        if mark in head:
            return True
    return False


def _first_records(folder: str) -> list[str]:
    """A few ``.json`` files under ``folder`` (depth first, a bounded look: never a whole tree)."""
    found, stack, seen = [], [folder], 0
    while stack and not found and seen < _FIRST_RECORDS:
        try:
            entries = sorted(os.scandir(stack.pop()), key=lambda e: e.name)
        except OSError:
            continue
        for e in entries:
            seen += 1
            if e.name.startswith("."):
                continue
            if e.name.endswith(".json") and e.is_file():
                found.append(e.path)
                break
            if e.is_dir(follow_symlinks=False):
                stack.append(e.path)
    return found


def foreign_outputs(folder: "str | os.PathLike[str]") -> list[str]:
    """The names of seglabel's outputs (``masks/``, ``coco.json``, ...) that hold something in
    ``folder`` although seglabel did not write it (``is_run_folder`` is false): what a run there
    would replace. Empty folders and seglabel's own hidden files (locks, temporaries) hold nothing."""
    if not os.path.isdir(folder) or is_run_folder(folder):
        return []
    held = []
    for name in OUTPUT_FOLDERS[:5] + (COCO_FILE, RUN_FILE):  # what annotate and merge write
        path = os.path.join(folder, name)
        if os.path.isdir(path) and not os.path.islink(path):
            if _holds_a_file(path):
                held.append(name + "/")
        elif os.path.lexists(path):
            held.append(name + "/" if os.path.isdir(path) else name)
    return held


def _holds_a_file(folder: str) -> bool:
    for _, dirs, files in os.walk(folder):
        if any(not name.startswith(".") for name in files):
            return True
        dirs[:] = [d for d in dirs if not d.startswith(".")]
    return False
