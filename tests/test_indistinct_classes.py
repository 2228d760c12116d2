"""Classes a model cannot tell apart (issue 22, item 6): names equal after Unicode normalisation
and case are one name (refused, a duplicate class); a class whose prompts are all, to the text
encoder's tokenizer (after its context cut), prompts of a class listed before it can never win a
pixel: `labelsets check` and annotate warn, by the token ids, not by the strings (as they warn
about prompts shared as text)."""
from __future__ import annotations

import pytest

from conftest import TINY_CONFIGS, write_images
from seglabel.labelset import LabelSetError, parse_labelset
from test_annotate_cli import annotate, run
from test_integrity import one_error_line

LONG = "a photo of " + "a very " * 40  # past 77 tokens before the words that differ


def test_names_equal_after_nfc_and_case_are_duplicates():
    for a, b in (("café", "cafe\u0301"), ("Straße", "STRASSE"), ("\u00c5ngstr\u00f6m", "\u212bngstr\u00f6m")):
        with pytest.raises(LabelSetError, match="duplicate class"):
            parse_labelset({"classes": [a, "x", b]})


def test_clip_cannot_tell_prompts_apart_past_its_77_tokens(tmp_path):
    from open_clip import get_tokenizer

    from seglabel.text import shadowed_classes

    ls = parse_labelset({"templates": "none", "classes": [
        {"name": "red car", "prompts": [LONG + "red car"]}, {"name": "blue car", "prompts": [LONG + "blue car"]},
        "road"]})
    assert shadowed_classes(ls, get_tokenizer("ViT-B-16"), ()) == [(1, 0)]
    short = parse_labelset({"templates": "none", "classes": ["red car", "blue car", "road"]})
    assert shadowed_classes(short, get_tokenizer("ViT-B-16"), ()) == []


def test_nfd_and_nfc_prompts_of_two_classes_are_the_same_to_clip():
    from open_clip import get_tokenizer

    from seglabel.text import shadowed_classes

    ls = parse_labelset({"classes": [{"name": "cafe", "prompts": ["café"]},
                                     {"name": "coffee shop", "prompts": ["CAFE\u0301"]}]})
    assert shadowed_classes(ls, get_tokenizer("ViT-B-16"), ("a photo of a {}.",)) == [(1, 0)]


def test_a_class_with_a_prompt_of_its_own_can_still_win():
    from open_clip import get_tokenizer

    from seglabel.text import shadowed_classes

    ls = parse_labelset({"templates": "none", "classes": [
        {"name": "car", "prompts": [LONG + "red car"]},
        {"name": "truck", "prompts": [LONG + "blue car", "truck"]}]})
    assert shadowed_classes(ls, get_tokenizer("ViT-B-16"), ()) == []


def write_long_prompts(path, words: int) -> None:
    prefix = "a photo of " + "a very " * words
    path.write_text(f"templates: none\nclasses:\n  - {{name: red car, prompts: ['{prefix}red car']}}\n"
                    f"  - {{name: blue car, prompts: ['{prefix}blue car']}}\n  - road\n")


def warnings(r) -> list[str]:
    return [line for line in r.stderr.splitlines() if line.startswith("seglabel: warning: ")]


@pytest.mark.slow
def test_labelsets_check_warns_by_the_default_clip_tokenizer(tmp_path):
    labels = tmp_path / "long.yaml"
    write_long_prompts(labels, 40)
    r = run("labelsets", "check", str(labels))
    assert r.returncode == 0 and r.stdout == f"{labels}: ok, 3 classes, 3 prompts\n"
    [line] = warnings(r)
    assert str(labels) in line and "'blue car' can never win a pixel" in line and "77 tokens" in line
    assert "'red car', listed before it" in line
    write_long_prompts(labels, 2)
    assert warnings(run("labelsets", "check", str(labels))) == []


@pytest.mark.slow
def test_labelsets_check_with_another_towers_tokenizer(tmp_path):
    labels = tmp_path / "long.yaml"
    write_long_prompts(labels, 12)  # past tiny-vit's 24 tokens, within CLIP's 77
    assert warnings(run("labelsets", "check", str(labels))) == []
    r = run("labelsets", "check", str(labels), "--model", "maskclip:tiny-vit", "--model-config",
            str(TINY_CONFIGS["tiny-vit"]))
    assert r.returncode == 0
    [line] = warnings(r)
    assert "24 tokens" in line and "maskclip:tiny-vit" in line
    r = run("labelsets", "check", str(labels), "--model", "maskclip:no-such-tower")
    assert r.returncode == 2 and "no-such-tower" in one_error_line(r)


def test_annotate_warns_by_its_models_own_tokenizer(tmp_path, tiny_weights):
    photos, labels = tmp_path / "photos", tmp_path / "long.yaml"
    write_images(photos, ["a.jpg"])
    write_long_prompts(labels, 12)
    r = annotate([photos], tmp_path / "out", labels, tiny_weights)
    assert r.returncode == 0, r.stderr
    [line] = warnings(r)
    assert "'blue car' can never win a pixel" in line and "24 tokens" in line


def test_prompts_equal_as_text_keep_their_one_warning(tmp_path):
    from open_clip import get_tokenizer

    from seglabel.text import indistinct_warnings

    ls = parse_labelset({"classes": ["road", {"name": "street", "prompts": ["Road"]}]})
    assert len(ls.warnings) == 1  # the label set's own (shared prompt)
    assert indistinct_warnings(ls, get_tokenizer("ViT-B-16"), ("a photo of a {}.",)) == []
