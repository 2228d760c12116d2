"""`distill` trains on the images a person corrected as written, no teacher for them (issue 21
item 2): their records in --pseudo's run say so (records.current_record, the one reader); the
targets the student sees for them are their masks exactly, ignored pixels included, with an online
or a cached teacher, while the other images get the teacher's labels; the plan, the log and
config.json say how many."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_CONFIGS, write_images
from seglabel.distill import DistillConfig, plan, train
from seglabel.distill import training as training_module
from seglabel.distill.dataset import Augment, PairDataset
from seglabel.distill.teacher import Teacher
from seglabel.distill.training import student_targets
from seglabel.labelset import LabelSet
from seglabel.records import read_record, write_labelled
from seglabel.writers import encode_mask_png

LABELS = LabelSet.from_names(["sky", "grass", "road"])
SMALL_ARCH = {"depth": 18, "block": "basic", "layers": [1, 1, 1, 1], "width": 8, "stem_width": 16}
SIZE = (48, 64)  # short side 48: annotate's, so distill's base size; a 64 crop holds the whole photo
NOTE = "(2 corrected by a person: trained on as written, no teacher)"


def person_mask(seed: int) -> np.ndarray:
    """What no teacher would label: road everywhere, a block of sky low down, an ignored stripe."""
    m = np.full(SIZE, 2, np.uint8)
    m[30 + seed:40, 10:30] = 0
    m[:, 50:54] = 255
    return m


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_weights) -> Path:
    """A real annotate run of four photos (tiny random CLIP), two of them then corrected by a person
    as `seglabel import` writes them: records.write_labelled with a "corrected" entry."""
    from seglabel.annotate import annotate
    from seglabel.images import find_images
    from seglabel.predict import ProtocolOptions
    from seglabel.recipe import Recipe, prepare

    root = tmp_path_factory.mktemp("corrected")
    write_images(root / "photos", ["a.png", "b.png", "c.png", "sub/d.png"], size=SIZE)
    recipe = Recipe(labels=LABELS, out=root / "labels", protocol=ProtocolOptions(short_side=48),
                    model="maskclip:tiny-vit", pretrained=str(tiny_weights["tiny-vit"]),
                    model_config=str(TINY_CONFIGS["tiny-vit"]), device="cpu")
    ready = prepare(recipe)
    summary = annotate(find_images([root / "photos"]).items, ready.segmenter, ready.labelset, ready.config,
                       argv=["seglabel", "annotate", str(root / "photos"), "--model", "maskclip:tiny-vit"])
    assert summary.exit_code == 0, summary.failures
    for i, key in enumerate(("b", "sub/d")):
        old = read_record(root / "labels" / "records" / f"{key}.json")
        write_labelled(root / "labels", key, old["file_name"], person_mask(i), LABELS, settings_id=old["settings_id"],
                       photo=old["photo"], corrected={"by": "person", "tool": "test", "when": "2026-12-05T00:00:00"})
    return root


def config(root: Path, out: Path, **kw) -> DistillConfig:
    base = dict(images=str(root / "photos"), pseudo=str(root / "labels"), out=str(out), student=SMALL_ARCH,
                iters=3, batch_size=2, crop=64, scale_min=1.0, scale_max=1.0, ignore_unsure=0.0, workers=0,
                device="cpu", quiet=True, log_every=1, save_every=100)
    return DistillConfig(**{**base, **kw})


def padded(mask: np.ndarray, size: int = 64) -> torch.Tensor:
    out = torch.full((size, size), 255, dtype=torch.int64)
    out[: mask.shape[0], : mask.shape[1]] = torch.from_numpy(mask.astype(np.int64))
    return out


def test_the_plan_finds_the_corrected_images_and_the_dataset_gives_their_masks_as_written(run, tmp_path):
    p = plan(config(run, tmp_path / "out"))
    assert p.teacher is not None and p.teacher_labels == "online"  # rebuilt from run.json
    assert {pair.key: pair.corrected for pair in p.scan.pairs} == {"a": False, "b": True, "c": False, "sub/d": True}
    assert any(line.startswith("images: 4 to train on in ") and NOTE in line for line in p.lines())
    data = PairDataset(p.scan.pairs, Augment(crop=64, base_size=48, scale_range=(1.0, 1.0), flip=False),
                       (0, 0, 0), (1, 1, 1), 255)
    seen = {}
    for n in range(4):
        pair = p.scan.pairs[data.pair_index(n)]
        _, target, _, corrected = data[n]
        seen[pair.key] = bool(corrected)
        if pair.corrected:  # exactly the person's mask, its 255s still ignored
            assert torch.equal(target, padded(person_mask(("b", "sub/d").index(pair.key))))
        else:  # the image, for the online teacher to label
            assert torch.equal(target, padded(np.zeros(SIZE, np.uint8)))
    assert seen == {"a": False, "b": True, "c": False, "sub/d": True}


@pytest.mark.parametrize("labels", ["online", "cached"])
def test_the_student_sees_the_corrected_masks_and_the_teachers_labels_elsewhere(run, tmp_path, monkeypatch, caplog,
                                                                               labels):
    seen_targets, teacher_labels = [], []
    loss = training_module.segmentation_loss
    crops = Teacher.crops

    def recording_loss(logits, target, ignore_index):
        seen_targets.append(target.clone())
        return loss(logits, target, ignore_index)

    def recording_crops(self, *args, **kw):
        out = crops(self, *args, **kw)
        teacher_labels.append(out[0].clone())
        return out

    monkeypatch.setattr(training_module, "segmentation_loss", recording_loss)
    monkeypatch.setattr(Teacher, "crops", recording_crops)
    cfg = config(run, tmp_path / "out", teacher_labels=labels)
    with caplog.at_level(logging.INFO, logger="seglabel"):
        train(cfg)
    assert any(f"4 training images {NOTE}" in r.getMessage() for r in caplog.records)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["corrected_images"] == 2

    p = plan(cfg)  # the same samples, drawn again (every draw is seeded by the sample number)
    data = PairDataset(p.scan.pairs, Augment(crop=64, base_size=p.cfg.base_size, scale_range=(1.0, 1.0),
                                             photometric=p.cfg.photometric), (0, 0, 0), (1, 1, 1), 255, p.cfg.seed,
                       cache=training_module.TeacherCache(p.out, p.levels, p.cfg.base_size) if labels == "cached" else None)
    assert len(seen_targets) == 3
    kinds = set()
    for it, target in enumerate(seen_targets):
        for row in range(2):
            n = it * 2 + row
            pair = p.scan.pairs[data.pair_index(n)]
            _, written, _, _ = data[n]
            kinds.add(pair.corrected)
            if pair.corrected:
                mask = padded(person_mask(("b", "sub/d").index(pair.key)))
                assert torch.equal(target[row], mask) or torch.equal(target[row], padded_flip(mask))
                if labels == "online":  # the teacher labelled that crop otherwise, and was not heard
                    assert not torch.equal(teacher_labels[it][row], target[row])
            elif labels == "online":
                assert torch.equal(target[row], teacher_labels[it][row])
            else:  # the cached teacher's labels of that photo
                assert torch.equal(target[row], written) and not (written[:48, :64] == 255).all()
    assert kinds == {True, False}
    if labels == "cached":  # the teacher never labelled the corrected photos
        cached = {f.relative_to(tmp_path / "out" / "teacher" / "1").as_posix()
                  for f in (tmp_path / "out" / "teacher" / "1").rglob("*.png") if f.name.count(".") == 1}
        assert cached == {"a.png", "c.png"}
    else:
        assert len(teacher_labels) == 3  # it labelled every batch


def padded_flip(mask: torch.Tensor) -> torch.Tensor:
    """A padded 48x64 mask flipped as the crop flips it: the photo's columns reversed, padding below."""
    out = mask.clone()
    out[:48, :64] = mask[:48, :64].flip(-1)
    return out


