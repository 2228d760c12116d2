"""``seglabel distill``'s training: the plan, the pieces it asks for, then one loop, top to bottom.

Per iteration: the batch (with an online teacher, its labels for these very crops; with a cached
one, its labels came with the crop), the least sure teacher pixels ignored, the masks a person
corrected kept as written in place of any teacher's (``student_targets``), poly lr, forward,
cross-entropy on logits upsampled to the crop (+ the colour-affinity term), SGD step; now and then
log, validate and save. ``student.pt`` at the end holds what ``annotate --model student:PATH``
needs. Resuming from ``out/last.pt`` continues exactly where it stopped (state.py).
"""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..models.deeplab import DeepLabV2Student, StudentArch, encode_labelset, student_checkpoint
from .backbone import init_backbone
from .cache import TeacherCache
from .config import DistillConfig, scheduled_lr
from .dataset import Augment, PairDataset, SampleNumbers, worker_init
from .loss import colour_affinity_loss, segmentation_loss
from .plan import Plan, plan
from .progress import Progress
from .state import (LAST, LAST_FORMAT, LOG, STUDENT, Log, config_dict, read_last, remove_leftovers, rng_state,
                    save, saved_schedule, set_rng_state, trim_log, write_config)
from .teacher import Teacher, build_teacher, ignore_least_sure

log = logging.getLogger("seglabel")


def train(cfg: DistillConfig | Plan, on_iteration: Callable[[int, DeepLabV2Student], None] | None = None,
          progress_bar: bool | None = None) -> Path:
    """Train (or resume, or continue to a larger ``iters``) and write ``out/student.pt``; returns its
    path. ``on_iteration(it, model)`` runs after each iteration (tests interrupt with it).
    ``progress_bar``: a tqdm bar (None: unless ``cfg.quiet``; the CLI logs lines instead)."""
    p = cfg if isinstance(cfg, Plan) else plan(cfg)
    cfg, out, main = p.cfg, p.out, p.rank == 0
    device = _processes(p)
    torch.manual_seed(cfg.seed)
    model = _student(p).to(device)
    teacher = build_teacher(p.teacher, p.labelset, device, p.run.get("settings") if _from_record(p) else None,
                            p.run_source) if p.teacher else None
    if main:  # the first write: every refusal is behind us
        p.scan.report()
        out.mkdir(parents=True, exist_ok=True)
        remove_leftovers(out)
        write_config(out, cfg, _recorded(p, teacher))
    cache = _cache(p, teacher) if p.teacher_labels == "cached" else None
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    start, schedule = _resume(p, model, optimizer)
    net = _parallel(model, device, p.world)
    loader = _loader(p, model, cache, start, device)
    use_amp = cfg.amp and device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    ignore, online = p.labelset.ignore_index, teacher is not None and p.teacher_labels == "online"
    mean = torch.tensor(model.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(model.std, device=device).view(1, 3, 1, 1)

    def state(iteration: int) -> dict[str, Any]:
        return {"format": LAST_FORMAT, "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                "optimizer": optimizer.state_dict(), "schedule": schedule, "iteration": iteration,
                "rng": rng_state(), "config": config_dict(cfg)}

    if main:
        trim_log(out / LOG, start)  # from 0: a log left by a run killed before its first checkpoint
    progress = Progress(cfg, start, schedule, p.last, Log(out / LOG) if main else None,
                        bar=main and (not cfg.quiet if progress_bar is None else progress_bar))
    it = start
    try:
        net.train()
        for images, written, sure, corrected in loader:
            images, written, sure, corrected = (t.to(device, non_blocking=True)
                                                for t in (images, written, sure, corrected))
            inside = written != ignore  # the image, not the crop's padding (nor a corrected mask's ignore)
            labels = written
            if online and (not cfg.self_train_after or it < cfg.self_train_after):
                labels, sure = teacher.crops(images, written, model.mean, model.std, ignore, cfg.min_confidence)
            if cfg.self_train_after and it >= cfg.self_train_after:
                labels, sure = _self_labels(model, images, written, ignore), sure[:0]
            target = student_targets(written, corrected, labels, sure, cfg.ignore_unsure, ignore)
            lr = scheduled_lr(it, schedule, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                logits = net(images)
            loss = segmentation_loss(logits, target, ignore)
            if cfg.affinity_weight > 0:  # colour decides where the teacher is silent
                unlabelled = (target == ignore) & inside
                loss = loss + cfg.affinity_weight * colour_affinity_loss(logits, images * std + mean, inside,
                                                                         unlabelled, cfg.affinity_sigma)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss became {loss.item()} at iteration {it}; try a lower --lr")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            it += 1
            if main:
                progress.step(it, loss.item(), lr)
                if cfg.val_images and (it % cfg.val_every == 0 or it == cfg.iters):
                    progress.validation(it, model, p.labelset)
                    net.train()
                if it % cfg.save_every == 0 and it < cfg.iters:
                    save(out / LAST, state(it))
            if on_iteration:
                on_iteration(it, model)
    except KeyboardInterrupt:
        if main:
            save(out / LAST, state(it))
            log.info(f"interrupted at iteration {it}: saved {out / LAST}; run the same command to resume")
        raise
    finally:
        progress.close()
    if main:
        extra = {"iters": cfg.iters, "pseudo": cfg.pseudo, "teacher": cfg.teacher, "argv": cfg.argv,
                 "base_size": cfg.base_size, "crop": cfg.crop}
        save(out / STUDENT, student_checkpoint(model, p.labelset, extra))
        save(out / LAST, state(it))
        log.info(f"student written to {out / STUDENT} (label with --model student:{out / STUDENT}; it labels at "
                 f"short side {cfg.base_size} unless given --short-side)")
    if p.world > 1:
        dist.barrier()
    return out / STUDENT


# -- the pieces ------------------------------------------------------------------------------------
def _processes(p: Plan) -> torch.device:
    """torchrun's process group (gloo or NCCL) and this process's device."""
    import os

    if p.world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if p.device.type == "cuda" else "gloo")
    if p.device.type == "cuda" and p.world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", p.rank)))
        torch.cuda.set_device(device)
        return device
    return p.device


def _student(p: Plan) -> DeepLabV2Student:
    model = DeepLabV2Student(StudentArch.from_dict(p.cfg.student), p.clip_spec)
    message = init_backbone(model, p.cfg.backbone_weights, p.cfg.cache_dir)
    if p.rank == 0:
        log.info(message)
    model.set_text(encode_labelset(p.clip_spec, p.labelset, cache_dir=p.cfg.cache_dir), p.labelset)
    return model


def _from_record(p: Plan) -> bool:
    return bool(p.run) and p.cfg.teacher == p.run.get("model")


def _recorded(p: Plan, teacher: Teacher | None) -> dict[str, Any]:
    """What config.json says beyond the settings: where the defaults come from, the teacher as built."""
    extra: dict[str, Any] = {"defaults": {"device": p.device.type, "measured": p.defaults.measured},
                             "corrected_images": p.scan.corrected}  # a person's masks, trained on as written
    if teacher is not None:
        extra["teacher_settings"] = {"method": teacher.model.describe(), "protocol": dataclasses.asdict(teacher.protocol),
                                     "rebuilt_from": p.run_source if _from_record(p) else None}
    return extra


def _cache(p: Plan, teacher: Teacher) -> TeacherCache:
    """Every photo labelled at every scale level, before training (each rank its share)."""
    cache = TeacherCache(p.out, p.levels, p.cfg.base_size)
    identity = {"model": p.cfg.teacher, "settings": _recorded(p, teacher)["teacher_settings"]}
    t0 = time.perf_counter()
    photos = [(pair.key, pair.image) for pair in p.scan.pairs if not pair.corrected]  # a person's: no teacher
    n = cache.build(teacher, photos, identity, p.rank, p.world,
                    barrier=dist.barrier if p.world > 1 else lambda: None)
    if n:
        log.info(f"teacher: {n} photo labellings in {time.perf_counter() - t0:.0f} s")
    if p.world > 1:
        dist.barrier()
    return cache


def _resume(p: Plan, model: DeepLabV2Student, optimizer: torch.optim.Optimizer) -> tuple[int, list[list[int]]]:
    if p.last is None:
        return 0, p.schedule
    model.load_state_dict(p.last["model"])
    optimizer.load_state_dict(p.last["optimizer"])
    set_rng_state(p.last["rng"])
    return int(p.last["iteration"]), p.schedule


def _parallel(model: DeepLabV2Student, device: torch.device, world: int) -> torch.nn.Module:
    if world == 1:
        return model
    net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model) if device.type == "cuda" else model  # MaskCLIP+'s SyncBN
    return torch.nn.parallel.DistributedDataParallel(net, device_ids=[device] if device.type == "cuda" else None)


