"""Any teacher a user can annotate with is a teacher distill can rebuild (issue 23 item 1).

For every model kind of the registry and every method of maskclip, with the options annotate
records: a real ``annotate`` run writes run.json; distill's teacher is rebuilt from it through
annotate's own recipe (``recipe.from_record`` -> ``recipe.prepare``), must have the recorded
settings and label an image exactly as the model that made the run. What cannot be rebuilt is
refused in one line before anything is loaded."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import TINY_CONFIGS, write_images
from seglabel.annotate import annotate
from seglabel.errors import UsageError
from seglabel.images import find_images
from seglabel.labelset import LabelSet
from seglabel.models.registry import SEGMENTERS
from seglabel.models.trainingfree import METHODS, VFM_METHODS
from seglabel.predict import Protocol, ProtocolOptions
from seglabel.recipe import Recipe, from_record, prepare

pytest.importorskip("skimage")  # corrclip's SLIC regions
LABELS = ["sky", "grass", "road"]

# (kind or method, annotate options as the CLI would give them, protocol fields)
CASES = [
    ("maskclip", {"method": "maskclip"}, {}),  # key smoothing and prompt denoising on (its defaults)
    ("maskclip", {"method": "maskclip", "key_smoothing": False, "logit_scale": 50.0}, {"pamr": True}),
    ("clearclip", {"method": "clearclip"}, {}),
    ("sclip", {"method": "sclip", "prompt_denoising": True}, {"window": 32, "window_stride": 16}),
    ("naclip", {"method": "naclip"}, {}),
    ("scclip", {"method": "scclip"}, {}),
    ("proxyclip", {"method": "proxyclip", "proxy": "clip"}, {}),
    ("corrclip", {"method": "corrclip", "proxy": "clip", "regions": "slic:16"}, {}),
    ("corrclip", {"method": "corrclip", "proxy": "clip", "regions": "slic", "logit_scale": 30.0},
     {"window": 32, "window_stride": 16}),
    ("lseg", {}, {}),
    ("student", {}, {}),
]
MODEL_OPTIONS = ("proxy", "proxy_weights", "regions")


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_weights):
    from test_deeplab import small_student
    from test_lseg import lightning_checkpoint, small_net

    from seglabel.models.deeplab import student_checkpoint

    folder = tmp_path_factory.mktemp("teachers")
    torch.save(lightning_checkpoint(small_net("vit")), folder / "lseg.ckpt")
    student, labelset = small_student(classes=LABELS)
    torch.save(student_checkpoint(student, labelset), folder / "student.pt")
    write_images(folder / "photos", ["a.png"], size=(40, 56))
    return folder


def annotate_run(out: Path, files: Path, tiny_weights, case: str, options: dict, protocol: dict):
    """A run as `seglabel annotate` makes it (the recipe, then annotate), and its run.json."""
    kind = case if case in ("lseg", "student") else "maskclip"
    spec = {"lseg": f"lseg:{files / 'lseg.ckpt'}", "student": f"student:{files / 'student.pt'}"}.get(kind, "maskclip:tiny-vit")
    flags = {k: v for k, v in options.items() if k not in MODEL_OPTIONS}
    given = ProtocolOptions(short_side=protocol.pop("short_side", 48), **protocol)
    recipe = Recipe(labels=LabelSet.from_names(LABELS), out=out, protocol=given, model=spec,
                    pretrained=str(tiny_weights["tiny-vit"]) if kind == "maskclip" else "openai",
                    model_config=str(TINY_CONFIGS["tiny-vit"]) if kind == "maskclip" else None, device="cpu",
                    model_options={k: v for k, v in options.items() if k in MODEL_OPTIONS}, **flags)
    ready = prepare(recipe)
    argv = ["seglabel", "annotate", str(files / "photos"), "--model", spec] + \
        [x for k, v in options.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    summary = annotate(find_images([files / "photos"]).items, ready.segmenter, ready.labelset, ready.config, argv=argv)
    assert summary.exit_code == 0, summary.failures
    return ready.segmenter, json.loads((out / "run.json").read_text())


def test_every_kind_and_method_has_a_case():
    kinds = {c for c, _, _ in CASES if c in SEGMENTERS} | {"maskclip"}
    assert kinds == set(SEGMENTERS), "add a teacher case for the new model kind"
    assert {c for c, _, _ in CASES} >= set(METHODS + VFM_METHODS), "add a teacher case for the new method"


@pytest.mark.slow
@pytest.mark.parametrize("case, options, protocol", CASES, ids=[f"{c}-{i}" for i, (c, _, _) in enumerate(CASES)])
def test_teacher_rebuilt_from_run_json_is_the_model_that_labelled(tmp_path, files, tiny_weights, case, options,
                                                                  protocol):
    from seglabel.distill.teacher import build_teacher, labels_mode

    original, record = annotate_run(tmp_path / "labels", files, tiny_weights, case, options, dict(protocol))
    recipe = from_record(record, str(tmp_path / "labels" / "run.json"), device="cpu")
    labelset = LabelSet.from_names(LABELS)
    teacher = build_teacher(recipe, labelset, torch.device("cpu"), record["settings"], "run.json")  # refuses a difference
    assert teacher.model.describe() == original.describe()
    assert teacher.protocol == Protocol(**{k: tuple(v) if isinstance(v, list) else v
                                           for k, v in record["settings"]["protocol"].items()})
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(teacher.model(x), original.eval()(x))
    heavy = case in VFM_METHODS or case == "lseg" or protocol.get("window")
    assert labels_mode(recipe, "auto") == ("cached" if heavy else "online")


def record_with(tmp_path: Path, method: dict, argv: list[str]) -> dict:
    return {"model": "maskclip:tiny-vit", "labelset": LabelSet.from_names(LABELS).to_dict(), "cwd": str(tmp_path),
            "argv": ["seglabel", "annotate", "x", *argv], "weights": {"pretrained": "openai"},
            "settings": {"method": {"tower": "vit", **method}, "protocol": {"short_side": 48}}}


def test_second_model_and_region_files_are_found_where_the_run_read_them(tmp_path):
    """run.json records these files by name and size only; the path comes from its command line
    (relative to its cwd) or from distill's flags, and must be the same file."""
    (tmp_path / "dino.pth").write_bytes(b"x" * 100)
    (tmp_path / "sam2.pt").write_bytes(b"y" * 50)
    proxy = {"method": "proxyclip", "proxy": "dino:vitb8", "proxy_weights": ["dino.pth", 100]}
    recipe = from_record(record_with(tmp_path, proxy, ["--proxy-weights", "dino.pth"]), "RUN/run.json")
    assert recipe.model_options == {"proxy": "dino:vitb8", "proxy_weights": str(tmp_path / "dino.pth")}
    regions = {"method": "corrclip", "proxy": "clip", "regions": "sam2", "regions_weights": ["sam2.pt", 50]}
    recipe = from_record(record_with(tmp_path, regions, ["--regions", "sam2:sam2.pt"]), "RUN/run.json")
    assert recipe.model_options == {"proxy": "clip", "regions": f"sam2:{tmp_path / 'sam2.pt'}"}

    moved = tmp_path / "moved"
    moved.mkdir()
    (tmp_path / "dino.pth").rename(moved / "dino.pth")
    with pytest.raises(UsageError, match=r"^RUN/run.json: its --proxy-weights file .*dino.pth is not there any more; "
                                         r"pass --proxy-weights") as e:
        from_record(record_with(tmp_path, proxy, ["--proxy-weights", "dino.pth"]), "RUN/run.json")
    assert "\n" not in str(e.value)
    given = from_record(record_with(tmp_path, proxy, ["--proxy-weights", "dino.pth"]), "RUN/run.json",
                        overrides={"proxy_weights": str(moved / "dino.pth")})
    assert given.model_options["proxy_weights"] == str(moved / "dino.pth")
    (tmp_path / "other.pth").write_bytes(b"z" * 7)
    with pytest.raises(UsageError, match=r"is not the --proxy-weights file the run read \(it recorded \['dino.pth', 100\]\)"):
        from_record(record_with(tmp_path, proxy, []), "RUN/run.json", overrides={"proxy_weights": str(tmp_path / "other.pth")})
    with pytest.raises(UsageError, match=r"records the file of --regions only as \['sam2.pt', 50\]; pass --regions FILE"):
        from_record(record_with(tmp_path, regions, []), "RUN/run.json")