def test_without_a_teacher_they_are_counted_too(run, tmp_path):
    import typer
    from typer.testing import CliRunner

    from seglabel.cli_distill import distill

    app = typer.Typer()
    app.command("distill")(distill)
    app.command("other")(lambda: None)
    out = tmp_path / "out"
    args = ["distill", "--pseudo", str(run / "labels"), "--images", str(run / "photos"), "--out", str(out),
            "--depth", "18", "--iters", "1", "--batch-size", "2", "--crop", "64", "--workers", "0", "--dry-run"]
    for teacher in ("auto", "none"):
        r = CliRunner().invoke(app, args + ["--teacher", teacher])
        assert r.exit_code == 0, r.output
        assert f"images: 4 to train on in {run / 'photos'} {NOTE}; 0 skipped" in r.output
    assert not out.exists()  # a dry run writes nothing
    train(config(run, out, teacher="none", iters=1))
    assert json.loads((out / "config.json").read_text())["corrected_images"] == 2


def test_student_targets_keep_a_persons_mask_and_rank_only_the_teachers_pixels():
    written = torch.tensor([[[0, 1, 255, 1]], [[2, 2, 2, 2]]])
    labels = torch.tensor([[[1, 1, 1, 1]], [[1, 1, 1, 1]]])  # the teacher's: class 1 everywhere
    sure = torch.tensor([[[0.1, 0.2, 0.3, 0.4]], [[0.5, 0.6, 0.7, 0.8]]])  # least sure on the corrected sample
    corrected = torch.tensor([True, False])
    out = student_targets(written, corrected, labels, sure, 0.5, 255)
    assert out[0].tolist() == [[0, 1, 255, 1]]  # as written: its 255 stays, nothing ignored for sureness
    assert out[1].tolist() == [[255, 255, 1, 1]]  # half of the teacher's class-1 pixels, ranked among its own
    assert torch.equal(student_targets(written, torch.tensor([False, False]), labels, sure[:0], 0.5, 255), labels)


def test_hand_edits_count_and_a_correction_that_cannot_be_used_is_skipped(run, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(run, root)
    edited = np.asarray(Image.open(root / "labels" / "masks" / "a.png")).copy()
    edited[:10] = 1 - np.clip(edited[:10], 0, 1)  # a person repainted the top rows in an image editor
    (root / "labels" / "masks" / "a.png").write_bytes(encode_mask_png(edited))
    broken = person_mask(0)
    broken[0, 0] = 7  # no class of the label set
    (root / "labels" / "masks" / "b.png").write_bytes(encode_mask_png(broken))
    p = plan(config(root, tmp_path / "out"))
    assert {pair.key: pair.corrected for pair in p.scan.pairs} == {"a": True, "c": False, "sub/d": True}
    (path, reason), = p.scan.skipped
    assert path.endswith("b.png") and "7, not a class of the label set" in reason  # never handed to the teacher
    data = PairDataset(p.scan.pairs, Augment(crop=64, base_size=48, scale_range=(1.0, 1.0), flip=False),
                       (0, 0, 0), (1, 1, 1), 255)
    n = next(n for n in range(3) if p.scan.pairs[data.pair_index(n)].key == "a")
    assert torch.equal(data[n][1], padded(edited))
