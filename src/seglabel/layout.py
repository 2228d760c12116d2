"""The names of what ``seglabel annotate`` writes under ``--out`` (ground floor: imports nothing).

Per image: ``masks/<key>.png``, optional ``scores/<key>.png`` and ``overlays/<key>.jpg``, and
``records/<key>.json``; per run: ``coco.json``, ``run.json`` and ``runs/<part>.json``.
"""
MASKS, SCORES, OVERLAYS, RECORDS = "masks", "scores", "overlays", "records"
PER_IMAGE = (MASKS, SCORES, OVERLAYS, RECORDS)
COCO_FILE, RUN_FILE = "coco.json", "run.json"
RUNS = "runs"  # the run records of the parts of a job (shards, Ray actors)
