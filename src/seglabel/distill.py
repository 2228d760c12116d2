"""``seglabel distill``: train a DeepLabv2 student on pseudo-labels, as MaskCLIP+ does.

One loop, top to bottom: set up (ranks, labels, data, model, optimizer), resume from
``out/last.pt`` if it is there, then per iteration: poly lr, forward, cross-entropy on logits
upsampled to the crop (ignore index skipped), SGD step; log, validate and save now and then.
``student.pt`` at the end holds what ``annotate --model student:PATH`` needs.
"""
from __future__ import annotations

import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .checkpoints import CheckpointError, load_weights
from .distill_loss import colour_affinity_loss, segmentation_loss  # noqa: F401 - segmentation_loss: public here
from .distill_data import Augment, DataError, PairDataset, SampleNumbers, scan_pairs, worker_init
from .labelset import LabelSet, load_labelset, parse_labelset
from .models.deeplab import DeepLabV2Student, StudentArch, encode_labelset, init_backbone, student_checkpoint
from .writers import RUN_FILE, SCORES, atomic_path, temporary_target, write_json

LAST, STUDENT, LOG = "last.pt", "student.pt", "log.jsonl"
# Settings a resumed run must share with the run that wrote last.pt (the rest may change: logging,
# workers). ``iters`` may grow (training continues, the schedule stretched); see _check_resumable.
_RESUME_KEYS = ("batch_size", "crop", "base_size", "lr", "momentum", "weight_decay", "power", "min_lr",
                "arch", "student", "seed", "self_train_after", "teacher", "photometric", "scale_min",
                "scale_max", "min_confidence", "ignore_unsure", "affinity_weight", "affinity_sigma")
# What a last.pt written before a setting existed was trained with
_BEFORE = {"photometric": True, "scale_min": 0.5, "scale_max": 2.0, "min_confidence": 0.0, "ignore_unsure": 0.0,
           "affinity_weight": 0.0, "affinity_sigma": 0.1}
# Student sizes by device when --depth/--width are not given (see resolve_settings)
GPU_STUDENT = {"depth": 101, "width": 64}
CPU_STUDENT = {"depth": 18, "width": 32}
# Without backbone weights (see resolve_settings); chosen on validation scenes, distill-experiments
AFFINITY_WEIGHT, IGNORE_UNSURE = 2.5, 0.2
EPOCHS, MIN_ITERS, MAX_ITERS = 13, 1000, 8000  # default_iters


@dataclass
class DistillConfig:
    images: str
    out: str
    pseudo: str | None = None  # annotate's output folder (masks/ + run.json) or a plain mask folder
    labels: str | None = None  # label set YAML; required with a plain mask folder
    # Labels computed online on each crop by: "auto" = the model that made --pseudo (its run.json),
    # "none" = no one (train on --pseudo's masks as written), or a model spec (maskclip:ViT-B-16)
    teacher: str | None = "auto"
    clip: str | None = None  # CLIP text encoder (open_clip name); default: the pseudo-labels' run.json
    pretrained: str | None = None
    model_config: str | None = None
    cache_dir: str | None = None
    arch: str = "deeplabv2"
    depth: int | None = None  # None: GPU_STUDENT on CUDA, CPU_STUDENT elsewhere
    width: int | None = None  # channels of the first ResNet stage (64 = the standard ResNet)
    student: dict[str, Any] | None = None  # the full StudentArch; filled in by resolve_settings
    backbone_weights: str | None = None  # file | imagenet | none
    iters: int | None = None  # None: default_iters (by the number of images), or a resumed run's own
    batch_size: int = 16  # global, split across ranks
    crop: int | None = None  # None: the base size, at most 512
    base_size: int | None = None  # None: the short side the pseudo-labels were made at, else 512
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    power: float = 0.9
    min_lr: float = 1e-4
    self_train_after: int = 0  # 0: never
    photometric: bool | None = None  # mmseg's PhotoMetricDistortion; None: with an online teacher only
    scale_min: float = 0.5  # random rescale range around base_size
    scale_max: float = 2.0
    min_confidence: float = 0.0  # pseudo-label pixels the teacher was less sure of are ignored
    # Online teacher: this fraction of each batch's pixels, the least sure, ignored; None: 0.2 when
    # the colour-affinity loss is on (it decides those pixels), else 0
    ignore_unsure: float | None = None
    affinity_weight: float | None = None  # colour-affinity loss (distill_loss.py); None: AFFINITY_WEIGHT from random init, else 0
    affinity_sigma: float = 0.1  # its colour scale (RGB in [0, 1])
    save_every: int = 500
    log_every: int = 10
    val_images: str | None = None
    val_masks: str | None = None
    val_every: int = 500
    workers: int = 2
    device: str = "auto"
    amp: bool = True
    seed: int = 0
    quiet: bool = False
    argv: list[str] = field(default_factory=list)


