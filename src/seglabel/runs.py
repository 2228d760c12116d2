"""Several runs, one output folder: shards, their run records, the lock, the settings check.

A whole run records itself in ``OUT/run.json`` and writes ``coco.json``. A part of a job (a
shard ``I/N`` or a Ray actor) records itself in ``OUT/runs/<part>.json`` and leaves
``coco.json`` to ``merge``, which checks that every shard finished with the same settings.
Locks (``fcntl.flock`` on ``OUT/.lock``): a whole run or a merge holds it exclusively; parts
hold it shared plus their own part lock exclusively, so shards run side by side but never
twice, and never beside a whole run.

Labels made with other settings never mix into one folder: the run records hold the settings,
and every per-image record their fingerprint (``settings_id``), so deleting ``run.json`` does
not let another command's labels in. Weights count by content (``checkpoints.content_id``).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence, TypeVar

from .checkpoints import content_id
from .errors import UsageError
from .layout import RECORDS, RUN_FILE, RUNS, foreign_outputs

LOCK_FILE = ".lock"
_SHARD = re.compile(r"^shard-(\d+)-of-(\d+)$")
T = TypeVar("T")


class RunError(UsageError):
    """The output folder cannot be used as asked (busy, or shards missing for a merge)."""


class SettingsMismatch(UsageError):
    """``--out`` holds labels made with other settings; mixing them would corrupt the set."""


def check_owned(out: Path) -> None:
    """Refuse an ``--out`` that holds files under seglabel's output names (``masks/``,
    ``coco.json``...) that seglabel did not write: a run there would replace them. Checked before
    anything is written, so the refusal changes nothing."""
    held = foreign_outputs(out)
    if held:
        raise RunError(f"--out {out}: holds {', '.join(held)} that seglabel did not write (no run.json or records "
                       f"of a seglabel run), and a run would replace them; nothing was changed: give another --out "
                       f"(a new or empty folder, e.g. {Path(out) / 'seglabel'}), or move those files away")


def model_identity(spec: str, pretrained: str | None) -> dict[str, Any]:
    """The model and weights as the settings know them: files by content, tags by name. A model
    kind whose spec names a file (``lseg:FILE``, ``student:FILE``) is known by that file."""
    kind, _, what = spec.partition(":")
    if what and os.path.isfile(what):
        return {"model": f"{kind}:{_content(what)}", "weights": _content(what)}
    return {"model": spec, "weights": _content(pretrained) if pretrained and os.path.isfile(pretrained) else pretrained}


def _content(path: str) -> str:
    try:
        return content_id(path)
    except OSError as e:
        raise UsageError(f"{path}: cannot read ({e.strerror or type(e).__name__})") from None


def settings_id(settings: Mapping[str, Any]) -> str:
    """A short fingerprint of the settings; every per-image record carries it."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def check_settings(out: Path, settings: Mapping[str, Any], per_image: bool = True) -> None:
    """Refuse to mix labels made with other settings into ``out`` (whole runs and shards alike).

    The run records are compared on the keys of ``settings`` (a dry run knows only some); with
    ``per_image``, so is the ``settings_id`` of every per-image record (a record starts with it)."""
    settings = json.loads(json.dumps(settings))  # as stored: tuples become lists
    for _, record in read_records(out):
        previous = record.get("settings")
        if previous:
            changed = sorted(k for k in settings if previous.get(k) != settings[k])
            if changed:
                raise SettingsMismatch(
                    f"{out}: holds labels made with other settings (changed: {', '.join(changed)}); "
                    f"use another --out, or delete {out} to start over")
    if not per_image:
        return
    expected = settings_id(settings)
    for folder, dirs, files in os.walk(out / RECORDS):
        for name in files:
            if name.endswith(".json") and not name.startswith("."):
                found = _record_settings_id(os.path.join(folder, name))
                if found not in (None, expected):
                    raise SettingsMismatch(
                        f"{out}: {os.path.relpath(os.path.join(folder, name), out)} was labelled with other "
                        f"settings (settings {found}, this command's {expected}); use another --out, "
                        f"or delete {out} to start over")


def _record_settings_id(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            head = f.read(200)
    except OSError:
        return None
    m = re.search(rb'"settings_id": "([0-9a-f]+)"', head)
    return m[1].decode() if m else None  # records older than the fingerprint: the run records decide


def parse_shard(text: str | None, env: Mapping[str, str] = os.environ) -> tuple[int, int] | None:
    """``"I/N"`` (I from 0) -> (I, N). Without one, a Slurm job array's task id and count are used
    (the id counted from ``SLURM_ARRAY_TASK_MIN``, so arrays ``--array=1-8`` work too)."""
    if text is None:
        if "SLURM_ARRAY_TASK_ID" not in env or "SLURM_ARRAY_TASK_COUNT" not in env:
            return None
        names = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_COUNT")
        task, low, count = (_env_int(env, name) for name in names)
        if not 0 <= task - low < count:
            shown = ", ".join(f"{n}={env.get(n, '0')}" for n in names)
            raise UsageError(f"the Slurm array ({shown}) gives no shard I/N with 0 <= I < N; pass --shard I/N")
        return task - low, count
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m or not int(m[1]) < int(m[2]):
        raise UsageError(f"--shard '{text}' must be I/N with 0 <= I < N (e.g. 0/8)")
    return int(m[1]), int(m[2])


def _env_int(env: Mapping[str, str], name: str) -> int:
    value = env.get(name, "0")
    if not re.fullmatch(r"\s*\d+\s*", value):
        raise UsageError(f"environment variable {name}={value!r} is not a whole number "
                         f"(seglabel reads it for --shard); fix it, or pass --shard I/N")
    return int(value)


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