@pytest.mark.parametrize("method, words", [
    ({"method": "corrclip", "proxy": "clip", "regions": "slic", "vote": False}, "without the region vote"),
    ({"method": "sclip", "temperature": 2}, r"cannot rebuild \(temperature\)"),
])
def test_what_annotate_cannot_rebuild_is_refused_in_one_line(tmp_path, method, words):
    with pytest.raises(UsageError, match=words) as e:
        from_record(record_with(tmp_path, method, []), "RUN/run.json")
    assert str(e.value).startswith("RUN/run.json: ") and "\n" not in str(e.value)


@pytest.mark.slow
def test_a_teacher_that_would_label_differently_is_refused(tmp_path, files, tiny_weights):
    """The last guard: should the recipe miss an option annotate recorded, the rebuilt teacher's
    settings differ from the record's and it is refused, never used silently."""
    from seglabel.distill.teacher import build_teacher

    _, record = annotate_run(tmp_path / "labels", files, tiny_weights, "sclip", {"method": "sclip"}, {})
    recipe = from_record(record, "run.json", device="cpu")
    recipe.prompt_denoising = True  # an option the record does not have
    with pytest.raises(UsageError, match=r"^RUN: the teacher rebuilt from it would label with other settings "
                                         r"\(changed: method\)") as e:
        build_teacher(recipe, LabelSet.from_names(LABELS), torch.device("cpu"), record["settings"], "RUN")
    assert "\n" not in str(e.value)
