"""What a rerun, a refused command or a strange file may never do (issue 15): lose or mix data,
leave a half-made output folder, or print more than one line per problem. Through the real CLI."""
from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path

import pytest
from PIL import Image

from conftest import TINY_CONFIGS, build_tiny_clip, write_images
from test_annotate_cli import annotate, run


def files_under(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_error_line(r) -> str:
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("seglabel: error: "), r.stderr
    return lines[0]


# -- 1: only seglabel's own temporaries are removed ---------------------------------------------------
def test_cleanup_removes_only_our_temporaries_when_out_is_the_input_folder(tmp_path, tiny_weights, small_labelset):
    photos = tmp_path / "p"
    write_images(photos, ["a.jpg", "sub/b.jpg"])
    users = {photos / ".upload.jpg.tmp": b"an upload in progress", photos / ".a.png.x7f3.tmp": b"mine",
             photos / "sub" / ".notes.tmp": b"notes", photos / ".coco.json.tmp": b"not ours either"}
    for path, data in users.items():
        path.write_bytes(data)
    ours = [photos / "masks" / ".a.png.seglabel-0f3a9c1e.tmp", photos / "records" / "sub" / ".b.json.seglabel-12345678.tmp",
            photos / ".coco.json.seglabel-abcdef01.tmp"]
    for path in ours:  # as a killed run leaves them
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half")
    r = annotate([photos], photos, small_labelset, tiny_weights, "tiny-vit", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["labelled"] == 2
    assert {p: p.read_bytes() for p in users} == users  # the user's files survive
    assert not any(p.exists() for p in ours)
    assert not list(photos.rglob("*.seglabel-*.tmp"))


# -- 2: output paths from a list depend on nothing but the file (and --root) ---------------------------
@pytest.mark.slow
def test_output_paths_from_a_list_do_not_move_when_the_list_grows(tmp_path, tiny_weights, small_labelset):
    data = tmp_path / "data"
    write_images(data, ["a/x.jpg", "a/y.jpg"])
    out = tmp_path / "labels"
    first = f"{data / 'a' / 'x.jpg'}\n{data / 'a' / 'y.jpg'}\n"
    r = annotate([], out, small_labelset, tiny_weights, "tiny-vit", "--from-list", "-", "--json", stdin=first)
    assert r.returncode == 0, r.stderr
    mirrored = str(data / "a" / "x.png").lstrip("/")
    assert (out / "masks" / mirrored).is_file()  # /tmp/.../data/a/x.jpg -> masks/tmp/.../data/a/x.png
    before = (out / "masks" / mirrored).stat().st_mtime_ns

    write_images(data, ["b/new.jpg"], seed=3)  # a new folder arrives; the list grows, with a comment
    grown = f"# nightly list\n{data / 'b' / 'new.jpg'}\n{data / 'gone.jpg'}\n" + first
    r = annotate([], out, small_labelset, tiny_weights, "tiny-vit", "--from-list", "-", "--json", stdin=grown)
    assert r.returncode == 3, r.stderr  # gone.jpg
    summary = json.loads(r.stdout)
    assert (summary["labelled"], summary["skipped"]) == (1, 2)  # nothing relabelled under a new path
    assert (out / "masks" / mirrored).stat().st_mtime_ns == before
    names = [i["file_name"] for i in json.loads((out / "coco.json").read_text())["images"]]
    assert len(names) == len(set(names)) == 3

    rooted = tmp_path / "rooted"  # --root: paths relative to it; relative entries too; outside: a problem
    write_images(tmp_path / "elsewhere", ["z.jpg"])
    listing = f"a/x.jpg\n{data / 'b' / 'new.jpg'}\n{tmp_path / 'elsewhere' / 'z.jpg'}\n"
    r = annotate([], rooted, small_labelset, tiny_weights, "tiny-vit", "--from-list", "-", "--root", str(data),
                 "--json", stdin=listing)
    assert r.returncode == 3, r.stderr
    assert sorted(files_under(rooted / "masks")) == ["a/x.png", "b/new.png"]
    assert "not inside --root" in json.loads(r.stdout)["failures"][0]["reason"]


# -- 3: weights by content; every record carries its settings ------------------------------------------
@pytest.mark.slow
def test_weights_are_known_by_content_not_by_path(tmp_path, small_labelset):
    from safetensors.torch import save_file

    photos, out = tmp_path / "photos", tmp_path / "labels"
    write_images(photos, ["a.jpg", "b.jpg"])
    weights = tmp_path / "w" / "tiny-vit.safetensors"
    weights.parent.mkdir()
    model, _ = build_tiny_clip("tiny-vit", seed=0)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    assert annotate([photos], out, small_labelset, {"tiny-vit": weights}).returncode == 0

    r = annotate([photos.resolve()], out.resolve(), small_labelset, {"tiny-vit": Path("tiny-vit.safetensors")},
                 "tiny-vit", "--json", cwd=weights.parent)  # the same file, spelled relative to another cwd
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["skipped"] == 2

    retrained, _ = build_tiny_clip("tiny-vit", seed=1)  # written in place: same path, other weights
    save_file({k: v.contiguous() for k, v in retrained.state_dict().items()}, str(weights))
    r = annotate([photos], out, small_labelset, {"tiny-vit": weights}, "tiny-vit", "--overwrite")
    assert r.returncode == 2 and "(changed: weights)" in one_error_line(r)


@pytest.mark.slow
def test_deleting_run_json_does_not_let_other_settings_mix_in(tmp_path, tiny_weights, small_labelset):
    photos, out = tmp_path / "photos", tmp_path / "labels"
    write_images(photos, ["a.jpg"])
    assert annotate([photos], out, small_labelset, tiny_weights).returncode == 0
    (out / "run.json").unlink()
    write_images(photos, ["b.jpg"], seed=4)
    r = annotate([photos], out, small_labelset, tiny_weights, "tiny-vit", "--min-confidence", "0.9")
    assert r.returncode == 2 and "records/a.json was labelled with other settings" in one_error_line(r)
    assert not (out / "masks" / "b.png").exists() and not (out / "run.json").exists()
    r = annotate([photos], out, small_labelset, tiny_weights, "tiny-vit", "--json")  # the same settings: fine
    assert r.returncode == 0 and json.loads(r.stdout)["skipped"] == 1


# -- 4: non-finite numbers ------------------------------------------------------------------------------
@pytest.mark.parametrize("flag, value", [("--logit-scale", "inf"), ("--logit-scale", "nan"),
                                         ("--min-confidence", "nan"), ("--min-confidence", "1.5")])
@pytest.mark.slow
def test_non_finite_or_out_of_range_numbers_are_refused(tmp_path, small_labelset, tiny_weights, flag, value):
    photos = tmp_path / "photos"
    write_images(photos, ["a.jpg"])
    r = annotate([photos], tmp_path / "o", small_labelset, tiny_weights, "tiny-vit", flag, value)
    assert r.returncode == 2 and f"{flag} {value}" in one_error_line(r)
    assert not (tmp_path / "o").exists()


def test_json_is_written_strictly_and_non_finite_scores_fail_the_image(tmp_path, small_labelset, tiny_weights):
    from seglabel.annotate import AnnotateConfig, annotate as run_annotate
    from seglabel.images import find_images
    from seglabel.labelset import load_labelset
    from seglabel.models.registry import load_segmenter
    from seglabel.predict import Protocol
    from seglabel.writers import to_json, write_json

    with pytest.raises(ValueError):
        to_json({"confidence": float("nan")})
    with pytest.raises(ValueError):
        write_json(tmp_path / "x.json", [math.inf])
    assert not (tmp_path / "x.json").exists()

    photos = tmp_path / "photos"
    write_images(photos, ["a.jpg", "b.jpg"])
    labelset = load_labelset(small_labelset)
    model = load_segmenter("maskclip:tiny-vit", labelset, pretrained=str(tiny_weights["tiny-vit"]),
                           model_config=str(TINY_CONFIGS["tiny-vit"]))
    forward = type(model).forward
    calls = []

    def nan_for_the_first(self, x):
        calls.append(1)
        logits = forward(self, x)
        return logits * float("nan") if len(calls) == 1 else logits

    type(model).forward = nan_for_the_first
    try:
        summary = run_annotate(find_images([photos]).items, model, labelset,
                               AnnotateConfig(out=tmp_path / "out", protocol=Protocol(short_side=64)), argv=[])
    finally:
        type(model).forward = forward
    assert summary.labelled == 1 and "not finite" in summary.failures[0][1]

    def strict(name):
        raise ValueError(f"{name} in strict JSON")

    for path in (tmp_path / "out").rglob("*.json"):
        json.loads(path.read_text(), parse_constant=strict)


# -- 6: outputs follow the umask -------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_outputs_follow_the_umask(tmp_path, small_labelset, tiny_weights, umask, mode):
    photos, out = tmp_path / "photos", tmp_path / "labels"
    write_images(photos, ["a.jpg"])
    r = annotate([photos], out, small_labelset, tiny_weights, "tiny-vit", "--overlay", "--save-scores",
                 preexec_fn=lambda: os.umask(umask))
    assert r.returncode == 0, r.stderr
    written = [p for p in out.rglob("*") if p.is_file() and p.name != ".lock"]
    assert len(written) == 6  # mask, scores, overlay, record, coco.json, run.json
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in written} == {p.name: mode for p in written}


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_checkpoints_written_like_distill_follow_the_umask(tmp_path, umask, mode):
    """distill saves last.pt and student.pt through the same atomic write (distill.state.save)."""
    import torch

    from seglabel.distill.state import save as _save

    previous = os.umask(umask)
    try:
        _save(tmp_path / "last.pt", {"iteration": 1, "w": torch.zeros(2)})
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "last.pt").stat().st_mode) == mode


