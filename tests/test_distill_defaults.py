"""What ``seglabel distill`` chooses when not told (issue 14): the student's size by device, the
training scale from the pseudo-labels, the online teacher from their run record, augmentation;
what it records (config.json, student.pt) and how the student then labels by default; and the
pieces the defaults are made of (colour-affinity loss, ignoring unsure teacher pixels, confidence
maps of offline labels)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_CONFIGS, write_images
from seglabel.distill import DistillConfig, default_iters, train
from seglabel.distill.data import DataError, scan_pairs
from seglabel.distill.dataset import Augment, PairDataset
from seglabel.distill.loss import colour_affinity_loss
from seglabel.distill.plan import resolve_settings as resolve
from seglabel.distill.teacher import Teacher, ignore_least_sure, resolve_teacher
from seglabel.labelset import load_labelset
from test_annotate_cli import annotate, run

CPU, CUDA = "cpu", "cuda"


def cfg(**kw) -> DistillConfig:
    return DistillConfig(images="photos", out="run", **kw)


def resolve_settings(config: DistillConfig, run: dict, embed_dim: int, device: str, labels: str | None = None):
    """The plan's resolution; a teacher labels online unless told."""
    return resolve(config, run, embed_dim, device, labels or ("online" if config.teacher else None))


def annotate_record(short_side=64, model="maskclip:ViT-B-16") -> dict:
    return {"model": model, "settings": {"protocol": {"short_side": short_side, "pamr": False}}}


# -- resolution of the automatic defaults ---------------------------------------------------------
def test_student_size_follows_the_device():
    cpu = resolve_settings(cfg(), {}, 128, CPU)
    assert (cpu.depth, cpu.width) == (18, 16) and cpu.student["layers"] == [2, 2, 2, 2]
    gpu = resolve_settings(cfg(), {}, 512, CUDA)
    assert (gpu.depth, gpu.width) == (101, 64) and gpu.student["block"] == "bottleneck"
    assert gpu.student["layers"] == [3, 4, 23, 3] and gpu.student["embed_dim"] == 512
    # backbone weights need the standard width; explicit flags win
    assert resolve_settings(cfg(backbone_weights="r50.pth", depth=50), {}, 512, CPU).width == 64
    assert resolve_settings(cfg(depth=34, width=16), {}, 512, CUDA).student["width"] == 16


def test_iterations_scale_with_the_data():
    assert default_iters(4996, 16) == 4059  # PASCAL Context: the paper's 4k
    assert default_iters(118_287, 16) == 8000  # COCO-Stuff: the paper's 8k
    assert default_iters(400, 16) == 1000  # a few hundred photos: at least 1000
    assert default_iters(10, 2) == 1000


def test_training_scale_comes_from_the_pseudo_labels():
    from_run = resolve_settings(cfg(), annotate_record(short_side=64), 128, CPU)
    assert (from_run.base_size, from_run.crop) == (64, 64)
    odd = resolve_settings(cfg(), annotate_record(short_side=100), 128, CPU)
    assert (odd.base_size, odd.crop) == (100, 104)  # crops are multiples of 8
    big = resolve_settings(cfg(), annotate_record(short_side=1024), 128, CPU)
    assert (big.base_size, big.crop) == (1024, 512)
    plain = resolve_settings(cfg(), {}, 128, CPU)  # a plain mask folder: the official 512
    assert (plain.base_size, plain.crop) == (512, 512)
    given = resolve_settings(cfg(base_size=96, crop=48), annotate_record(), 128, CPU)
    assert (given.base_size, given.crop) == (96, 48)


def test_online_teacher_is_the_model_that_made_the_pseudo_labels():
    record = annotate_record(model="maskclip:toyclip-vit")
    assert resolve_teacher("auto", record) == "maskclip:toyclip-vit"
    assert resolve_teacher("auto", {}) is None  # plain masks: nobody to ask
    assert resolve_teacher("none", record) is None
    assert resolve_teacher("maskclip:RN50", record) == "maskclip:RN50"


def test_photometric_distortion_only_with_an_online_teacher_and_no_colour_loss():
    assert resolve_settings(cfg(teacher="maskclip:x", backbone_weights="imagenet"), {}, 128, CPU).photometric is True
    assert resolve_settings(cfg(teacher="maskclip:x", affinity_weight=0.0), {}, 128, CPU).photometric is True
    assert resolve_settings(cfg(teacher="maskclip:x"), {}, 128, CPU).photometric is False  # affinity loss on
    assert resolve_settings(cfg(teacher=None, backbone_weights="imagenet"), {}, 128, CPU).photometric is False
    assert resolve_settings(cfg(teacher=None, photometric=True), {}, 128, CPU).photometric is True


