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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .checkpoints import load_weights
from .distill_data import Augment, DataError, PairDataset, SampleNumbers, scan_pairs, worker_init
from .labelset import LabelSet, load_labelset, parse_labelset
from .models.deeplab import DeepLabV2Student, StudentArch, encode_labelset, init_backbone, student_checkpoint
from .writers import RUN_FILE, atomic_path, write_json

LAST, STUDENT, LOG = "last.pt", "student.pt", "log.jsonl"
# Settings a resumed run must share with the run that wrote last.pt (the rest may change: logging, workers)
_RESUME_KEYS = ("iters", "batch_size", "crop", "base_size", "lr", "momentum", "weight_decay", "power",
                "min_lr", "depth", "seed", "self_train_after", "teacher")


@dataclass
class DistillConfig:
    images: str
    out: str
    pseudo: str | None = None  # annotate's output folder (masks/ + run.json) or a plain mask folder
    labels: str | None = None  # label set YAML; required with a plain mask folder
    teacher: str | None = None  # e.g. maskclip:ViT-B-16: labels computed online on each crop
    clip: str | None = None  # CLIP text encoder (open_clip name); default: the pseudo-labels' run.json
    pretrained: str | None = None
    model_config: str | None = None
    cache_dir: str | None = None
    depth: int = 101
    arch: dict[str, Any] | None = None  # full StudentArch override (tests: small students)
    backbone_weights: str | None = None  # file | imagenet | none
    iters: int = 2000
    batch_size: int = 16  # global, split across ranks
    crop: int = 512
    base_size: int = 512
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    power: float = 0.9
    min_lr: float = 1e-4
    self_train_after: int = 0  # 0: never
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


