"""`seglabel distill` on generated images with a tiny random CLIP text encoder and a small student."""
from __future__ import annotations

import json
import math
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_CONFIGS, write_images
from seglabel.distill import DistillConfig, poly_lr, segmentation_loss, train
from seglabel.distill.data import DataError, scan_pairs
from seglabel.labelset import load_labelset

SMALL_ARCH = {"depth": 18, "block": "basic", "layers": [1, 1, 1, 1], "width": 8, "stem_width": 16}
SIZE = (48, 64)


def write_masks(folder: Path, names: list[str], size=SIZE, value_bottom: int = 1) -> None:
    for name in names:
        h, w = size
        m = np.full((h, w), value_bottom, np.uint8)
        m[: h // 2] = 0  # sky above, as write_images paints the top half blue
        m[:, :4] = 255  # a stripe of ignore
        p = folder / Path(name).with_suffix(".png")
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(m).save(p)


@pytest.fixture
def data(tmp_path):
    names = ["a.jpg", "b.png", "x/c.png"]
    write_images(tmp_path / "photos", names, size=SIZE)
    write_masks(tmp_path / "pseudo", names)
    return tmp_path


def make_config(root: Path, tiny_weights, labelset_file, **kw) -> DistillConfig:
    base = dict(images=str(root / "photos"), pseudo=str(root / "pseudo"), labels=str(labelset_file),
                out=str(root / "run"), clip="tiny-vit", pretrained=str(tiny_weights["tiny-vit"]),
                model_config=str(TINY_CONFIGS["tiny-vit"]), student=SMALL_ARCH, iters=3, batch_size=2,
                crop=64, base_size=64, workers=0, device="cpu", quiet=True, log_every=1, save_every=100)
    return DistillConfig(**{**base, **kw})


def read_log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


# -- pieces --------------------------------------------------------------------------------------
def test_poly_lr_hand_computed():
    assert poly_lr(0, 100, 0.01) == pytest.approx(0.01)
    # (0.01 - 1e-4) * 0.5 ** 0.9 + 1e-4 = 0.0099 * 0.535887 + 0.0001
    assert poly_lr(50, 100, 0.01) == pytest.approx(0.0054053, rel=1e-4)
    assert poly_lr(100, 100, 0.01) == pytest.approx(1e-4)
    # (2/3) ** 0.9 = 0.694254
    assert poly_lr(1, 3, 0.01) == pytest.approx(0.0099 * 0.694254 + 1e-4, rel=1e-5)


def test_ignored_pixels_contribute_no_loss():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    target = torch.randint(0, 3, (2, 32, 32))
    ignored = target.clone()
    ignored[1] = 255  # the second image is all ignore
    alone = segmentation_loss(logits[:1], target[:1], 255)
    both = segmentation_loss(logits, ignored, 255)
    assert torch.allclose(alone, both)
    both.backward()
    assert torch.count_nonzero(logits.grad[1]) == 0  # nothing flows from ignored pixels
    only_ignore = segmentation_loss(logits, torch.full((2, 32, 32), 255), 255)
    assert only_ignore.item() == 0.0 and math.isfinite(only_ignore.item())


# -- training ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_training_writes_a_student_with_finite_losses(data, tiny_weights, small_labelset):
    cfg = make_config(data, tiny_weights, small_labelset)
    path = train(cfg)
    log = read_log(data / "run")
    assert [r["iter"] for r in log] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in log)
    # lr per iteration follows poly: 0.01, then the hand-computed value above
    assert log[0]["lr"] == pytest.approx(0.01) and log[1]["lr"] == pytest.approx(0.0099 * 0.694254 + 1e-4, rel=1e-5)
    assert path.is_file() and (data / "run" / "last.pt").is_file()
    last = torch.load(data / "run" / "last.pt", weights_only=True)
    assert last["iteration"] == 3


def test_classifier_stays_the_text_embeddings(data, tiny_weights, small_labelset):
    from seglabel.models.deeplab import encode_labelset, student_from_checkpoint

    train(make_config(data, tiny_weights, small_labelset, iters=2))
    ckpt = torch.load(data / "run" / "student.pt", weights_only=True)
    model, labelset = student_from_checkpoint(ckpt)
    spec = {"model": "tiny-vit", "pretrained": str(tiny_weights["tiny-vit"]), "config": None}
    assert torch.allclose(model.text_embeddings, encode_labelset(spec, labelset), atol=1e-6)