# -- 7: a rerun asking for more outputs makes them ----------------------------------------------------
@pytest.mark.slow
def test_rerun_with_overlay_and_scores_makes_what_is_missing(tmp_path, tiny_weights, small_labelset):
    photos, out = tmp_path / "photos", tmp_path / "labels"
    write_images(photos, ["a.jpg", "x/b.jpg"])
    assert annotate([photos], out, small_labelset, tiny_weights).returncode == 0
    masks = files_under(out / "masks")
    r = annotate([photos], out, small_labelset, tiny_weights, "tiny-vit", "--overlay", "--save-scores", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["labelled"] == 2, r.stderr
    assert sorted(files_under(out / "overlays")) == ["a.jpg", "x/b.jpg"]
    assert sorted(files_under(out / "scores")) == ["a.png", "x/b.png"]
    assert files_under(out / "masks") == masks  # relabelled to the same bytes
    (out / "overlays" / "a.jpg").unlink()
    r = annotate([photos], out, small_labelset, tiny_weights, "tiny-vit", "--overlay", "--json")
    assert (json.loads(r.stdout)["labelled"], json.loads(r.stdout)["skipped"]) == (1, 1)


# -- 9 and 10: a refused command changes nothing, and is refused before the model loads --------------------
@pytest.mark.parametrize("extra, words", [(["--window", "60"], "--window 60 must be a multiple of 8"),
                                          (["--pamr", "--tta"], "give --pamr or --tta"),
                                          (["--short-side", "100000", "--max-long-side", "0"], "--max-pixels")])
@pytest.mark.slow
def test_a_refused_run_leaves_no_trace(tmp_path, tiny_weights, small_labelset, extra, words):
    photos, out = tmp_path / "photos", tmp_path / "new" / "labels"
    write_images(photos, ["a.jpg"])
    r = annotate([photos], out, small_labelset, tiny_weights, "tiny-vit", *extra)
    assert r.returncode == 2 and words in one_error_line(r)
    assert not (tmp_path / "new").exists()
    assert annotate([photos], out, small_labelset, tiny_weights).returncode == 0  # the corrected command runs


@pytest.mark.parametrize("extra, words", [(["--device", "tpu"], "--device tpu: not a device"),
                                          (["--device", "cuda:7"], "--device cuda:7"),
                                          (["--out", "FILE"], "exists and is not a folder"),
                                          (["--window", "8", "--tta"], "two different protocols")])
@pytest.mark.slow
def test_device_and_out_problems_are_usage_errors_before_any_model_loads(tmp_path, small_labelset, extra, words):
    import torch

    if extra == ["--device", "cuda:7"] and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    photos = tmp_path / "photos"
    write_images(photos, ["a.jpg"])
    (tmp_path / "FILE").write_text("a file")
    extra = [str(tmp_path / "FILE") if a == "FILE" else a for a in extra]
    # ViT-B-16's weights are not here: had the model been loaded first, that would be the error
    r = run("annotate", str(photos), "--labels", str(small_labelset), "--model", "maskclip:ViT-B-16",
            "--out", str(tmp_path / "o"), *extra)
    assert r.returncode == 2 and words in one_error_line(r)
    assert "weights" not in r.stderr and (tmp_path / "FILE").read_text() == "a file"


# -- 11 and 17: strange files stay per-file problems, reported on one line each ------------------------------
def test_fifo_and_newline_names_are_per_file_problems_on_one_line(tmp_path, tiny_weights, small_labelset):
    photos = tmp_path / "photos"
    write_images(photos, ["good.jpg"])
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    (photos / "bad\nname.jpg").write_bytes(b"not an image")
    r = annotate([fifo, photos], tmp_path / "out", small_labelset, tiny_weights)
    assert r.returncode == 3, r.stderr
    lines = r.stderr.strip().splitlines()
    assert any("pipe.jpg: not a regular file (a FIFO)" in line for line in lines), lines
    assert any("bad\\nname.jpg: not an image" in line for line in lines), lines
    assert all(line.startswith(("failed: ", "  failed: ", "1 labelled")) for line in lines), lines
    assert (tmp_path / "out" / "masks" / "good.png").is_file()


# -- 12: memory --------------------------------------------------------------------------------------------
LIMITED = """
import resource, sys
import torch, open_clip  # what the command imports anyway, then its thread pool started:
torch.nn.functional.conv2d(torch.zeros(1, 1, 64, 64), torch.zeros(1, 1, 3, 3))
mapped = int(next(l for l in open("/proc/self/status") if l.startswith("VmSize")).split()[1]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (mapped + int(sys.argv[1]), resource.RLIM_INFINITY))
sys.argv = ["seglabel", *sys.argv[2:]]
from seglabel.cli import main
main()
"""


def limited(tmp_path: Path, headroom: int, *args: str):
    import subprocess
    import sys

    script = tmp_path / "limited.py"
    script.write_text(LIMITED)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(script), str(headroom), *args], capture_output=True, text=True,
                          env=env, timeout=600)


