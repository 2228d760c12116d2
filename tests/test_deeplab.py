"""The DeepLabv2 student: shapes, frozen text classifier, backbone weight mapping."""
from __future__ import annotations

import pytest
import torch

from seglabel.checkpoints import CheckpointError
from seglabel.labelset import LabelSet
from seglabel.distill.backbone import detect_layout, load_backbone
from seglabel.models.deeplab import DeepLabV2Student, StudentArch, student_checkpoint, student_from_checkpoint

SMALL = dict(depth=18, block="basic", layers=(1, 1, 1, 1), width=8, stem_width=16)


def small_student(embed_dim: int = 32, classes=("sky", "grass", "road")) -> tuple[DeepLabV2Student, LabelSet]:
    torch.manual_seed(0)
    model = DeepLabV2Student(StudentArch(embed_dim=embed_dim, **SMALL))
    labelset = LabelSet.from_names(list(classes))
    model.set_text(torch.randn(len(classes), embed_dim), labelset)
    return model, labelset


def test_output_stride_8_and_class_count():
    model, labelset = small_student()
    out = model(torch.randn(2, 3, 64, 96))
    assert out.shape == (2, len(labelset), 8, 12)
    assert model.stride == 8 and model.pad_to == 8


def test_real_r101_layout():
    model = DeepLabV2Student(StudentArch.resnet(101, embed_dim=512))
    b = model.backbone
    assert [len(getattr(b, f"layer{i}")) for i in range(1, 5)] == [3, 4, 23, 3]
    assert [m.out_channels for m in b.stem if isinstance(m, torch.nn.Conv2d)] == [32, 32, 64]
    assert b.layer4[1].conv2.dilation == (4, 4) and b.layer3[1].conv2.dilation == (2, 2)
    assert [br[0].dilation[0] for br in model.aspp.branches] == [6, 12, 18, 24]
    assert all(br[0].in_channels == 2048 and br[0].out_channels == 512 for br in model.aspp.branches)


