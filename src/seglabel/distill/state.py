"""The files of a distill run folder and the state that makes a run resumable.

``last.pt`` (model, optimizer, schedule, iteration, RNG, config) is saved every --save-every
iterations and on Ctrl-C or SIGTERM; ``student.pt`` (models/deeplab.py's format) and
``config.json`` are written once the plan is resolved and at the end; ``log.jsonl`` gets a line
per --log-every iterations. Every file is written atomically (writers.atomic_path): a kill leaves
the previous version or the new one, whole. A write that fails (a full disk, a file-size limit)
is one line naming the file and the cause (writers.OutputError), never torch's own message.
"""
from __future__ import annotations

import io
import json
import random
from dataclasses import asdict
from pathlib import Path
from typing import IO, Any

import torch

from ..checkpoints import CheckpointError, load_weights
from ..errors import UsageError
from ..writers import OutputError, atomic_path, temporary_target, write_bytes, write_json
from .config import BEFORE, RESUME_KEYS, DistillConfig

LAST, STUDENT, LOG, CONFIG = "last.pt", "student.pt", "log.jsonl", "config.json"
LAST_FORMAT = "seglabel-distill-state/1"
_LAST_KEYS = ("model", "optimizer", "iteration", "rng", "config")


def save(path: Path, obj: dict[str, Any]) -> None:
    """A checkpoint serialised in memory first, then written like every other file: atomic, flushed
    to disk, and a failed write named with its cause."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_bytes(path, buffer.getvalue())


def config_dict(cfg: DistillConfig) -> dict[str, Any]:
    return json.loads(json.dumps(asdict(cfg)))  # plain lists/str/numbers: weights_only can read it


def write_config(out: Path, cfg: DistillConfig, extra: dict[str, Any]) -> None:
    write_json(out / CONFIG, {**config_dict(cfg), **extra})


class Log:
    """log.jsonl, appended; a failed write is one line naming the file."""

    def __init__(self, path: Path):
        self.path = path
        self.file: IO[str] | None = None

    def write(self, record: dict[str, Any]) -> None:
        try:
            if self.file is None:
                self.file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        except OSError as e:
            raise OutputError(f"{self.path}: cannot write ({e.strerror or e})") from None

    def close(self) -> None:
        if self.file is not None:
            try:
                self.file.close()
            except OSError:
                pass  # a failed flush was reported by write


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": _plain(random.getstate())}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _plain(x):
    return [_plain(v) for v in x] if isinstance(x, (tuple, list)) else x


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, list) else x


def read_last(path: Path) -> dict[str, Any]:
    """last.pt, checked enough that resuming cannot fail deep inside with a KeyError."""
    last = load_weights(path)
    if not isinstance(last, dict):
        raise CheckpointError(f"{path}: not a distill checkpoint (holds a {type(last).__name__}); "
                              f"delete it or use another --out")
    missing = [k for k in _LAST_KEYS if k not in last]
    if missing:
        raise CheckpointError(f"{path}: not a whole distill checkpoint (no {', '.join(missing)}); "
                              f"delete it or use another --out")
    if not isinstance(last["config"], dict) or not isinstance(last["model"], dict) \
            or not isinstance(last["iteration"], int) or isinstance(last["iteration"], bool):
        raise CheckpointError(f"{path}: not a distill checkpoint (config, model or iteration malformed); "
                              f"delete it or use another --out")
    return last


def saved_schedule(last: dict[str, Any]) -> list[list[int]]:
    saved = last.get("schedule")
    if isinstance(saved, list) and saved and all(isinstance(s, list) and len(s) == 2 for s in saved):
        return [[int(a), int(b)] for a, b in saved]
    return [[0, int(last["config"].get("iters") or last["iteration"] or 1)]]  # before schedules were saved


def check_resumable(cfg: DistillConfig, last: dict[str, Any], path: Path) -> list[list[int]]:
    """The lr schedule to go on with; refuses (one line) settings a resumed run may not change.
    A larger ``--iters`` continues training: the schedule gets a new stretch [iteration, iters]."""
    saved, now = last["config"], config_dict(cfg)
    if isinstance(saved.get("student"), dict):  # how the student labels does not change its training
        saved = {**saved, "student": {k: v for k, v in saved["student"].items() if k != "upsample"}}
        now = {**now, "student": {k: v for k, v in now["student"].items() if k != "upsample"}}
    keys = list(RESUME_KEYS)
    if "student" not in saved:  # written before the architecture was recorded whole
        keys = [k for k in keys if k not in ("student", "arch")] + ["depth"]
    keys = [k for k in keys if k in saved or k not in ("backbone_weights", "teacher_labels")]  # newer than it
    diff = [f"{k} {saved.get(k, BEFORE.get(k))!r} -> {now[k]!r}" for k in keys
            if saved.get(k, BEFORE.get(k)) != now[k]]
    schedule = saved_schedule(last)
    planned, done = schedule[-1][1], int(last["iteration"])
    if cfg.iters < planned:
        diff.append(f"iters {planned} -> {cfg.iters} (it can only grow: training continues)")
    if diff:
        raise UsageError(f"{path}: made with other settings ({'; '.join(diff)}); use another --out "
                         f"or delete it to start over")
    if cfg.iters > planned:
        schedule = [*(s for s in schedule if s[0] < done), [done, cfg.iters]]
    return schedule


def remove_leftovers(out: Path) -> None:
    """Our temporary files of a run killed while saving (``.last.pt.seglabel-XXXXXXXX.tmp``);
    a user's own ``.*.tmp`` files in the folder are left alone."""
    for tmp in out.glob(".*.tmp"):
        if temporary_target(tmp.name) in (LAST, STUDENT, CONFIG, LOG):
            try:
                tmp.unlink()
            except OSError:
                pass


def trim_log(path: Path, last_iteration: int) -> None:
    """On resume, keep the log records up to the checkpoint: the iterations after it are run again,
    so the log reads as one uninterrupted run (a line cut short by a kill goes too)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("iter"), int) and record["iter"] <= last_iteration:
            kept.append(line + "\n")
    with atomic_path(path) as tmp:
        tmp.write_text("".join(kept), encoding="utf-8")