def test_colour_prior_replaces_imagenet_init():
    """From random init the affinity loss is on, and with an online teacher its least sure pixels are
    left to it; with backbone weights the plain MaskCLIP+ loss."""
    scratch = resolve_settings(cfg(teacher="maskclip:x"), {}, 128, CPU)
    assert (scratch.affinity_weight, scratch.ignore_unsure) == (2.5, 0.2)
    offline = resolve_settings(cfg(teacher=None), {}, 128, CPU)
    assert (offline.affinity_weight, offline.ignore_unsure) == (2.5, 0.0)
    imagenet = resolve_settings(cfg(teacher="maskclip:x", backbone_weights="imagenet"), {}, 512, CUDA)
    assert (imagenet.affinity_weight, imagenet.ignore_unsure) == (0.0, 0.0)
    given = resolve_settings(cfg(teacher="maskclip:x", affinity_weight=0.0, ignore_unsure=0.1), {}, 128, CPU)
    assert (given.affinity_weight, given.ignore_unsure) == (0.0, 0.1)


def test_cuda_gets_the_maskclip_plus_recipe_and_a_cpu_the_measured_one():
    """Issue 23 item 4: on CUDA an ImageNet ResNet-101 trained with cross-entropy alone (MaskCLIP+);
    elsewhere the toy-world-measured ResNet-18 from random init with the colour prior. The chooser
    takes the device type, so both are checked here, without a GPU."""
    gpu = resolve_settings(cfg(teacher="maskclip:x"), {}, 512, CUDA)
    assert (gpu.depth, gpu.width, gpu.backbone_weights, gpu.upsample) == (101, 64, "imagenet", "bilinear")
    assert (gpu.affinity_weight, gpu.ignore_unsure, gpu.photometric) == (0.0, 0.0, True)
    cpu = resolve_settings(cfg(teacher="maskclip:x"), {}, 512, CPU)
    assert (cpu.depth, cpu.width, cpu.backbone_weights, cpu.upsample) == (18, 16, "none", "guided")
    assert cpu.student["upsample"] == "guided"  # student.pt records how it labels
    assert (cpu.affinity_weight, cpu.ignore_unsure, cpu.photometric) == (2.5, 0.2, False)
    random_gpu = resolve_settings(cfg(teacher="maskclip:x", backbone_weights="none"), {}, 512, CUDA)
    assert (random_gpu.backbone_weights, random_gpu.affinity_weight, random_gpu.width) == ("none", 2.5, 64)
    cached = resolve_settings(cfg(teacher="maskclip:x"), {}, 512, CPU, "cached")  # labels made from the photo
    assert (cached.photometric, cached.ignore_unsure, cached.teacher_labels) == (False, 0.2, "cached")


@pytest.mark.slow
def test_imagenet_weights_come_from_the_caches_their_packages_fill(tmp_path, monkeypatch):
    """--backbone-weights imagenet: torchvision's file in torch hub's cache, timm's in the Hugging
    Face cache (where their own loading code puts them); offline and not cached: one line saying
    how to supply them or to start from random init."""
    import torchvision

    from seglabel.distill.backbone import IMAGENET, imagenet_file, init_backbone
    from seglabel.models.clip import WeightsUnavailable
    from seglabel.models.deeplab import DeepLabV2Student, StudentArch

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hf = tmp_path / "hf"
    for depth in (18, 101):
        with pytest.raises(WeightsUnavailable) as e:
            imagenet_file(depth, cache_dir=str(hf))
        message = str(e.value)
        assert "\n" not in message and "not cached" in message and IMAGENET[depth][0] in message
        assert message.endswith("or --backbone-weights none to start from random init") and "--backbone-weights FILE" in message
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    cached = tmp_path / "torch" / "hub" / "checkpoints" / url.rsplit("/", 1)[-1]
    cached.parent.mkdir(parents=True)
    torch.save(torchvision.models.resnet18().state_dict(), cached)  # what torchvision would have downloaded
    assert imagenet_file(18) == str(cached)
    model = DeepLabV2Student(StudentArch.resnet(18, 32))
    line = init_backbone(model, "imagenet")
    assert line.startswith("backbone weights (torchvision layout): ") and "left at random init" in line  # the 7x7 stem
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file

    snapshot = hf / "models--timm--resnet50c.gluon_in1k" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (hf / "models--timm--resnet50c.gluon_in1k" / "refs").mkdir()
    (hf / "models--timm--resnet50c.gluon_in1k" / "refs" / "main").write_text("0" * 40)
    save_file(timm.create_model("resnet50c", pretrained=False).state_dict(), str(snapshot / "model.safetensors"))
    assert imagenet_file(50, cache_dir=str(hf)) == str(snapshot / "model.safetensors")
    model = DeepLabV2Student(StudentArch.resnet(50, 32))
    line = init_backbone(model, "imagenet", cache_dir=str(hf))
    assert line.startswith("backbone weights (timm layout): ") and "random init" not in line  # the deep stem too