def _loader(p: Plan, model: DeepLabV2Student, cache: TeacherCache | None, start: int, device: torch.device):
    cfg = p.cfg
    aug = Augment(crop=cfg.crop, base_size=cfg.base_size, scale_range=(cfg.scale_min, cfg.scale_max),
                  photometric=cfg.photometric)
    data = PairDataset(p.scan.pairs, aug, model.mean, model.std, p.labelset.ignore_index, cfg.seed,
                       min_confidence=cfg.min_confidence, cache=cache)
    return torch.utils.data.DataLoader(
        data, batch_size=cfg.batch_size // p.world, num_workers=cfg.workers, worker_init_fn=worker_init,
        sampler=SampleNumbers(start, cfg.iters, cfg.batch_size, p.rank, p.world),
        pin_memory=device.type == "cuda", persistent_workers=False)


def student_targets(written: torch.Tensor, corrected: torch.Tensor, labels: torch.Tensor, sure: torch.Tensor,
                    ignore_unsure: float, ignore_index: int) -> torch.Tensor:
    """What the student learns from: the teacher's ``labels`` (its least sure ``ignore_unsure``
    fraction ignored, ranked among its own pixels only), except on the samples a person corrected
    (``corrected``, one flag per sample), whose masks stay as ``written``, ignored pixels included.
    (An online teacher labels their crops with the others, and that is thrown away: one batch.)"""
    taught = ~corrected.view(-1, 1, 1)
    if ignore_unsure and sure.numel():
        labels = ignore_least_sure(torch.where(taught, labels, ignore_index), sure, ignore_unsure, ignore_index)
    return torch.where(taught, labels, written)


@torch.no_grad()
def _self_labels(model: DeepLabV2Student, images, target, ignore_index: int) -> torch.Tensor:
    """Self-training: the student's own argmax replaces the pseudo-labels (padding stays ignored)."""
    model.eval()
    try:
        logits = F.interpolate(model(images).float(), size=images.shape[-2:], mode="bilinear", align_corners=False)
    finally:
        model.train()
    return torch.where(target == ignore_index, ignore_index, logits.argmax(1))


__all__ = ["train", "student_targets", "LAST", "STUDENT", "LOG", "read_last", "saved_schedule"]
