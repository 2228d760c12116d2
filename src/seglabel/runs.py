"""Several runs, one output folder: shards, their run records, the lock, and the merge.

A whole run records itself in ``OUT/run.json`` and writes ``coco.json``. A part of a job (a
shard ``I/N`` or a Ray actor) records itself in ``OUT/runs/<part>.json`` and leaves
``coco.json`` to ``merge``, which checks that every shard finished with the same settings.
Locks (``fcntl.flock`` on ``OUT/.lock``): a whole run or a merge holds it exclusively; parts
hold it shared plus their own part lock exclusively, so shards run side by side but never
twice, and never beside a whole run.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence, TypeVar

from .writers import RUN_FILE

RUNS = "runs"
LOCK_FILE = ".lock"
_SHARD = re.compile(r"^shard-(\d+)-of-(\d+)$")
T = TypeVar("T")


class RunError(ValueError):
    """The output folder cannot be used as asked (busy, or shards missing for a merge)."""


def parse_shard(text: str | None, env: Mapping[str, str] = os.environ) -> tuple[int, int] | None:
    """``"I/N"`` (I from 0) -> (I, N). Without one, a Slurm job array's task id and count are used
    (the id counted from ``SLURM_ARRAY_TASK_MIN``, so arrays ``--array=1-8`` work too)."""
    if text is None:
        if "SLURM_ARRAY_TASK_ID" not in env or "SLURM_ARRAY_TASK_COUNT" not in env:
            return None
        index = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
        text = f"{index}/{env['SLURM_ARRAY_TASK_COUNT']}"
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m or not int(m[1]) < int(m[2]):
        raise ValueError(f"--shard '{text}' must be I/N with 0 <= I < N (e.g. 0/8)")
    return int(m[1]), int(m[2])


def select_shard(items: Sequence[T], shard: tuple[int, int] | None) -> list[T]:
    """Every N-th item of the sorted inputs from the I-th: shards get equal shares of each folder."""
    if shard is None:
        return list(items)
    index, count = shard
    return list(items[index::count])


def shard_part(shard: tuple[int, int] | None) -> str | None:
    return None if shard is None or shard == (0, 1) else f"shard-{shard[0]}-of-{shard[1]}"


def record_path(out: Path, part: str | None) -> Path:
    return out / RUN_FILE if part is None else out / RUNS / f"{part}.json"


def read_records(out: Path) -> Iterator[tuple[str | None, dict[str, Any]]]:
    """(part, record) of every readable run record in ``out`` (the whole run's part is None)."""
    paths = [(None, out / RUN_FILE)] + [(p.stem, p) for p in sorted((out / RUNS).glob("*.json"))]
    for part, path in paths:
        try:
            yield part, json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # absent, or damaged by a crash outside our atomic writes: rewritten later


@contextmanager
def run_lock(out: Path, part: str | None) -> Iterator[None]:
    """Hold the output folder for a run (``part`` None: the whole folder) or for one part."""
    out.mkdir(parents=True, exist_ok=True)
    held = []
    try:
        held.append(_flock(out / LOCK_FILE, exclusive=part is None, what=f"{out}"))
        if part is not None:
            (out / RUNS).mkdir(exist_ok=True)
            held.append(_flock(out / RUNS / f".{part}.lock", exclusive=True, what=f"{out} ({part})"))
        yield
    finally:
        for fd in reversed(held):
            os.close(fd)  # closing releases the lock; the empty lock files stay, harmlessly


def _flock(path: Path, exclusive: bool, what: str) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RunError(f"{what}: another seglabel run is writing here; wait for it, or use another --out") from None
    return fd


def unfinished_shards(out: Path) -> tuple[int, list[str]]:
    """(number of shards, problems) from ``OUT/runs``: missing or unfinished shards."""
    shards: dict[int, dict[str, Any]] = {}
    counts = set()
    for part, record in read_records(out):
        m = _SHARD.match(part or "")
        if m:
            shards[int(m[1])] = record
            counts.add(int(m[2]))
    if len(counts) > 1:
        return 0, [f"shards of different counts ({', '.join(map(str, sorted(counts)))}) share this folder"]
    count = counts.pop() if counts else 0
    problems = [f"shard {i}/{count} has not run" for i in range(count) if i not in shards]
    problems += [f"shard {i}/{count} is {r.get('status')}" for i, r in sorted(shards.items())
                 if r.get("status") != "done"]
    return count, problems