# -- what a run records, and the student's default scale -------------------------------------------
def test_config_records_the_architecture_and_the_student_labels_at_its_scale(tmp_path, tiny_weights, small_labelset):
    """Issue 14 item 5: config.json said ``arch: null``; a student trained at base size 48 labelled
    at short side 512 unless told."""
    photos = tmp_path / "photos"
    write_images(photos, [f"{i}.jpg" for i in range(3)], size=(48, 64))
    labels = tmp_path / "labels"
    assert annotate([photos], labels, small_labelset, tiny_weights).returncode == 0  # short side 64
    r = run("distill", "--pseudo", str(labels), "--images", str(photos), "--arch", "deeplabv2",
            "--out", str(tmp_path / "run"), "--width", "8", "--iters", "2", "--batch-size", "2",
            "--workers", "0", "--quiet")
    assert r.returncode == 0, r.stderr
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["arch"] == "deeplabv2"
    assert config["student"]["depth"] == 18 and config["student"]["width"] == 8 and config["depth"] == 18
    assert config["base_size"] == 64 and config["crop"] == 64  # from the labels' run.json
    assert config["teacher"] == "maskclip:tiny-vit" and config["photometric"] is False
    assert config["affinity_weight"] == 2.5 and config["ignore_unsure"] == 0.2
    student = tmp_path / "run" / "student.pt"
    assert torch.load(student, weights_only=True)["trained"]["base_size"] == 64

    out = tmp_path / "by-student"
    r = run("annotate", str(photos), "--labels", str(small_labelset), "--out", str(out), "--model", f"student:{student}")
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "run.json").read_text())["settings"]["protocol"]["short_side"] == 64
    for told in (32, 512):  # a short side given is the one used, also seglabel's default 512
        out = tmp_path / f"told-{told}"
        r = run("annotate", str(photos), "--labels", str(small_labelset), "--out", str(out), "--model",
                f"student:{student}", "--short-side", str(told))
        assert r.returncode == 0, r.stderr
        assert json.loads((out / "run.json").read_text())["settings"]["protocol"]["short_side"] == told


# -- the pieces -------------------------------------------------------------------------------------
def test_colour_affinity_loss_prefers_boundaries_on_colour_edges():
    rgb = torch.zeros(2, 3, 16, 16)
    rgb[:, :, :, 8:] = 1.0
    inside = torch.ones(2, 16, 16, dtype=torch.bool)

    def split_at(column: int) -> torch.Tensor:
        logits = torch.zeros(2, 2, 16, 16)
        logits[:, 0, :, :column] = 10
        logits[:, 1, :, column:] = 10
        return logits

    on_edge = colour_affinity_loss(split_at(8), rgb, inside)
    off_edge = colour_affinity_loss(split_at(5), rgb, inside)
    assert on_edge < 1e-3 < 0.05 < off_edge
    logits = split_at(5).requires_grad_()
    colour_affinity_loss(logits, rgb, inside).backward()
    assert logits.grad.abs().sum() > 0
    # padding takes no part: a wrong split there costs nothing
    inside[:, :, :8] = False
    assert colour_affinity_loss(split_at(5), rgb, inside) < 1e-3
    # low-resolution logits are upsampled to the image first
    assert colour_affinity_loss(torch.zeros(2, 3, 2, 2), rgb, inside).isfinite()


def test_colour_affinity_loss_only_speaks_where_the_teacher_is_silent():
    rgb = torch.zeros(1, 3, 16, 16)
    rgb[:, :, :, 8:] = 1.0
    inside = torch.ones(1, 16, 16, dtype=torch.bool)
    logits = torch.zeros(1, 2, 16, 16)
    logits[:, 0] = 10  # one class everywhere: no pair disagrees
    logits[:, 1, :, 8:] = 20
    logits[:, 0, :, 5:8] = -10  # class 1 bleeds three columns past the colour edge
    logits[:, 1, :, 5:8] = 10
    band = torch.zeros(1, 16, 16, dtype=torch.bool)
    band[:, :, 4:9] = True  # the teacher was unsure along the edge
    assert colour_affinity_loss(logits, rgb, inside, band) > 0.1
    assert colour_affinity_loss(logits, rgb, inside, torch.zeros_like(band)) == 0  # labelled everywhere: silent
    far = torch.zeros_like(band)
    far[:, :, 12:] = True  # unlabelled only where predictions agree
    assert colour_affinity_loss(logits, rgb, inside, far) < 1e-3