@pytest.mark.slow
def test_images_too_big_for_the_memory_left_are_reported_not_crashed_on(tmp_path, tiny_weights, small_labelset):
    photos = tmp_path / "photos"
    write_images(photos, ["small.jpg"])
    Image.new("RGB", (8000, 6000), (90, 120, 200)).save(photos / "huge.png")  # 48 MP, a few kB on disk
    args = ["annotate", str(photos), "--labels", str(small_labelset), "--model", "maskclip:tiny-vit",
            "--model-config", str(TINY_CONFIGS["tiny-vit"]), "--pretrained", str(tiny_weights["tiny-vit"])]
    r = limited(tmp_path, 1 << 30, *args, "--out", str(tmp_path / "out"), "--short-side", "64", "--json")
    assert r.returncode == 3, r.stderr
    (failure,) = json.loads(r.stdout)["failures"]
    assert failure["path"].endswith("huge.png") and "8000x6000 needs about" in failure["reason"]
    assert (tmp_path / "out" / "masks" / "small.png").is_file()

    # A protocol whose model cannot fit (ViT attention over 1463x2048 input: tens of GB): each
    # image is reported, the run ends normally.
    (photos / "huge.png").unlink()
    r = limited(tmp_path, 1 << 30, *args, "--short-side", "100000", "--out", str(tmp_path / "big"))
    assert r.returncode == 3, r.stderr
    assert "not enough memory to label it at these settings" in r.stderr and "Traceback" not in r.stderr
    assert json.loads((tmp_path / "big" / "run.json").read_text())["status"] == "done"


