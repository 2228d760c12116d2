"""What a distill run tells while it trains: a line (and a log.jsonl record) every --log-every
iterations, the validation mIoU, and for the Python API a tqdm progress bar (Jupyter included).

Lines go to ``logging.getLogger("seglabel")`` at INFO: the command line prints them unless
--quiet; from Python they show once a handler is configured. Warnings (skipped images) always do.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from ..labelset import LabelSet
from ..models.deeplab import DeepLabV2Student
from .config import DistillConfig, scheduled_lr
from .state import Log, saved_schedule

log = logging.getLogger("seglabel")


class Progress:
    def __init__(self, cfg: DistillConfig, start: int, schedule: list[list[int]], last: dict[str, Any] | None,
                 logfile: Log | None, bar: bool):
        self.cfg, self.logfile = cfg, logfile
        self.tick, self.tick_it, self.t0 = time.perf_counter(), start, time.perf_counter()
        if last is not None and schedule != saved_schedule(last):
            lr = scheduled_lr(start, schedule, cfg)
            log.info(f"continuing {Path(cfg.out) / 'last.pt'} from iteration {start} to {cfg.iters}: the poly "
                     f"schedule now ends at {cfg.iters} (lr {lr:.5f} from here)")
            if logfile:
                logfile.write({"iter": start, "event": "continued", "iters": cfg.iters, "schedule": schedule, "lr": lr})
        elif last is not None:
            log.info(f"resuming from {Path(cfg.out) / 'last.pt'} at iteration {start}/{cfg.iters}")
        self.bar = None
        if bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=cfg.iters, initial=start, desc="distill", unit="it", dynamic_ncols=True)

    def step(self, it: int, loss: float, lr: float) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.5f}", refresh=False)
        if it % self.cfg.log_every and it != self.cfg.iters:
            return
        now = time.perf_counter()
        speed = (it - self.tick_it) / max(now - self.tick, 1e-9)
        self.tick, self.tick_it = now, it
        record = {"iter": it, "loss": round(loss, 5), "lr": lr, "it_per_s": round(speed, 4),
                  "eta_s": round((self.cfg.iters - it) / max(speed, 1e-9)), "elapsed_s": round(now - self.t0, 1)}
        if self.logfile:
            self.logfile.write(record)
        log.info(f"iter {it}/{self.cfg.iters}  loss {record['loss']:.4f}  lr {lr:.5f}  {speed:.2f} it/s  "
                 f"ETA {_hms(record['eta_s'])}")

    def validation(self, it: int, model: DeepLabV2Student, labelset: LabelSet) -> None:
        from .validate import validate

        miou = validate(model, self.cfg, labelset)
        if self.logfile:
            self.logfile.write({"iter": it, "val_miou": miou})
        log.info(f"iter {it}: validation mIoU {100 * miou:.2f}%")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.logfile:
            self.logfile.close()


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
