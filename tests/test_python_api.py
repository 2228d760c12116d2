"""The Python API (issue 25, item 3): every name of ``seglabel.__all__`` is what it says whatever
was imported before, and ``seglabel.label_folders`` is a whole run as ``seglabel annotate`` makes
it, with the same checks and outputs."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import TINY_CONFIGS, write_images
from test_annotate_cli import annotate as annotate_cli

NAMES_CHECK = r"""
import importlib, json, pkgutil, sys, types
import seglabel

def check(where):
    wrong = []
    for name in seglabel.__all__:
        obj = getattr(seglabel, name)
        if name == "__version__":
            ok = isinstance(obj, str)
        else:
            ok = (not isinstance(obj, types.ModuleType) and getattr(obj, "__name__", None) == name
                  and getattr(obj, "__module__", "").startswith("seglabel."))
        if not ok:
            wrong.append(f"{where}: seglabel.{name} is {obj!r}")
    return wrong

wrong = check("fresh")
star = {}
exec("from seglabel import *", star)
wrong += [f"star: {n} missing" for n in seglabel.__all__ if n not in star]
for info in pkgutil.walk_packages(seglabel.__path__, "seglabel."):
    if info.name != "seglabel.__main__":
        importlib.import_module(info.name)
wrong += check("after importing every submodule")
print(json.dumps(wrong))
"""


def test_every_exported_name_is_what_it_says_whatever_was_imported():
    """``seglabel.annotate`` was the function until something imported the module of the same
    name; no exported name is a submodule's now, and each is the function or class it names."""
    r = subprocess.run([sys.executable, "-c", NAMES_CHECK], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == []


def test_the_names_check_catches_a_shadowing_module():
    """The check above fails for the old ``seglabel.annotate`` (function vs module)."""
    r = subprocess.run([sys.executable, "-c", NAMES_CHECK.replace(
        "import seglabel\n", "import seglabel\nseglabel.__all__ = [*seglabel.__all__, 'annotate']\n"
        "seglabel._LAZY['annotate'] = 'seglabel.annotate'\n")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    wrong = json.loads(r.stdout)
    assert wrong and all(w.endswith("seglabel.annotate is <module 'seglabel.annotate' from "
                                    f"'{__import__('seglabel').__path__[0]}/annotate.py'>") for w in wrong)


def tiny(weights, **more):
    return dict(model="maskclip:tiny-vit", model_config=str(TINY_CONFIGS["tiny-vit"]),
                pretrained=str(weights["tiny-vit"]), short_side=64, device="cpu", **more)


@pytest.mark.slow
def test_label_folders_writes_what_the_cli_writes(tmp_path, tiny_weights, small_labelset):
    import seglabel

    photos = tmp_path / "photos"
    write_images(photos, ["a.jpg", "x/b.png"], size=(45, 70))
    (photos / "broken.png").write_bytes(b"not a png")
    assert annotate_cli([photos], tmp_path / "cli", small_labelset, tiny_weights, "tiny-vit", "--overlay").returncode == 3
    summary = seglabel.label_folders(photos, small_labelset, tmp_path / "api", overlay=True, progress=False,
                                     **tiny(tiny_weights))
    assert (summary.labelled, summary.exit_code) == (2, 3)
    assert [path for path, _ in summary.failures] == [str(photos / "broken.png")]
    for name in ("masks/a.png", "masks/x/b.png", "overlays/a.jpg", "coco.json"):
        cli, api = (tmp_path / "cli" / name).read_bytes(), (tmp_path / "api" / name).read_bytes()
        assert api == cli if name != "coco.json" else json.loads(api)["annotations"] == json.loads(cli)["annotations"]
    settings = [json.loads((tmp_path / o / "run.json").read_text())["settings"] for o in ("cli", "api")]
    assert settings[0] == settings[1]  # the same settings: one could resume the other


def test_label_folders_makes_the_commands_checks(tmp_path, tiny_weights, small_labelset, capsys):
    import seglabel
    from seglabel.errors import UsageError

    photos = tmp_path / "photos"
    write_images(photos, ["a.png", "b.png", "c.png"])
    out = photos / "labels"  # --out inside an input: never walked as photos
    for refused, options in (("give the label set", dict(labels=None)),
                             ("give image files or folders", dict(inputs=[])),
                             ("--short-side 0: must be at least 1", dict(short_side=0)),
                             ("--protocol best: choose default or paper", dict(protocol="best")),
                             ("--shard '3/2' must be I/N", dict(shard="3/2")),
                             ("unknown model option 'colour'", dict(colour="red"))):
        with pytest.raises(UsageError, match=refused):
            seglabel.label_folders(**{"inputs": photos, "labels": small_labelset, "out": out,
                                      **tiny(tiny_weights), **options})
        assert not out.exists()  # refused before anything was written

    first = seglabel.label_folders(photos, small_labelset, out, shard=(0, 2), **tiny(tiny_weights))
    assert (first.total, first.labelled) == (2, 2)  # a.png and c.png: every 2nd input from the 0th
    assert "labelling: 100%" in capsys.readouterr().err  # tqdm's bar when no command line drives the run
    assert (out / "runs" / "shard-0-of-2.json").is_file() and not (out / "coco.json").exists()
    second = seglabel.label_folders([photos], small_labelset, out, shard="1/2", progress=False, **tiny(tiny_weights))
    assert (second.total, second.labelled) == (1, 1) and "labelling" not in capsys.readouterr().err
    dry = seglabel.plan_folders(photos, small_labelset, out, shard="0/2", **tiny(tiny_weights))
    assert ([i.rel for i in dry.todo], [i.rel for i in dry.done], dry.problems) == ([], ["a.png", "c.png"], [])
