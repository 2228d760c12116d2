"""Several runs, one output folder: shards, their run records, the lock, the settings check.

A whole run records itself in ``OUT/run.json`` and writes ``coco.json``. A part of a job (a
shard ``I/N`` or a Ray actor) records itself in ``OUT/runs/<part>.json`` and leaves
``coco.json`` to ``merge``, which checks that every shard finished with the same settings.
Locks (``fcntl.flock`` on ``OUT/.lock``; in a bucket, leases: outputs.py): a whole run or a merge
holds it exclusively; parts hold it shared plus their own part lock exclusively, so shards run side
by side but never twice, and never beside a whole run. ``OUT`` is a folder or a bucket prefix
(``outputs.open_out``).

Labels made with other settings never mix into one folder: the run records hold the settings,
and every per-image record their fingerprint (``settings_id``), so deleting ``run.json`` does
not let another command's labels in. Weights count by content (``checkpoints.content_id``).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence, TypeVar

from .checkpoints import content_id
from .errors import UsageError
from .labelset import LabelSet
from .layout import RECORDS, RUN_FILE, RUNS
from .outputs import Out, OutputBusy, open_out

if TYPE_CHECKING:
    from .predict import Protocol

_SHARD = re.compile(r"^shard-(\d+)-of-(\d+)$")
T = TypeVar("T")


class RunError(UsageError):
    """The output folder cannot be used as asked (busy, or shards missing for a merge)."""


class SettingsMismatch(UsageError):
    """``--out`` holds labels made with other settings; mixing them would corrupt the set."""


def check_owned(out: str | Path | Out) -> None:
    """Refuse an ``--out`` that holds files under seglabel's output names (``masks/``,
    ``coco.json``...) that seglabel did not write: a run there would replace them. Checked before
    anything is written, so the refusal changes nothing."""
    out = open_out(out)
    held = out.foreign_outputs()
    if held:
        shown = [name + "/" if name not in (RUN_FILE, "coco.json") and not name.endswith("/") else name for name in held]
        raise RunError(f"--out {out.shown()}: holds {', '.join(shown)} that seglabel did not write (no run.json or "
                       f"records of a seglabel run), and a run would replace them; nothing was changed: give another "
                       f"--out (a new or empty folder, e.g. {out.shown('seglabel')}), or move those files away")


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


def run_settings(labelset: LabelSet, model: str, pretrained: str | None, protocol: Protocol | None,
                 min_confidence: float | None, method: dict[str, Any] | None = None) -> dict[str, Any]:
    """What decides a run's labels, the one schema of the settings (run records, ``settings_id``):
    the label set, the model and weights (``model_identity``), the method (``describe()`` of the
    segmenter), the protocol and the confidence threshold. Parts not known yet (``method``, or
    ``protocol`` None: before the model is built) are left out; ``check_settings`` compares the
    keys given."""
    settings: dict[str, Any] = {"labelset": labelset.fingerprint(), **model_identity(model, pretrained)}
    if method is not None:
        settings["method"] = method
    if protocol is not None:
        settings["protocol"] = asdict(protocol)
    settings["min_confidence"] = labelset.min_confidence if min_confidence is None else min_confidence
    return settings


def settings_id(settings: Mapping[str, Any]) -> str:
    """A short fingerprint of the settings; every per-image record carries it."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def check_settings(out: str | Path | Out, settings: Mapping[str, Any], per_image: bool = True) -> None:
    """Refuse to mix labels made with other settings into ``out`` (whole runs and shards alike).

    The run records are compared on the keys of ``settings`` (a dry run knows only some); with
    ``per_image``, so is the ``settings_id`` of every per-image record (a record starts with it)."""
    out = open_out(out)
    settings = json.loads(json.dumps(settings))  # as stored: tuples become lists
    for _, record in read_records(out):
        previous = record.get("settings")
        if previous:
            changed = sorted(k for k in settings if previous.get(k) != settings[k])
            if changed:
                raise SettingsMismatch(
                    f"{out.shown()}: holds labels made with other settings (changed: {', '.join(changed)}); "
                    f"use another --out, or delete {out.shown()} to start over")
    if not per_image:
        return
    expected = settings_id(settings)
    records = sorted(rel for rel in out.listing(RECORDS) if rel.endswith(".json"))
    for rel, head in out.read_heads(records, 200):
        m = re.search(rb'"settings_id": "([0-9a-f]+)"', head or b"")
        found = m[1].decode() if m else None  # records older than the fingerprint: the run records decide
        if found not in (None, expected):
            raise SettingsMismatch(
                f"{out.shown()}: {rel} was labelled with other settings (settings {found}, this command's "
                f"{expected}); use another --out, or delete {out.shown()} to start over")


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


def record_path(part: str | None) -> str:
    """Where a run (``part`` None) or a part of a job records itself, relative to the output."""
    return RUN_FILE if part is None else f"{RUNS}/{part}.json"


def read_records(out: str | Path | Out) -> Iterator[tuple[str | None, dict[str, Any]]]:
    """(part, record) of every readable run record in ``out`` (the whole run's part is None)."""
    out = open_out(out)
    parts = sorted(rel for rel in out.listing(RUNS) if rel.endswith(".json") and rel.count("/") == 1)
    for part, rel in [(None, RUN_FILE)] + [(rel[len(RUNS) + 1:-5], rel) for rel in parts]:
        try:
            record = json.loads(out.read_bytes(rel).decode("utf-8"))
        except (OSError, ValueError):
            continue  # absent, or damaged by a crash outside our atomic writes: rewritten later
        if isinstance(record, dict):
            yield part, record


@contextmanager
def run_lock(out: str | Path | Out, part: str | None) -> Iterator[None]:
    """Hold the output for a run (``part`` None: the whole of it) or for one part."""
    try:
        with open_out(out).lock(part):
            yield
    except OutputBusy as e:
        raise RunError(str(e)) from None


def unfinished_shards(out: str | Path | Out) -> tuple[int, list[str]]:
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
