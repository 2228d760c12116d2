"""A whole annotate run in one call: ``seglabel.label_folders`` (and ``plan_folders``, its dry run).

``seglabel annotate`` is this call with its flags as the keyword options, so a run from Python
makes every check the command makes, in the same order, before anything is written: the options
and the output folder (``recipe.check``), the inputs (``images.find_images``: ``--out`` inside an
input is never walked, seglabel output folders are skipped, unusable inputs are problems), the
shard, then the model and its protocol (``recipe.prepare``). ``seglabel.ray.Annotator`` takes the
same options (``recipe.make_recipe``).

    import seglabel
    summary = seglabel.label_folders("photos", "labelsets/street.yaml", "labels", method="naclip", pamr=True)
    summary.labelled, summary.failures

Without a command line driving it, a run shows a tqdm progress bar (``tqdm.auto``: a widget in
Jupyter); ``progress=False`` leaves it out. Messages (label set warnings, out of memory) go to
``logging.getLogger("seglabel")``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from .annotate import Summary, annotate
from .errors import UsageError
from .images import IMAGE_SUFFIXES, ImageItem, Inputs, find_images, read_lines
from .labelset import LabelSet
from .models.registry import DEFAULT_MODEL
from .recipe import Checked, DryRun, Recipe, check, dry_run, make_recipe, prepare
from .runs import parse_shard, select_shard, shard_part

Paths = str | os.PathLike | Sequence[str | os.PathLike]


def label_folders(inputs: Paths = (), labels: str | Path | LabelSet | None = None, out: str | Path = "labels", *,
                  model: str = DEFAULT_MODEL, from_list: str | Path | None = None, root: str | Path | None = None,
                  shard: str | tuple[int, int] | None = None, progress: bool = True,
                  on_start: Callable[[int], None] | None = None,
                  on_image: Callable[[ImageItem, str | None], None] | None = None,
                  argv: Sequence[str] | None = None, **options: Any) -> Summary:
    """Label every image under ``inputs`` (files and folders, walked recursively) with the classes
    of the label set ``labels`` into ``out``, as ``seglabel annotate INPUTS -l LABELS -o OUT``
    does; returns the ``Summary`` (``exit_code`` is the command's). Reruns resume.

    ``from_list``: a file of image paths, one a line ('-': standard input); ``root``: output paths
    relative to it; ``shard``: ``"I/N"`` (default: a Slurm array's task), then
    ``seglabel merge OUT``. ``options``: annotate's other flags by name (``method``,
    ``pretrained``, ``short_side``, ``protocol="paper"``, ``overlay``, ``batch_size``,
    ``device``...; see ``recipe.make_recipe``). ``progress``: a tqdm bar; ``on_start(n)`` is
    called with the number of images once the model is ready, ``on_image(item, error)`` after
    each image labelled or failed (error None on success); ``argv`` is what run.json records as
    the command (default: this process's)."""
    run = _start(inputs, labels, out, model, from_list, root, shard, options)
    ready = prepare(run.recipe, run.checked)
    if on_start is not None:
        on_start(len(run.found.items))
    bar = _bar(len(run.found.items)) if progress else None

    def each(item: ImageItem, error: str | None) -> None:
        if bar is not None:
            bar.update(1)
        if on_image is not None:
            on_image(item, error)

    try:
        return annotate(run.found.items, ready.segmenter, ready.labelset, ready.config, run.found.problems, each,
                        argv, skipped_outputs=run.found.skipped_outputs)
    finally:
        if bar is not None:
            bar.close()


def plan_folders(inputs: Paths = (), labels: str | Path | LabelSet | None = None, out: str | Path = "labels", *,
                 model: str = DEFAULT_MODEL, from_list: str | Path | None = None, root: str | Path | None = None,
                 shard: str | tuple[int, int] | None = None, **options: Any) -> DryRun:
    """``label_folders``' dry run (``seglabel annotate --dry-run``): every check a run makes before
    loading the model, and the header of each image still to label; what would be labelled, what
    is done, what is kept, and every problem a run would report. Loads no model, writes nothing."""
    run = _start(inputs, labels, out, model, from_list, root, shard, options)
    planned = dry_run(run.recipe, run.found.items, run.checked)
    planned.problems[:0] = run.found.problems
    return planned


@dataclass
class _Started:
    recipe: Recipe
    checked: Checked
    found: Inputs


def _start(inputs: Paths, labels: str | Path | LabelSet | None, out: str | Path, model: str,
           from_list: str | Path | None, root: str | Path | None, shard: str | tuple[int, int] | None,
           options: dict[str, Any]) -> _Started:
    """The checks of a run before its model is built, in the command's order, and its inputs."""
    inputs = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs or [])
    if labels is None:
        raise UsageError("give the label set (--labels FILE)")
    if not inputs and from_list is None:
        raise UsageError("give image files or folders, or --from-list")
    if isinstance(shard, tuple):
        shard = "/".join(map(str, shard))
    shard_spec = parse_shard(shard)
    recipe = make_recipe(labels, out, model=model, part=shard_part(shard_spec), **options)
    checked = check(recipe)  # options, output folder, device, label set, model spec, settings in out
    listed = read_lines(os.fspath(from_list)) if from_list is not None else []
    found = find_images(inputs, listed, exclude=[out], root=root)
    found.items = select_shard(found.items, shard_spec)
    if shard_spec and shard_spec[0] != 0:
        found.problems = []  # unreadable list entries are reported once, by shard 0
    if not found.items and not found.problems:
        skipped = f"; {len(found.skipped_outputs)} seglabel output folders skipped" if found.skipped_outputs else ""
        raise UsageError("no images found (looked for " + ", ".join(sorted(IMAGE_SUFFIXES)) + skipped + ")")
    return _Started(recipe, checked, found)


def _bar(total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="labelling", unit="image", dynamic_ncols=True)