def test_classifier_is_frozen_text():
    model, labelset = small_student()
    before = model.text_embeddings.clone()
    assert all(p is not model.text_embeddings for p in model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    loss = model(torch.randn(2, 3, 32, 32)).logsumexp(1).mean()
    loss.backward()
    opt.step()
    assert not model.text_embeddings.requires_grad and model.text_embeddings.grad is None
    assert torch.equal(model.text_embeddings, before)
    assert torch.allclose(model.text_embeddings.norm(dim=1), torch.ones(3))  # L2-normalised
    assert "text_embeddings" not in dict(model.named_parameters())


def test_logits_are_dot_products_with_text():
    model, _ = small_student()
    model.eval()
    x = torch.randn(1, 3, 32, 32)
    feats = model.features(x)
    expected = torch.einsum("bdhw,kd->bkhw", feats, model.text_embeddings) * model.logit_scale
    assert torch.allclose(model(x), expected, atol=1e-5)


def test_synonym_prompts_pool_to_classes():
    torch.manual_seed(0)
    model = DeepLabV2Student(StudentArch(embed_dim=16, **SMALL)).eval()
    labelset = LabelSet.from_names(["sky", {"name": "grass", "prompts": ["grass", "lawn"]}])
    model.set_text(torch.randn(3, 16), labelset)
    out = model(torch.randn(1, 3, 32, 32))
    raw = torch.einsum("bdhw,kd->bkhw", model.features(torch.randn(1, 3, 32, 32)), model.text_embeddings)
    assert out.shape[1] == 2 and raw.shape[1] == 3


def test_checkpoint_round_trip():
    model, labelset = small_student()
    model.eval()
    ckpt = student_checkpoint(model, labelset)
    again, ls = student_from_checkpoint(ckpt)
    x = torch.randn(1, 3, 32, 32)
    assert ls.names == labelset.names
    assert torch.allclose(again.eval()(x), model(x), rtol=1e-5, atol=1e-7)


def test_torchvision_resnet50_maps_onto_the_student():
    import torchvision

    tv = torchvision.models.resnet50()
    model = DeepLabV2Student(StudentArch.resnet(50, embed_dim=32))
    report = load_backbone(model.backbone, tv.state_dict(), "tv.pth")
    assert report.layout == "torchvision"
    # stages 1-4 are torchvision's tensors, exactly
    assert torch.equal(model.backbone.layer3[5].conv2.weight, tv.layer3[5].conv2.weight)
    assert torch.equal(model.backbone.layer1[0].downsample[1].running_var, tv.layer1[0].downsample[1].running_var)
    # the 7x7 stem has no place in the deep stem: reported, stem left at random init
    assert report.not_loaded and all(k.startswith("stem.") for k in report.not_loaded)
    assert {"conv1.weight", "fc.weight"} <= set(report.unused)
    assert "random init" in report.summary()


def test_timm_and_mmseg_layouts_load_the_stem():
    model = DeepLabV2Student(StudentArch(embed_dim=16, **SMALL))
    ours = model.backbone.state_dict()
    mmseg = {f"backbone.{k}": torch.randn_like(v) if v.is_floating_point() else v for k, v in ours.items()}
    mmseg["decode_head.conv_seg.weight"] = torch.zeros(3)
    report = load_backbone(model.backbone, mmseg)
    assert report.layout == "mmseg" and not report.not_loaded
    assert torch.equal(model.backbone.stem[3].weight, mmseg["backbone.stem.3.weight"])
    inverse = {"stem.0": "conv1.0", "stem.1": "conv1.1", "stem.3": "conv1.3", "stem.4": "conv1.4",
               "stem.6": "conv1.6", "stem.7": "bn1"}
    timm = {}
    for k, v in ours.items():
        head = ".".join(k.split(".")[:2])
        timm[inverse.get(head, head) + k[len(head):]] = torch.randn_like(v) if v.is_floating_point() else v
    timm["fc.weight"] = torch.zeros(2)
    assert detect_layout(timm) == "timm"
    report = load_backbone(model.backbone, timm)
    assert torch.equal(model.backbone.stem[7].weight, timm["bn1.weight"]) and not report.not_loaded


def test_wrong_depth_is_refused_in_one_line():
    import torchvision

    model = DeepLabV2Student(StudentArch.resnet(101, embed_dim=16))
    with pytest.raises(CheckpointError, match="is --depth right"):
        load_backbone(model.backbone, torchvision.models.resnet50().state_dict(), "r50.pth")


def test_aspp_on_a_map_smaller_than_its_dilations_is_exact():
    """64 px inputs give 8 x 8 maps: dilations 12-24 read only padding outside the centre tap, which
    the ASPP computes as a 1x1 conv (the same values and gradients, a ninth of the work)."""
    from seglabel.models.deeplab import ASPPv2

    torch.manual_seed(0)
    aspp = ASPPv2(16, 8, (2, 6, 12, 24)).eval()
    for size in ((8, 8), (6, 30), (30, 30)):
        x = torch.randn(2, 16, *size, requires_grad=True)
        full = sum(branch(x) for branch in aspp.branches)  # every branch as a plain 3x3 conv
        fast = aspp(x)
        torch.testing.assert_close(fast, full, atol=1e-5, rtol=1e-5)
        (g_full,) = torch.autograd.grad(full.square().sum(), x)
        (g_fast,) = torch.autograd.grad(fast.square().sum(), x)
        torch.testing.assert_close(g_fast, g_full, atol=1e-4, rtol=1e-4)


def test_student_fused_for_inference_labels_the_same(tmp_path):
    from seglabel.models.deeplab import build_student

    torch.manual_seed(0)
    model, labelset = small_student(classes=["sky", "grass", "road"])
    for m in model.modules():  # batch norms with statistics, as a trained student has
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    torch.save(student_checkpoint(model, labelset), tmp_path / "student.pt")
    fused = build_student(str(tmp_path / "student.pt"))
    assert fused.fused and not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model.eval()(x), atol=1e-4, rtol=1e-4)
