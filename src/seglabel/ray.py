"""Label with Ray Data: one model per actor, the same outputs as ``seglabel annotate``.

    import ray
    from seglabel.ray import Annotator, list_images

    ds = ray.data.from_items(list_images(["./photos"], out="labels"))
    results = ds.map_batches(Annotator, fn_constructor_kwargs={"out": "labels", "labels": "street.yaml"},
                             batch_size=16, concurrency=4, num_gpus=1).materialize()
    # then `seglabel merge labels` writes labels/coco.json

Each actor is one part of the job (``OUT/runs/ray-<host>-<pid>.json``); rows come back with a
``status`` column (``done``, ``skipped`` or ``failed: reason``). Needs ``pip install seglabel[ray]``.
"""
from __future__ import annotations

import os
import socket
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from . import storage
from .annotate import annotate
from .errors import UsageError
from .images import ImageItem, find_images
from .models.registry import DEFAULT_MODEL
from .recipe import make_recipe, prepare


def list_images(inputs: Sequence[str | Path], root: str | Path | None = None,
                out: str | Path | None = None) -> list[dict[str, str]]:
    """Rows ``{"path", "rel"}`` for ``ray.data.from_items``, found as the CLI finds them (``root``
    as ``--root``; ``out``, the output folder, is never walked); inputs that cannot be used raise
    (one line per problem)."""
    found = find_images(list(inputs), exclude=[out] if out is not None else [], root=root)
    if found.problems:
        raise UsageError("; ".join(str(p) for p in found.problems))
    shards = sorted({item.member.shard for item in found.items if item.member is not None})
    if shards:  # a row holds a path; a photo inside a tar has none
        raise UsageError(f"{shards[0]}: WebDataset tar shards are read by seglabel annotate, not by list_images")
    return [{"path": str(item.path), "rel": item.rel} for item in found.items]


class Annotator:
    """A callable class for ``Dataset.map_batches``: builds the segmenter once, through the same
    checks and recipe as ``seglabel annotate`` and ``seglabel.label_folders``, then labels each
    batch of rows (columns ``path`` and ``rel``) into ``out``. ``options``: ``label_folders``'
    keyword options (``pretrained``, ``method``, ``short_side``, ``protocol``, ``batch_size``,
    ``overlay``, ``device``...; ``recipe.make_recipe``)."""

    def __init__(self, out: str | Path, labels: str | Path, model: str = DEFAULT_MODEL, **options: Any) -> None:
        options.update(workers=0,  # Ray already runs the actors in parallel; decode in the actor
                       part=f"ray-{socket.gethostname()}-{os.getpid()}")
        ready = prepare(make_recipe(labels, out, model=model, **options))
        self.labelset, self.segmenter, self.config = ready.labelset, ready.segmenter, ready.config

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        items = [ImageItem(str(p) if storage.is_remote(str(p)) else Path(str(p)),
                           str(r)) for p, r in zip(batch["path"], batch["rel"])]  # a URL stays one
        status = {item.key: "skipped" for item in items}  # what annotate reports no outcome for was done before

        def on_image(item: ImageItem, error: str | None) -> None:
            status[item.key] = "done" if error is None else f"failed: {error}"

        annotate(items, self.segmenter, self.labelset, self.config, on_image=on_image,
                 argv=["seglabel.ray.Annotator"])
        # Stale temporaries are looked for once per actor; `seglabel merge` clears any others.
        self.config = replace(self.config, cleanup=False)
        return {"path": np.asarray([str(i.path) for i in items]), "rel": np.asarray([i.rel for i in items]),
                "status": np.asarray([status[i.key] for i in items])}