def default_iters(images: int, batch_size: int) -> int:
    """MaskCLIP+'s schedules scale with the data: 4k iterations of batch 16 for PASCAL Context's
    4,996 images (13 passes), 8k for COCO-Stuff's 118k. Here: 13 passes, at least 1000 iterations
    (what a few hundred images need; measured on the toy world) and at most 8000."""
    return int(min(MAX_ITERS, max(MIN_ITERS, round(EPOCHS * images / batch_size))))


def poly_lr(it: int, total: int, base: float, power: float = 0.9, floor: float = 1e-4) -> float:
    """mmseg's poly schedule with a floor: (base - floor) * (1 - it/total)^power + floor."""
    return (base - floor) * (1 - min(it, total) / total) ** power + floor


def scheduled_lr(it: int, schedule: list[list[int]], cfg: "DistillConfig") -> float:
    """The lr of iteration ``it`` (0-based). ``schedule`` lists [first iteration, planned end] per
    stretch of training: one entry for a run trained in one go; a rerun with a larger ``--iters``
    appends [where it continued, the new end], so from there the poly curve is the one of a run
    planned for the new end from the start (it rises again if the old run had decayed)."""
    end = next(end for first, end in reversed(schedule) if first <= it)
    return poly_lr(it, end, cfg.lr, cfg.power, cfg.min_lr)


# -- setup ----------------------------------------------------------------------------------------
def _distributed() -> tuple[int, int, int]:
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    return rank, world, int(os.environ.get("LOCAL_RANK", rank))


def _device(name: str, local_rank: int, world: int) -> torch.device:
    from .predict import resolve_device

    device = resolve_device(name)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return device


