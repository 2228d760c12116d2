"""The names of what ``seglabel annotate`` writes under ``--out`` (ground floor: imports nothing of seglabel).

Per image: ``masks/<key>.png``, optional ``scores/<key>.png`` and ``overlays/<key>.jpg``, and
``records/<key>.json``; per run: ``coco.json``, ``run.json`` and ``runs/<part>.json``.
"""
import os

MASKS, SCORES, OVERLAYS, RECORDS = "masks", "scores", "overlays", "records"
PER_IMAGE = (MASKS, SCORES, OVERLAYS, RECORDS)
COCO_FILE, RUN_FILE = "coco.json", "run.json"
RUNS = "runs"  # the run records of the parts of a job (shards, Ray actors)


def is_run_folder(folder: "str | os.PathLike[str]") -> bool:
    """Whether ``folder`` holds a seglabel run: a ``run.json``, or a part's record in ``runs/``,
    written by seglabel (it names ``seglabel_version``). What reads folders of photos or masks
    uses this to leave seglabel's own outputs alone, and what writes into ``--out`` to know whose
    files it would replace."""
    candidates = [os.path.join(folder, RUN_FILE)]
    try:
        candidates += [e.path for e in os.scandir(os.path.join(folder, RUNS)) if e.name.endswith(".json")]
    except OSError:
        pass
    for path in candidates:
        try:
            with open(path, "rb") as f:
                head = f.read(4096)
        except OSError:
            continue
        if b'"seglabel_version"' in head:
            return True
    return False