@pytest.mark.slow
def test_resume_gives_the_same_state_as_an_uninterrupted_run(data, tiny_weights, small_labelset):
    straight = make_config(data, tiny_weights, small_labelset, iters=4, out=str(data / "straight"))
    train(straight)

    resumed = make_config(data, tiny_weights, small_labelset, iters=4, out=str(data / "resumed"))

    def stop(it, model):
        if it == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(resumed, on_iteration=stop)
    assert torch.load(data / "resumed" / "last.pt", weights_only=True)["iteration"] == 2
    train(resumed)

    a = torch.load(data / "straight" / "last.pt", weights_only=True)
    b = torch.load(data / "resumed" / "last.pt", weights_only=True)
    assert a["iteration"] == b["iteration"] == 4
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    assert a["optimizer"]["param_groups"][0]["lr"] == b["optimizer"]["param_groups"][0]["lr"]
    assert a["schedule"] == b["schedule"] == [[0, 4]]
    assert [r["loss"] for r in read_log(data / "straight")] == [r["loss"] for r in read_log(data / "resumed")]


def test_resume_with_other_settings_is_refused(data, tiny_weights, small_labelset):
    train(make_config(data, tiny_weights, small_labelset, iters=2))
    before = (data / "run" / "last.pt").read_bytes()
    for change, words in (({"lr": 0.02}, "lr 0.01 -> 0.02"), ({"crop": 32}, "crop 64 -> 32"),
                          ({"iters": 1}, "iters 2 -> 1"), ({"photometric": True}, "photometric False -> True")):
        with pytest.raises(ValueError, match=f"other settings.*{words}") as e:
            train(make_config(data, tiny_weights, small_labelset, **{"iters": 2, **change}))
        assert "\n" not in str(e.value) and "last.pt" in str(e.value)
    assert (data / "run" / "last.pt").read_bytes() == before


def test_larger_iters_continues_with_the_schedule_stretched(data, tiny_weights, small_labelset):
    """Rerun with a larger --iters: training goes on from last.pt's iteration; from there the lr
    is the poly curve of a run planned for the new end, and log.jsonl says so."""
    train(make_config(data, tiny_weights, small_labelset, iters=2))
    first = read_log(data / "run")
    train(make_config(data, tiny_weights, small_labelset, iters=5))
    log = read_log(data / "run")
    assert log[:2] == first  # the first two iterations are not redone
    event = [r for r in log if r.get("event") == "continued"]
    assert event == [{"iter": 2, "event": "continued", "iters": 5, "schedule": [[0, 2], [2, 5]],
                      "lr": pytest.approx(poly_lr(2, 5, 0.01))}]
    steps = [r for r in log if "loss" in r]
    assert [r["iter"] for r in steps] == [1, 2, 3, 4, 5]
    assert steps[1]["lr"] == pytest.approx(poly_lr(1, 2, 0.01))  # before: the old schedule
    for r in steps[2:]:  # after: the stretched one, lr of iteration it-1 of a 5-iteration plan
        assert r["lr"] == pytest.approx(poly_lr(r["iter"] - 1, 5, 0.01))
    last = torch.load(data / "run" / "last.pt", weights_only=True)
    assert last["iteration"] == 5 and last["schedule"] == [[0, 2], [2, 5]]
    assert json.loads((data / "run" / "config.json").read_text())["iters"] == 5
    # the same command again: nothing left to do, the student is rewritten from the same state
    train(make_config(data, tiny_weights, small_labelset, iters=5))
    assert [r["iter"] for r in read_log(data / "run") if "loss" in r] == [1, 2, 3, 4, 5]


def test_continued_run_resumes_exactly_after_an_interruption(data, tiny_weights, small_labelset):
    """A continued run killed half way resumes with the stretched schedule it had (not a new one)."""
    straight = str(data / "straight")
    train(make_config(data, tiny_weights, small_labelset, iters=2, out=straight))
    train(make_config(data, tiny_weights, small_labelset, iters=5, out=straight))
    broken = str(data / "broken")
    train(make_config(data, tiny_weights, small_labelset, iters=2, out=broken))

    def stop(it, model):
        if it == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(make_config(data, tiny_weights, small_labelset, iters=5, out=broken), on_iteration=stop)
    train(make_config(data, tiny_weights, small_labelset, iters=5, out=broken))
    a = torch.load(Path(straight) / "last.pt", weights_only=True)
    b = torch.load(Path(broken) / "last.pt", weights_only=True)
    assert a["schedule"] == b["schedule"] == [[0, 2], [2, 5]]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert [r.get("lr") for r in read_log(Path(straight))] == [r.get("lr") for r in read_log(Path(broken))]