def read_pseudo_record(cfg: DistillConfig) -> tuple[Path | None, dict[str, Any]]:
    """(mask folder or None, annotate's run record of --pseudo or {})."""
    if not cfg.pseudo:
        if cfg.teacher in (None, "auto", "none"):
            raise ValueError("give --pseudo (annotate's output or a mask folder) or --teacher maskclip:NAME")
        return None, {}
    pseudo = Path(cfg.pseudo)
    if not pseudo.is_dir():
        raise DataError(f"{pseudo}: no such folder (--pseudo)")
    masks = pseudo / "masks" if (pseudo / "masks").is_dir() else pseudo
    run: dict[str, Any] = {}
    if (pseudo / RUN_FILE).is_file():
        try:
            run = json.loads((pseudo / RUN_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise DataError(f"{pseudo / RUN_FILE}: unreadable run record ({e})") from None
        if not isinstance(run, dict):
            raise DataError(f"{pseudo / RUN_FILE}: not a run record (a JSON object)")
    return masks, run


def resolve_teacher(teacher: str | None, run: dict[str, Any]) -> str | None:
    """--teacher auto: the model recorded in --pseudo's run.json (None for a plain mask folder)."""
    if teacher in (None, "", "none"):
        return None
    if teacher == "auto":
        model = run.get("model")
        return model if isinstance(model, str) and ":" in model else None
    return teacher


def resolve_labels(cfg: DistillConfig, run: dict[str, Any]) -> tuple[LabelSet, dict[str, Any]]:
    """(label set, CLIP text encoder spec) from --pseudo's run record and flags."""
    import open_clip

    if cfg.labels:
        labelset = load_labelset(cfg.labels)
    elif "labelset" in run:
        labelset = parse_labelset(run["labelset"], source=f"{cfg.pseudo}/{RUN_FILE}")
    else:
        raise ValueError(f"{cfg.pseudo or cfg.teacher}: no run.json with a label set here; pass --labels FILE")
    if "labelset" in run and cfg.labels and parse_labelset(run["labelset"]).names != labelset.names:
        raise ValueError(f"{cfg.labels}: its classes differ from those that made {cfg.pseudo} "
                         f"({', '.join(parse_labelset(run['labelset']).names[:5])}...)")

    weights = run.get("weights") or {}
    model_config = cfg.model_config or recorded_model_config(run)
    teacher_name = cfg.teacher.partition(":")[2] if cfg.teacher else None
    name = cfg.clip or weights.get("model") or teacher_name or "ViT-B-16"
    pretrained = cfg.pretrained or weights.get("pretrained") or "openai"
    if model_config:
        from .models.clip import register_model_config

        if not Path(model_config).is_file():
            raise ValueError(f"{model_config}: no such model config (recorded in {cfg.pseudo}/{RUN_FILE}); pass --model-config")
        register_model_config(model_config)
    config = open_clip.get_model_config(name)
    if config is None:
        raise ValueError(f"unknown open_clip model '{name}' for the text encoder; pass --model-config FILE.json")
    if Path(pretrained).is_file():  # student.pt must find it from any working folder
        pretrained = str(Path(pretrained).resolve())
    return labelset, {"model": name, "pretrained": pretrained, "config": config}


def resolve_settings(cfg: DistillConfig, run: dict[str, Any], embed_dim: int, device: torch.device) -> DistillConfig:
    """``cfg`` with every automatic default made concrete; this is what last.pt and config.json
    record and what a resumed run is compared with.

    - Student size: ResNet-101 (MaskCLIP+) on CUDA; on anything else a ResNet-18 of half width,
      which trains in minutes on a CPU. A ResNet file or ``imagenet`` for the backbone keeps the
      standard width 64.
    - Base size: the short side the teacher labelled at (--pseudo's run record), so the student
      learns at the scale of its labels and, by default, labels at it (student.pt records it);
      512 (the official configs) when unknown. Crop: the base size, at most 512.
    - Photometric distortion: only with an online teacher, which labels the distorted crop.
      Offline pseudo-labels were made from the undistorted photo; recolouring the photo under
      them teaches the student that colour does not matter, while the teacher's classes may be
      told apart by colour ("a red car", "a yellow taxi"). And not with the colour-affinity loss,
      whose colour distances contrast and saturation jitter would rescale (at 0.5 a weight that
      respects edges smooths across them).
    - Colour-affinity loss and ignoring the teacher's least sure pixels: from random init, in
      place of the image prior an ImageNet backbone brings (distill_loss.py); off with
      --backbone-weights, which is MaskCLIP+'s own recipe.
    """
    cuda = device.type == "cuda"
    pretrained = cfg.backbone_weights not in (None, "", "none")
    standard = cuda or pretrained
    depth = cfg.depth or (GPU_STUDENT if cuda else CPU_STUDENT)["depth"]
    width = cfg.width or (64 if standard else CPU_STUDENT["width"])
    if cfg.student:  # tests: a whole architecture
        arch = StudentArch.from_dict({**cfg.student, "embed_dim": embed_dim})
    else:
        arch = StudentArch.resnet(depth, embed_dim, width=width, stem_width=width)
    protocol = (run.get("settings") or {}).get("protocol") or {}
    base = cfg.base_size or (int(protocol["short_side"]) if isinstance(protocol.get("short_side"), int) else 512)
    crop = cfg.crop or min(512, -(-base // 8) * 8)
    affinity = cfg.affinity_weight if cfg.affinity_weight is not None else (0.0 if pretrained else AFFINITY_WEIGHT)
    photometric = bool(cfg.teacher) and not affinity if cfg.photometric is None else cfg.photometric
    unsure = cfg.ignore_unsure if cfg.ignore_unsure is not None else (IGNORE_UNSURE if cfg.teacher and affinity else 0.0)
    return replace(cfg, depth=arch.depth, width=arch.width, student=arch.to_dict(), base_size=base, crop=crop,
                   photometric=photometric, affinity_weight=affinity, ignore_unsure=unsure)


def recorded_model_config(run: dict[str, Any]) -> str | None:
    """The open_clip model config the pseudo-labels' model was registered from: recorded in
    run.json's weights; runs recorded before that only have it on their command line."""
    recorded = (run.get("weights") or {}).get("model_config")
    return recorded if isinstance(recorded, str) else _argv_value(run.get("argv", []), "--model-config")


def _argv_value(argv: list[str], flag: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def build_model(cfg: DistillConfig, labelset: LabelSet, clip_spec: dict[str, Any], say: Callable[[str], None]) -> DeepLabV2Student:
    model = DeepLabV2Student(StudentArch.from_dict(cfg.student), clip_spec)
    say(init_backbone(model, cfg.backbone_weights))
    model.set_text(encode_labelset(clip_spec, labelset, cache_dir=cfg.cache_dir), labelset)
    return model


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": _plain(random.getstate())}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _plain(x):
    return [_plain(v) for v in x] if isinstance(x, (tuple, list)) else x


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, list) else x


def _save(path: Path, obj: dict[str, Any]) -> None:
    """Write a checkpoint so that a kill at any moment leaves the previous one or the new one,
    whole: a temporary file beside it, flushed to disk, renamed over it."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())


def _remove_leftovers(out: Path) -> None:
    """Our temporary files of a run killed while saving (``.last.pt.seglabel-XXXXXXXX.tmp``);
    a user's own ``.*.tmp`` files in the folder are left alone."""
    for tmp in out.glob(".*.tmp"):
        if temporary_target(tmp.name) in (LAST, STUDENT, "config.json"):
            try:
                tmp.unlink()
            except OSError:
                pass


def _trim_log(path: Path, last_iteration: int) -> None:
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


# -- training -------------------------------------------------------------------------------------
def train(cfg: DistillConfig, on_iteration: Callable[[int, DeepLabV2Student], None] | None = None) -> Path:
    """Train (or resume, or continue to a larger ``iters``) and write ``out/student.pt``; returns
    its path. ``on_iteration(it, model)`` is called after each completed iteration (tests use it
    to interrupt and to inspect ranks)."""
    rank, world, local_rank = _distributed()
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: a file, not a folder (--out names the run folder)")
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and cfg.device in ("auto", "cuda") else "gloo"
        dist.init_process_group(backend)
    device = _device(cfg.device, local_rank, world)
    main = rank == 0
    say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if main and not cfg.quiet else (lambda msg: None)
    if cfg.batch_size % world:
        raise ValueError(f"--batch-size {cfg.batch_size} does not split across {world} processes")
    if (cfg.iters is not None and cfg.iters < 1) or (cfg.crop and cfg.crop % 8):
        raise ValueError(f"--iters must be positive and --crop a multiple of 8 (got {cfg.iters}, {cfg.crop})")
    if not 0 < cfg.scale_min <= cfg.scale_max:
        raise ValueError(f"--scale-min {cfg.scale_min} / --scale-max {cfg.scale_max}: need 0 < min <= max")
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)

    last = _read_last(out / LAST) if (out / LAST).is_file() else None  # a bad one: refused before setup
    masks, run = read_pseudo_record(cfg)
    cfg = replace(cfg, teacher=resolve_teacher(cfg.teacher, run))
    labelset, clip_spec = resolve_labels(cfg, run)
    cfg = resolve_settings(cfg, run, int(clip_spec["config"]["embed_dim"]), device)
    if cfg.ignore_unsure and not cfg.teacher:
        raise ValueError("--ignore-unsure ranks the online teacher's pixels: it needs a teacher (--teacher), "
                         "and --pseudo's masks as written have none")
    if last is not None:  # refuse a mismatched resume before minutes of setup
        if cfg.iters is None:  # not given: the resumed run's own plan
            cfg = replace(cfg, iters=_saved_schedule(last)[-1][1])
        schedule = _check_resumable(cfg, last, out / LAST)
    scores = _score_folder(cfg, masks)
    scan = scan_pairs(Path(cfg.images), None if cfg.teacher else masks, len(labelset), labelset.ignore_index,
                      scores=scores)
    say(scan.report())
    if cfg.iters is None:
        cfg = replace(cfg, iters=default_iters(len(scan.pairs), cfg.batch_size))
        say(f"{cfg.iters} iterations (about {cfg.iters * cfg.batch_size / len(scan.pairs):.0f} passes over "
            f"the {len(scan.pairs)} images; --iters to change, a larger --iters later continues)")
    if last is None:
        schedule = [[0, cfg.iters]]
    model = build_model(cfg, labelset, clip_spec, say).to(device)
    teacher = OnlineTeacher(cfg, labelset, run, device) if cfg.teacher else None

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    start = 0
    if last is not None:
        model.load_state_dict(last["model"])
        optimizer.load_state_dict(last["optimizer"])
        _set_rng_state(last["rng"])
        start = int(last["iteration"])
        if schedule != _saved_schedule(last):
            say(f"continuing {out / LAST} from iteration {start} to {cfg.iters}: the poly schedule now ends "
                f"at {cfg.iters} (lr {scheduled_lr(start, schedule, cfg):.5f} from here)")
        else:
            say(f"resuming from {out / LAST} at iteration {start}/{cfg.iters}")

    use_amp = cfg.amp and device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    net = model
    if world > 1:
        if device.type == "cuda":  # MaskCLIP+ trains with SyncBN; it needs CUDA
            net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        net = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device] if device.type == "cuda" else None)

    aug = Augment(crop=cfg.crop, base_size=cfg.base_size, scale_range=(cfg.scale_min, cfg.scale_max),
                  photometric=cfg.photometric)
    data = PairDataset(scan.pairs, aug, model.mean, model.std, labelset.ignore_index, cfg.seed,
                       min_confidence=cfg.min_confidence)
    loader = torch.utils.data.DataLoader(
        data, batch_size=cfg.batch_size // world, sampler=SampleNumbers(start, cfg.iters, cfg.batch_size, rank, world),
        num_workers=cfg.workers, worker_init_fn=worker_init, pin_memory=device.type == "cuda",
        persistent_workers=False)

    def state(iteration: int) -> dict[str, Any]:
        return {"format": LAST_FORMAT, "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                "optimizer": optimizer.state_dict(), "schedule": schedule,
                "iteration": iteration, "rng": _rng_state(), "config": _config_dict(cfg)}

    mean = torch.tensor(model.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(model.std, device=device).view(1, 3, 1, 1)
    it = start
    if main:
        out.mkdir(parents=True, exist_ok=True)
        _remove_leftovers(out)
        _trim_log(out / LOG, start)  # from 0: a log left by a run killed before its first checkpoint
    log = open(out / LOG, "a", encoding="utf-8") if main else None  # noqa: SIM115 - closed below
    if log and last is not None and schedule != _saved_schedule(last):
        log.write(json.dumps({"iter": start, "event": "continued", "iters": cfg.iters, "schedule": schedule,
                              "lr": scheduled_lr(start, schedule, cfg)}) + "\n")
        log.flush()
    tick, tick_it, t0 = time.perf_counter(), start, time.perf_counter()
    try:
        net.train()
        for images, target in loader:
            images, target = images.to(device, non_blocking=True), target.to(device, non_blocking=True)
            inside = target != labelset.ignore_index  # the image, not the crop's padding
            if teacher is not None and (not cfg.self_train_after or it < cfg.self_train_after):
                target = teacher(images, target, model, labelset.ignore_index)
            if cfg.self_train_after and it >= cfg.self_train_after:
                target = _self_labels(model, images, target, labelset.ignore_index)
            lr = scheduled_lr(it, schedule, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                logits = net(images)
            loss = segmentation_loss(logits, target, labelset.ignore_index)
            if cfg.affinity_weight > 0:
                rgb = images * std + mean
                unlabelled = (target == labelset.ignore_index) & inside  # where the teacher is silent
                loss = loss + cfg.affinity_weight * colour_affinity_loss(logits, rgb, inside, unlabelled,
                                                                         cfg.affinity_sigma)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss became {loss.item()} at iteration {it}; try a lower --lr")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            it += 1
            if main and (it % cfg.log_every == 0 or it == cfg.iters):
                now = time.perf_counter()
                speed = (it - tick_it) / max(now - tick, 1e-9)
                tick, tick_it = now, it
                record = {"iter": it, "loss": round(loss.item(), 5), "lr": lr, "it_per_s": round(speed, 4),
                          "eta_s": round((cfg.iters - it) / max(speed, 1e-9)), "elapsed_s": round(now - t0, 1)}
                log.write(json.dumps(record) + "\n")
                log.flush()
                say(f"iter {it}/{cfg.iters}  loss {record['loss']:.4f}  lr {lr:.5f}  {speed:.2f} it/s  "
                    f"ETA {_hms(record['eta_s'])}")
            if main and cfg.val_images and cfg.val_masks and (it % cfg.val_every == 0 or it == cfg.iters):
                miou = validate(model, cfg, labelset)
                log.write(json.dumps({"iter": it, "val_miou": miou}) + "\n")
                say(f"iter {it}: validation mIoU {100 * miou:.2f}%")
                net.train()
            if main and it % cfg.save_every == 0 and it < cfg.iters:
                _save(out / LAST, state(it))
            if on_iteration:
                on_iteration(it, model)
    except KeyboardInterrupt:
        if main:
            _save(out / LAST, state(it))
            say(f"interrupted at iteration {it}: saved {out / LAST}; run the same command to resume")
        raise
    finally:
        if log:
            log.close()
    if main:
        _save(out / LAST, state(it))
        extra = {"iters": cfg.iters, "pseudo": cfg.pseudo, "teacher": cfg.teacher, "argv": cfg.argv,
                 "base_size": cfg.base_size, "crop": cfg.crop}
        _save(out / STUDENT, student_checkpoint(model, labelset, extra))
        write_json(out / "config.json", _config_dict(cfg))
        say(f"student written to {out / STUDENT} (label with --model student:{out / STUDENT}; it labels at "
            f"short side {cfg.base_size} unless given --short-side)")
    if world > 1:
        dist.barrier()
    return out / STUDENT


LAST_FORMAT = "seglabel-distill-state/1"
_LAST_KEYS = ("model", "optimizer", "iteration", "rng", "config")


def _read_last(path: Path) -> dict[str, Any]:
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


def _saved_schedule(last: dict[str, Any]) -> list[list[int]]:
    saved = last.get("schedule")
    if isinstance(saved, list) and saved and all(isinstance(s, list) and len(s) == 2 for s in saved):
        return [[int(a), int(b)] for a, b in saved]
    return [[0, int(last["config"].get("iters") or last["iteration"] or 1)]]  # before schedules were saved


def _config_dict(cfg: DistillConfig) -> dict[str, Any]:
    return json.loads(json.dumps(asdict(cfg)))  # plain lists/str/numbers: weights_only can read it


def _check_resumable(cfg: DistillConfig, last: dict[str, Any], path: Path) -> list[list[int]]:
    """The lr schedule to go on with; refuses (one line) settings a resumed run may not change.
    A larger ``--iters`` continues training: the schedule gets a new stretch [iteration, iters]."""
    saved, now = last["config"], _config_dict(cfg)
    keys = list(_RESUME_KEYS)
    if "student" not in saved:  # written before the architecture was recorded whole
        keys = [k for k in keys if k not in ("student", "arch")] + ["depth"]
    diff = [f"{k} {saved.get(k, _BEFORE.get(k))!r} -> {now[k]!r}" for k in keys
            if saved.get(k, _BEFORE.get(k)) != now[k]]
    schedule = _saved_schedule(last)
    planned, done = schedule[-1][1], int(last["iteration"])
    if cfg.iters < planned:
        diff.append(f"iters {planned} -> {cfg.iters} (it can only grow: training continues)")
    if diff:
        raise ValueError(f"{path}: made with other settings ({'; '.join(diff)}); use another --out "
                         f"or delete it to start over")
    if cfg.iters > planned:
        schedule = [*(s for s in schedule if s[0] < done), [done, cfg.iters]]
    return schedule


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


# -- labels made during training -------------------------------------------------------------------
def _score_folder(cfg: DistillConfig, masks: Path | None) -> Path | None:
    """Where the teacher's per-pixel confidence is (annotate --save-scores), when it is needed."""
    if not cfg.min_confidence or cfg.teacher or masks is None:
        return None
    scores = Path(cfg.pseudo) / SCORES
    if not scores.is_dir():
        raise DataError(f"{cfg.pseudo}: no {SCORES}/ folder: --min-confidence needs the teacher's confidence; "
                        f"annotate with --save-scores, or use --min-confidence 0")
    return scores


class OnlineTeacher:
    """MaskCLIP+'s online teacher: labels for the very crop the student sees (after rescaling,
    flipping and any photometric distortion), so labels and pixels always agree.

    When it is the model that made --pseudo, it is rebuilt as that run recorded it (weights, model
    config, method, refinements, PAMR), so it labels the crops the way it labelled the photos."""

    def __init__(self, cfg: DistillConfig, labelset: LabelSet, run: dict[str, Any], device: torch.device):
        from .models.registry import load_segmenter

        options: dict[str, Any] = {}
        self.pamr = False
        if run.get("model") == cfg.teacher:
            weights = run.get("weights") or {}
            settings = run.get("settings") or {}
            method = settings.get("method") or {}
            options = {"pretrained": weights.get("pretrained"),
                       "model_config": recorded_model_config(run),
                       "method": method.get("method", "auto"), "key_smoothing": method.get("key_smoothing"),
                       "prompt_denoising": method.get("prompt_denoising"), "logit_scale": method.get("logit_scale")}
            self.pamr = bool((settings.get("protocol") or {}).get("pamr"))
        options = {k: v for k, v in options.items() if v is not None}
        if cfg.pretrained:
            options["pretrained"] = cfg.pretrained
        if cfg.model_config:
            options["model_config"] = cfg.model_config
        options.setdefault("pretrained", "openai")
        self.model = load_segmenter(cfg.teacher, labelset, cache_dir=cfg.cache_dir, device=device, **options).eval()
        self.min_confidence = cfg.min_confidence
        self.ignore_unsure = cfg.ignore_unsure or 0.0

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, valid: torch.Tensor, student: DeepLabV2Student,
                 ignore_index: int) -> torch.Tensor:
        """The teacher's argmax on ``images`` (the student's normalisation), padding ignored, and
        pixels whose teacher probability is below ``min_confidence``."""
        teacher = self.model
        dev = images.device
        s_mean, s_std = (torch.tensor(v, device=dev).view(1, 3, 1, 1) for v in (student.mean, student.std))
        t_mean, t_std = (torch.tensor(v, device=dev).view(1, 3, 1, 1) for v in (teacher.mean, teacher.std))
        x = ((images * s_std + s_mean) - t_mean) / t_std
        x = F.pad(x, (0, (-x.shape[-1]) % teacher.pad_to, 0, (-x.shape[-2]) % teacher.pad_to))
        logits = teacher(x)
        logits = F.interpolate(logits.float(), scale_factor=teacher.stride, mode="bilinear", align_corners=False)
        if self.pamr:
            from .refine import pamr

            logits = torch.stack([pamr(xi, li) for xi, li in zip(x, logits)])
        logits = logits[..., : images.shape[-2], : images.shape[-1]]
        unsure = valid == ignore_index
        if self.min_confidence > 0:
            unsure |= logits.softmax(1).amax(1) < self.min_confidence
        if self.ignore_unsure > 0 and logits.shape[1] > 1:
            # Rank by the margin between the two best classes: scale-free, so the same fraction
            # means the same for teachers of any temperature (their probabilities saturate).
            top2 = logits.topk(2, dim=1).values
            margin = top2[:, 0] - top2[:, 1]
            candidates = margin[~unsure]
            k = int(self.ignore_unsure * candidates.numel())
            if k > 0:
                unsure |= margin <= candidates.kthvalue(k).values
        return torch.where(unsure, ignore_index, logits.argmax(1))


@torch.no_grad()
def _self_labels(model: DeepLabV2Student, images, target, ignore_index: int) -> torch.Tensor:
    """Self-training: the student's own argmax replaces the pseudo-labels (padding stays ignored)."""
    model.eval()
    try:
        logits = F.interpolate(model(images).float(), size=images.shape[-2:], mode="bilinear", align_corners=False)
    finally:
        model.train()
    return torch.where(target == ignore_index, ignore_index, logits.argmax(1))


# -- validation -----------------------------------------------------------------------------------
@torch.no_grad()
def validate(model: DeepLabV2Student, cfg: DistillConfig, labelset: LabelSet) -> float:
    """mIoU on --val-images/--val-masks: predicted masks written to a temporary folder, scored
    with ``seglabel.evaluate``."""
    import tempfile

    from .evaluate import evaluate_folders
    from .images import find_images, load_image
    from .predict import Predictor, Protocol, to_mask
    from .writers import encode_mask_png, write_bytes

    predictor = Predictor(model.eval(), Protocol(short_side=cfg.base_size))
    with tempfile.TemporaryDirectory(prefix="seglabel-val-") as tmp:
        for item in find_images([cfg.val_images]).items:
            pred = predictor.predict([load_image(item.path)])[0]
            write_bytes(Path(tmp) / f"{item.key}.png", encode_mask_png(to_mask(pred, labelset, 0.0)))
        return evaluate_folders(tmp, cfg.val_masks, labelset).miou