# -- 14 and 16: one line for every usage error --------------------------------------------------------------
@pytest.mark.parametrize("args, words", [
    (["annotate", "p", "-l", "x.yaml", "--batch-size", "0"], "--batch-size 0: must be at least 1"),
    (["annotate", "p", "-l", "x.yaml", "--batch-size", "two"], "--batch-size two: "),
    (["annotate", "p", "-l", "x.yaml", "--no-such-flag"], "no such option: --no-such-flag"),
    (["annotate", "p"], "--labels"),
    (["annotate", "p", "-l", "x.yaml", "--overlay", "true"], "--overlay is a flag and takes no value"),
    (["distill", "--images", "p", "--out", "r", "--iters", "0"], "--iters 0: "),
    (["export", "o", "--format"], "--format"),
    (["nope"], "nope"),
    (["distill", "--images", ".", "--out", "afile"], "--out afile: exists and is not a folder"),
])
@pytest.mark.slow
def test_usage_errors_are_one_line_exit_2(tmp_path, args, words):
    (tmp_path / "afile").write_text("not a folder")
    r = run(*args, cwd=tmp_path)
    assert r.returncode == 2 and words in one_error_line(r)


def test_a_bad_slurm_task_id_names_the_variable(tmp_path, small_labelset):
    from seglabel.errors import UsageError
    from seglabel.runs import parse_shard

    with pytest.raises(UsageError, match="SLURM_ARRAY_TASK_ID='abc'"):
        parse_shard(None, env={"SLURM_ARRAY_TASK_ID": "abc", "SLURM_ARRAY_TASK_COUNT": "4"})
    with pytest.raises(UsageError, match="SLURM_ARRAY_TASK_COUNT=2"):
        parse_shard(None, env={"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "2"})
    write_images(tmp_path / "photos", ["a.jpg"])
    r = run("annotate", str(tmp_path / "photos"), "-l", str(small_labelset), "--out", str(tmp_path / "o"),
            env={"SLURM_ARRAY_TASK_ID": "3\n", "SLURM_ARRAY_TASK_COUNT": "x"})
    assert r.returncode == 2 and "SLURM_ARRAY_TASK_COUNT='x'" in one_error_line(r)


# -- the design: one recipe; --dry-run checks what a run checks --------------------------------------------
def test_the_ray_annotator_is_refused_like_the_cli_before_writing(tmp_path, tiny_weights, small_labelset):
    from seglabel.errors import UsageError
    from seglabel.predict import Protocol
    from seglabel.ray import Annotator

    with pytest.raises(UsageError, match="--window 60 must be a multiple of 8"):
        Annotator(out=tmp_path / "o", labels=small_labelset, model="maskclip:tiny-vit",
                  pretrained=str(tiny_weights["tiny-vit"]), model_config=str(TINY_CONFIGS["tiny-vit"]),
                  device="cpu", protocol=Protocol(short_side=64, window=60))
    with pytest.raises(UsageError, match="--batch-size 0"):
        Annotator(out=tmp_path / "o", labels=small_labelset, batch_size=0)
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_dry_run_says_what_a_run_would_refuse(tmp_path, tiny_weights, small_labelset):
    photos, out = tmp_path / "photos", tmp_path / "labels"
    write_images(photos, ["a.jpg", "b.jpg"])
    (photos / "c.jpg").write_bytes(b"not an image")
    r = annotate([photos], out, small_labelset, tiny_weights, "tiny-vit", "--dry-run", "--json")
    assert r.returncode == 3, r.stderr  # c.jpg: found from its header, not listed as to label
    plan = json.loads(r.stdout)
    assert [Path(p).name for p in plan["todo"]] == ["a.jpg", "b.jpg"]
    assert [Path(p["path"]).name for p in plan["problems"]] == ["c.jpg"]
    assert not out.exists()

    assert annotate([photos], out, small_labelset, tiny_weights).returncode == 3
    before = files_under(out)
    r = annotate([photos], out, small_labelset, tiny_weights, "tiny-vit", "--dry-run", "--min-confidence", "0.5")
    assert r.returncode == 2 and "changed: min_confidence" in one_error_line(r)
    r = annotate([photos], out, small_labelset, tiny_weights, "tiny-vit", "--dry-run", "--device", "cuda:9")
    assert r.returncode == 2
    assert files_under(out) == before


def test_library_errors_share_one_hierarchy():
    from seglabel import errors, exitcodes
    from seglabel.checkpoints import CheckpointError
    from seglabel.distill.data import DataError
    from seglabel.evaluate import EvalError
    from seglabel.exports.run_output import OutputFolderError
    from seglabel.images import ImageError
    from seglabel.labelset import LabelSetError
    from seglabel.models.clip import WeightsUnavailable
    from seglabel.runs import RunError, SettingsMismatch
    from seglabel.writers import OutputError

    for usage in (CheckpointError, DataError, EvalError, OutputFolderError, ImageError, LabelSetError,
                  WeightsUnavailable, RunError, SettingsMismatch):
        assert issubclass(usage, errors.UsageError) and usage.exit_code == exitcodes.USAGE
    assert issubclass(OutputError, errors.SeglabelError) and OutputError.exit_code == exitcodes.ERROR
    assert issubclass(errors.Terminated, KeyboardInterrupt) and errors.Terminated.exit_code == 143
    assert errors.one_line("a\nb\x1b[31m\u2028c") == "a\\nb\\x1b[31m\\u2028c"
