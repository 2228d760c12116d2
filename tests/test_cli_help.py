"""What the command line says about itself: version, grouped help with flags shown as flags,
the model catalogue, the missing-weights line, and --open on a machine without a browser (issue 16)."""
from __future__ import annotations

import json
import re

import pytest

from conftest import write_images
from test_annotate_cli import run

from seglabel import __version__


def test_version():
    r = run("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"seglabel {__version__}"


def test_annotate_help_groups_options_and_shows_flags_as_flags():
    r = run("annotate", "--help")
    assert r.returncode == 0
    text = r.stdout
    for panel in ("Inputs", "Model", "Protocol", "Outputs", "Run"):
        assert re.search(rf"─ {panel} ─", text), panel
    assert "<bool>" not in text  # --overlay, --pamr, --help ... take no value
    assert "cuda:N" in text
    # each option sits in the panel it belongs to
    assert text.index("--overlay") > text.index("─ Outputs ─") > text.index("--pamr") > text.index("─ Protocol ─")


def test_distill_and_the_other_commands_show_no_bool_type():
    for command in (["distill"], ["eval"], ["preview"], ["models"], ["--help"]):
        r = run(*command, "--help") if command != ["--help"] else run("--help")
        assert r.returncode == 0 and "<bool>" not in r.stdout, command


def test_distill_help_groups_options_from_inputs_to_run():
    text = run("distill", "--help").stdout
    at = [text.index(f"─ {panel} ─") for panel in ("Inputs", "Teacher", "Student", "Training", "Outputs", "Run")]
    assert at == sorted(at)
    assert at[0] < text.index("--pseudo") < at[1] < text.index("--ignore-unsure") < at[2] < text.index("--depth") < at[3]
    assert at[3] < text.index("--affinity-weight") < at[4] < text.index("--save-every") < at[5] < text.index("--no-amp")
    r = run("distill", "--images", "x", "--out", "y", "--quiet", "yes")
    assert r.returncode == 2 and "--quiet is a flag and takes no value" in r.stderr, r.stderr


@pytest.mark.slow
def test_models_lists_every_kind_with_tags_and_the_recommended_one():
    r = run("models", "--json")
    assert r.returncode == 0, r.stderr
    catalog = {k["kind"]: k for k in json.loads(r.stdout)}
    assert set(catalog) == {"maskclip", "lseg", "student"}
    assert catalog["lseg"]["spec"] == "lseg:FILE" and catalog["student"]["example"].startswith("student:")
    models = {m["spec"]: m for m in catalog["maskclip"]["models"]}
    vit = models["maskclip:ViT-B-16"]
    assert vit["recommended"] == "openai" and "laion2b_s34b_b88k" in vit["pretrained"]
    assert all(m["pretrained"] for m in models.values())  # --all adds those without weights
    text = run("models").stdout
    assert "lseg:FILE" in text and "student:FILE" in text and "openai*" in text and "-quickgelu" in text


def test_missing_weights_line_says_where_it_looked_and_how_to_supply_them(tmp_path, small_labelset):
    photos = tmp_path / "photos"
    write_images(photos, ["a.jpg"])
    r = run("annotate", str(photos), "--labels", str(small_labelset), "--out", str(tmp_path / "o"),
            "--cache-dir", str(tmp_path / "cache"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    line = r.stderr
    assert f"looked in {tmp_path / 'cache'}" in line
    assert "open_clip.create_model('ViT-B-16', pretrained='openai')" in line
    assert "--model maskclip:ViT-B-16-quickgelu --pretrained FILE" in line and "toy demo" in line
    assert not (tmp_path / "o").exists()


def test_preview_open_without_a_browser_says_so(tmp_path, monkeypatch, capsys):
    import webbrowser

    from seglabel import cli
    from seglabel.preview import PreviewResult

    index = tmp_path / "preview" / "index.html"
    monkeypatch.setattr("seglabel.preview.build_preview",
                        lambda *a, **k: PreviewResult(index, 1, 1, 1, []))
    monkeypatch.setattr(webbrowser, "open", lambda url: False)  # what it returns when none is found
    assert cli.run(["preview", str(tmp_path), "--open"]) == 0
    err = capsys.readouterr().err
    assert "no web browser found" in err and index.resolve().as_uri() in err