def _ddp_worker(rank: int, world: int, port: int, cfg: DistillConfig) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from seglabel.models.clip import register_model_config

    register_model_config(TINY_CONFIGS["tiny-vit"])
    seen, weights = [], []

    def record(it, model):
        seen.append(it)
        weights[:] = [torch.cat([p.detach().flatten() for p in model.parameters()])]

    try:
        train(cfg, on_iteration=record)
        # after DDP's all-reduce every rank holds the same weights
        torch.save({"iters": seen, "weights": weights[0]}, Path(cfg.out) / f"rank{rank}.pt")
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_cpu_processes(data, tiny_weights, small_labelset):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = make_config(data, tiny_weights, small_labelset, iters=2, batch_size=2)
    mp.spawn(_ddp_worker, args=(2, port, cfg), nprocs=2, join=True)
    run = data / "run"
    assert (run / "student.pt").is_file()
    assert [r["iter"] for r in read_log(run)] == [1, 2]  # rank 0 alone logs
    r0, r1 = (torch.load(run / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["iters"] == r1["iters"] == [1, 2]
    assert torch.allclose(r0["weights"], r1["weights"], atol=1e-6)


# -- the trained student labels folders ---------------------------------------------------------
def test_student_labels_a_folder_and_reencodes_other_labels(data, tiny_weights, small_labelset, monkeypatch):
    from seglabel.images import load_image
    from seglabel.labelset import LabelSet
    from seglabel.models import deeplab
    from seglabel.predict import Predictor, Protocol

    train(make_config(data, tiny_weights, small_labelset, iters=2))
    student = deeplab.build_student(str(data / "run" / "student.pt"))
    labelset = load_labelset(small_labelset)

    def no_clip(*a, **k):
        raise AssertionError("the same label set must reuse the stored embeddings")

    monkeypatch.setattr(deeplab, "build_text_encoder", no_clip)
    student.set_labels(labelset)
    predictor = Predictor(student, Protocol(short_side=64))
    pred = predictor.predict([load_image(data / "photos" / "a.jpg")])[0]
    assert pred.labels.shape == SIZE and pred.labels.max() < len(labelset)
    assert np.all((pred.confidence > 0) & (pred.confidence <= 1))
    monkeypatch.undo()

    other = LabelSet.from_names(["cat", "dog", "tree", "car"], templates=["a photo of a {}."])
    student.set_labels(other)
    assert student.text_embeddings.shape == (4, 32)
    spec = {"model": "tiny-vit", "pretrained": str(tiny_weights["tiny-vit"]), "config": None}
    assert torch.allclose(student.text_embeddings, deeplab.encode_labelset(spec, other), atol=1e-6)
    pred = predictor.predict([load_image(data / "photos" / "b.png")])[0]
    assert pred.labels.max() < 4


def test_student_is_self_contained_for_its_clip_config(data, tiny_weights, small_labelset):
    train(make_config(data, tiny_weights, small_labelset, iters=1))
    ckpt = torch.load(data / "run" / "student.pt", weights_only=True)
    assert ckpt["clip"]["model"] == "tiny-vit" and ckpt["clip"]["config"]["embed_dim"] == 32
    assert ckpt["labelset"]["classes"][0]["name"] == "sky"


# -- inputs ---------------------------------------------------------------------------------------
def test_pseudo_folder_with_run_record_needs_no_labels_flag(data, tiny_weights, small_labelset):
    pseudo = data / "labels"
    pseudo.mkdir()
    os.rename(data / "pseudo", pseudo / "masks")  # annotate's layout: masks/ beside run.json
    record = {"model": "maskclip:tiny-vit", "labelset": load_labelset(small_labelset).to_dict(),
              "weights": {"model": "tiny-vit", "pretrained": str(tiny_weights["tiny-vit"])},
              "argv": ["seglabel", "annotate", "--model-config", str(TINY_CONFIGS["tiny-vit"])]}
    (pseudo / "run.json").write_text(json.dumps(record))
    cfg = make_config(data, tiny_weights, small_labelset, pseudo=str(pseudo), labels=None, clip=None,
                      pretrained=None, model_config=None, iters=1)
    train(cfg)
    ckpt = torch.load(data / "run" / "student.pt", weights_only=True)
    assert ckpt["clip"]["pretrained"] == str(tiny_weights["tiny-vit"])
    assert [c["name"] for c in ckpt["labelset"]["classes"]] == ["sky", "grass", "road"]


def test_bad_pairs_are_reported_skips(tmp_path, caplog):
    write_images(tmp_path / "photos", ["ok.png", "nomask.png", "small.png", "badid.png"], size=SIZE)
    write_masks(tmp_path / "m", ["ok.png", "orphan.png"])
    write_masks(tmp_path / "m", ["small.png"], size=(20, 20))
    write_masks(tmp_path / "m", ["badid.png"], value_bottom=7)
    scan = scan_pairs(tmp_path / "photos", tmp_path / "m", num_classes=3, ignore_index=255)
    assert [p.key for p in scan.pairs] == ["ok"]
    reasons = {Path(p).stem: r for p, r in scan.skipped}
    assert "no mask" in reasons["nomask"]
    assert "differs from its image" in reasons["small"]
    assert "class id 7 is outside the label set" in reasons["badid"]
    assert "mask without an image" in reasons["orphan"]
    with caplog.at_level("INFO", logger="seglabel"):
        scan.report()
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert sorted(Path(line.split(": ")[1]).stem for line in warned) == ["badid", "nomask", "orphan", "small"]
    assert any("1 training images, 4 skipped" in r.getMessage() for r in caplog.records if r.levelname == "INFO")


def test_no_usable_pair_is_one_clear_error(tmp_path):
    write_images(tmp_path / "photos", ["a.png"], size=SIZE)
    write_masks(tmp_path / "m", ["b.png"])
    with pytest.raises(DataError, match="no usable .* pair") as e:
        scan_pairs(tmp_path / "photos", tmp_path / "m", num_classes=3, ignore_index=255)
    assert "\n" not in str(e.value)


def test_cli_errors_are_one_line_exit_2(tmp_path):
    import typer
    from typer.testing import CliRunner

    from seglabel.cli_distill import distill

    app = typer.Typer()
    app.command("distill")(distill)
    app.command("other")(lambda: None)  # several commands: typer keeps the subcommand name
    r = CliRunner().invoke(app, ["distill", "--images", str(tmp_path / "none"), "--pseudo", str(tmp_path),
                                 "--out", str(tmp_path / "run"), "--labels", str(tmp_path / "x.yaml")])
    assert r.exit_code == 2
    assert r.output.strip().count("\n") == 0 and "seglabel: error:" in r.output


def test_online_teacher_self_training_and_validation(data, tiny_weights, small_labelset):
    val = data / "val"
    write_images(val / "images", ["v.png"], size=SIZE, seed=3)
    write_masks(val / "masks", ["v.png"])
    cfg = make_config(data, tiny_weights, small_labelset, pseudo=None, teacher="maskclip:tiny-vit",
                      iters=2, self_train_after=1, val_images=str(val / "images"),
                      val_masks=str(val / "masks"), val_every=1)
    train(cfg)
    log = read_log(data / "run")
    losses = [r["loss"] for r in log if "loss" in r]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    mious = [r["val_miou"] for r in log if "val_miou" in r]
    assert len(mious) == 2 and all(0.0 <= v <= 1.0 for v in mious)
    assert torch.load(data / "run" / "student.pt", weights_only=True)["trained"]["teacher"] == "maskclip:tiny-vit"


def test_the_python_api_shows_a_tqdm_bar_unless_quiet(data, tiny_weights, small_labelset, capfd):
    """Issue 25 item 5: a distill started from Python (a notebook) shows its progress; the command
    line logs lines instead (progress_bar=False), and quiet shows nothing."""
    train(make_config(data, tiny_weights, small_labelset, iters=2, quiet=False))
    err = capfd.readouterr().err
    assert "distill" in err and "2/2" in err, err
    train(make_config(data, tiny_weights, small_labelset, iters=2, quiet=True, out=str(data / "quiet")))
    assert "2/2" not in capfd.readouterr().err


def test_how_the_student_labels_may_change_on_a_resumed_run(data, tiny_weights, small_labelset):
    """--upsample only changes labelling (the losses read bilinear logits): a rerun with another one
    continues from last.pt, and student.pt records the new one."""
    train(make_config(data, tiny_weights, small_labelset, iters=2, upsample="guided"))
    assert torch.load(data / "run" / "student.pt", weights_only=True)["arch"]["upsample"] == "guided"
    train(make_config(data, tiny_weights, small_labelset, iters=3, upsample="bilinear"))
    assert [r["iter"] for r in read_log(data / "run") if "loss" in r] == [1, 2, 3]
    assert torch.load(data / "run" / "student.pt", weights_only=True)["arch"]["upsample"] == "bilinear"


def test_the_package_names_its_parts_without_shadowing_them():
    """``seglabel.distill.train`` is the function whatever was imported before (issue 25 item 3: a
    name that means a module or a function depending on import order); the loop is ``training``."""
    import importlib

    import seglabel.distill as distill

    importlib.import_module("seglabel.distill.training")
    assert callable(distill.train) and distill.train is importlib.import_module("seglabel.distill.training").train
    for name in distill.__all__:
        assert not isinstance(getattr(distill, name), type(distill)), name