def test_online_teacher_ignores_the_least_sure_fraction(tmp_path, tiny_weights, small_labelset):
    from seglabel.models.deeplab import DeepLabV2Student, StudentArch
    from seglabel.models.registry import load_segmenter
    from seglabel.predict import Protocol

    labelset = load_labelset(small_labelset)
    student = DeepLabV2Student(StudentArch.resnet(18, 32, width=8, stem_width=8))
    torch.manual_seed(0)
    images = torch.randn(2, 3, 32, 32)
    valid = torch.zeros(2, 32, 32, dtype=torch.long)
    valid[:, :, 28:] = 255  # padding
    model = load_segmenter("maskclip:tiny-vit", labelset, pretrained=str(tiny_weights["tiny-vit"]),
                           model_config=str(TINY_CONFIGS["tiny-vit"]))
    teacher = Teacher(model, Protocol(short_side=32), labelset, None)
    plain, margin = teacher.crops(images, valid, student.mean, student.std, 255)
    assert (plain[:, :, 28:] == 255).all() and (plain[:, :, :28] != 255).all()
    assert margin.shape == plain.shape and (margin >= 0).all()
    unsure = ignore_least_sure(plain, margin, 0.25, 255)
    kept = unsure != 255
    assert torch.equal(unsure[kept], plain[kept])  # the rest keeps the teacher's labels
    for c in plain.unique()[:-1]:  # in every class: exactly the fraction asked, and the least sure
        members = plain == c
        dropped = members & (unsure == 255)
        assert dropped.sum() == int(0.25 * members.sum())
        assert margin[dropped].max() <= margin[members & ~dropped].min()
    # saturated scores (all equal) lose no more than asked either
    tied = ignore_least_sure(plain, torch.ones_like(margin), 0.25, 255)
    assert (tied == 255).sum() - (plain == 255).sum() == sum(int(0.25 * (plain == c).sum()) for c in plain.unique()[:-1])


def test_offline_labels_below_min_confidence_are_ignored(tmp_path):
    photos, masks, scores = tmp_path / "photos", tmp_path / "masks", tmp_path / "scores"
    write_images(photos, ["a.png"], size=(32, 32))
    masks.mkdir()
    scores.mkdir()
    Image.fromarray(np.ones((32, 32), np.uint8)).save(masks / "a.png")
    conf = np.full((32, 32), 65535, np.uint16)
    conf[:, :16] = 20000  # probability 0.31 on the left half
    Image.fromarray(conf).save(scores / "a.png")
    scan = scan_pairs(photos, masks, 3, 255, scores=scores)
    assert scan.pairs[0].scores == scores / "a.png"
    aug = Augment(crop=32, base_size=32, scale_range=(1.0, 1.0), flip=False, photometric=False)
    _, target, _, _ = PairDataset(scan.pairs, aug, (0, 0, 0), (1, 1, 1), 255, min_confidence=0.5)[0]
    assert (target[:, :16] == 255).all() and (target[:, 16:] == 1).all()
    # a mask without its confidence map is a reported skip
    (scores / "a.png").unlink()
    with pytest.raises(DataError, match="no usable"):
        scan_pairs(photos, masks, 3, 255, scores=scores)


def test_min_confidence_without_scores_is_one_line(tmp_path, tiny_weights, small_labelset):
    photos, masks = tmp_path / "photos", tmp_path / "masks"
    write_images(photos, ["a.png"], size=(32, 32))
    masks.mkdir()
    Image.fromarray(np.ones((32, 32), np.uint8)).save(masks / "a.png")
    config = DistillConfig(images=str(photos), pseudo=str(masks), out=str(tmp_path / "run"), labels=str(small_labelset),
                           clip="tiny-vit", pretrained=str(tiny_weights["tiny-vit"]),
                           model_config=str(TINY_CONFIGS["tiny-vit"]), min_confidence=0.5, device="cpu")
    with pytest.raises(DataError, match="--save-scores") as e:
        train(config)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()