def poly_lr(it: int, total: int, base: float, power: float = 0.9, floor: float = 1e-4) -> float:
    """mmseg's poly schedule with a floor: (base - floor) * (1 - it/total)^power + floor."""
    return (base - floor) * (1 - it / total) ** power + floor


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Cross-entropy of logits (B, K, h, w) upsampled to the target (B, H, W), averaged over the
    pixels that are not ignored. No such pixel: 0 (with a graph), not 0/0 = NaN."""
    logits = F.interpolate(logits.float(), size=target.shape[-2:], mode="bilinear", align_corners=False)
    total = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="sum")
    return total / (target != ignore_index).sum().clamp_min(1)


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


def resolve_labels(cfg: DistillConfig) -> tuple[LabelSet, Path | None, dict[str, Any]]:
    """(label set, mask folder or None, CLIP text encoder spec) from --pseudo's run.json and flags."""
    import open_clip

    run: dict[str, Any] = {}
    masks = None
    if cfg.pseudo:
        pseudo = Path(cfg.pseudo)
        if not pseudo.is_dir():
            raise DataError(f"{pseudo}: no such folder (--pseudo)")
        masks = pseudo / "masks" if (pseudo / "masks").is_dir() else pseudo
        if (pseudo / RUN_FILE).is_file():
            try:
                run = json.loads((pseudo / RUN_FILE).read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise DataError(f"{pseudo / RUN_FILE}: unreadable run record ({e})") from None
    elif not cfg.teacher:
        raise ValueError("give --pseudo (annotate's output or a mask folder) or --teacher maskclip:NAME")
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
    model_config = cfg.model_config or _argv_value(run.get("argv", []), "--model-config")
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
    return labelset, masks, {"model": name, "pretrained": pretrained, "config": config}


def _argv_value(argv: list[str], flag: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def build_model(cfg: DistillConfig, labelset: LabelSet, clip_spec: dict[str, Any], say: Callable[[str], None]) -> DeepLabV2Student:
    embed_dim = int(clip_spec["config"]["embed_dim"])
    arch = StudentArch.from_dict({**cfg.arch, "embed_dim": embed_dim}) if cfg.arch else StudentArch.resnet(cfg.depth, embed_dim)
    model = DeepLabV2Student(arch, clip_spec)
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
    """Temporary files of a run killed while saving (``.last.pt.XXXX.tmp``)."""
    for name in (LAST, STUDENT, "config.json"):
        for tmp in out.glob(f".{name}.*.tmp"):
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
    """Train (or resume) and write ``out/student.pt``; returns its path. ``on_iteration(it, model)``
    is called after each completed iteration (tests use it to interrupt and to inspect ranks)."""
    rank, world, local_rank = _distributed()
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and cfg.device in ("auto", "cuda") else "gloo"
        dist.init_process_group(backend)
    device = _device(cfg.device, local_rank, world)
    main = rank == 0
    say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if main and not cfg.quiet else (lambda msg: None)
    if cfg.batch_size % world:
        raise ValueError(f"--batch-size {cfg.batch_size} does not split across {world} processes")
    if cfg.iters < 1 or cfg.crop % 8:
        raise ValueError(f"--iters must be positive and --crop a multiple of 8 (got {cfg.iters}, {cfg.crop})")
    out = Path(cfg.out)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)

    last = None
    if (out / LAST).is_file():  # refuse a mismatched resume before minutes of setup
        last = load_weights(out / LAST)
        _check_resumable(cfg, last.get("config", {}), out / LAST)
    labelset, masks, clip_spec = resolve_labels(cfg)
    scan = scan_pairs(Path(cfg.images), None if cfg.teacher else masks, len(labelset), labelset.ignore_index)
    say(scan.report())
    model = build_model(cfg, labelset, clip_spec, say).to(device)
    teacher = _teacher(cfg, labelset, device) if cfg.teacher else None

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: poly_lr(min(it, cfg.iters), cfg.iters, cfg.lr, cfg.power, cfg.min_lr) / cfg.lr)
    start = 0
    if last is not None:
        model.load_state_dict(last["model"])
        optimizer.load_state_dict(last["optimizer"])
        scheduler.load_state_dict(last["scheduler"])
        _set_rng_state(last["rng"])
        start = int(last["iteration"])
        say(f"resuming from {out / LAST} at iteration {start}/{cfg.iters}")

    use_amp = cfg.amp and device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    net = model
    if world > 1:
        if device.type == "cuda":  # MaskCLIP+ trains with SyncBN; it needs CUDA
            net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        net = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device] if device.type == "cuda" else None)

    aug = Augment(crop=cfg.crop, base_size=cfg.base_size)
    data = PairDataset(scan.pairs, aug, model.mean, model.std, labelset.ignore_index, cfg.seed)
    loader = torch.utils.data.DataLoader(
        data, batch_size=cfg.batch_size // world, sampler=SampleNumbers(start, cfg.iters, cfg.batch_size, rank, world),
        num_workers=cfg.workers, worker_init_fn=worker_init, pin_memory=device.type == "cuda",
        persistent_workers=False)

    def state(iteration: int) -> dict[str, Any]:
        return {"model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "iteration": iteration, "rng": _rng_state(), "config": _config_dict(cfg)}

    it = start
    if main:
        out.mkdir(parents=True, exist_ok=True)
        _remove_leftovers(out)
        _trim_log(out / LOG, start)  # from 0: a log left by a run killed before its first checkpoint
    log = open(out / LOG, "a", encoding="utf-8") if main else None  # noqa: SIM115 - closed below
    tick, tick_it, t0 = time.perf_counter(), start, time.perf_counter()
    try:
        net.train()
        for images, target in loader:
            images, target = images.to(device, non_blocking=True), target.to(device, non_blocking=True)
            if teacher is not None and (not cfg.self_train_after or it < cfg.self_train_after):
                target = _teacher_labels(teacher, images, target, model, labelset.ignore_index)
            if cfg.self_train_after and it >= cfg.self_train_after:
                target = _self_labels(model, images, target, labelset.ignore_index)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                logits = net(images)
            loss = segmentation_loss(logits, target, labelset.ignore_index)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss became {loss.item()} at iteration {it}; try a lower --lr")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            lr = optimizer.param_groups[0]["lr"]
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
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
        extra = {"iters": cfg.iters, "pseudo": cfg.pseudo, "teacher": cfg.teacher, "argv": cfg.argv}
        _save(out / STUDENT, student_checkpoint(model, labelset, extra))
        write_json(out / "config.json", _config_dict(cfg))
        say(f"student written to {out / STUDENT} (label with --model student:{out / STUDENT})")
    if world > 1:
        dist.barrier()
    return out / STUDENT


def _config_dict(cfg: DistillConfig) -> dict[str, Any]:
    return json.loads(json.dumps(asdict(cfg)))  # plain lists/str/numbers: weights_only can read it


def _check_resumable(cfg: DistillConfig, saved: dict[str, Any], path: Path) -> None:
    now = _config_dict(cfg)
    diff = [f"{k} {saved.get(k)!r} -> {now[k]!r}" for k in _RESUME_KEYS if saved.get(k) != now[k]]
    if diff:
        raise ValueError(f"{path}: made with other settings ({'; '.join(diff)}); use another --out "
                         f"or delete it to start over")


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


# -- labels made during training -------------------------------------------------------------------
def _teacher(cfg: DistillConfig, labelset: LabelSet, device: torch.device):
    from .models.registry import load_segmenter

    teacher = load_segmenter(cfg.teacher, labelset, pretrained=cfg.pretrained or "openai",
                             cache_dir=cfg.cache_dir, device=device, model_config=cfg.model_config)
    return teacher.eval()


@torch.no_grad()
def _teacher_labels(teacher, images, valid, student, ignore_index: int) -> torch.Tensor:
    """The teacher's argmax on the same augmented crop (its own normalisation), padding ignored."""
    s_mean = torch.tensor(student.mean, device=images.device).view(1, 3, 1, 1)
    s_std = torch.tensor(student.std, device=images.device).view(1, 3, 1, 1)
    t_mean = torch.tensor(teacher.mean, device=images.device).view(1, 3, 1, 1)
    t_std = torch.tensor(teacher.std, device=images.device).view(1, 3, 1, 1)
    x = ((images * s_std + s_mean) - t_mean) / t_std
    pad = (-x.shape[-1]) % teacher.pad_to
    x = F.pad(x, (0, pad, 0, (-x.shape[-2]) % teacher.pad_to))
    logits = teacher(x)
    logits = F.interpolate(logits.float(), scale_factor=teacher.stride, mode="bilinear", align_corners=False)
    labels = logits[..., : images.shape[-2], : images.shape[-1]].argmax(1)
    return torch.where(valid == ignore_index, ignore_index, labels)


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
