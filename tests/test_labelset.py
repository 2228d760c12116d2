from __future__ import annotations

import pytest

from seglabel.labelset import LabelSetError, default_color, load_labelset, parse_labelset


def write(tmp_path, text):
    p = tmp_path / "ls.yaml"
    p.write_text(text)
    return p


def test_full_labelset(tmp_path):
    ls = load_labelset(write(tmp_path, """
name: demo
templates: ['a photo of {}.', '{}']
classes:
  - sky
  - name: person
    prompts: [person, pedestrian]
    color: '#dc143c'
  - name: car
    color: [0, 0, 142]
catch_all: {name: other, prompts: [other, stuff]}
ignore:
  min_confidence: 0.25
  classes: [other]
"""))
    assert ls.name == "demo" and ls.names == ["sky", "person", "car", "other"]
    assert ls.prompts == ["sky", "person", "pedestrian", "car", "other", "stuff"]
    assert ls.prompt_class == [0, 1, 1, 2, 3, 3]
    assert ls.classes[1].color == (220, 20, 60) and ls.classes[2].color == (0, 0, 142)
    assert ls.classes[0].color == default_color(0)
    assert ls.classes[3].catch_all and ls.classes[3].ignore and not ls.classes[2].ignore
    assert ls.min_confidence == 0.25 and ls.templates == ("a photo of {}.", "{}")
    assert ls.ignore_index == 255
    again = parse_labelset(ls.to_dict())
    assert again.classes == ls.classes and again.fingerprint() == ls.fingerprint()


def test_defaults_and_templates_none(tmp_path):
    ls = load_labelset(write(tmp_path, "classes: [a, b]\n"))
    assert ls.name == "ls" and ls.templates is None and ls.min_confidence == 0.0
    assert load_labelset(write(tmp_path, "templates: none\nclasses: [a]\n")).templates == ()


def test_fingerprint_changes_with_prompts():
    a = parse_labelset({"classes": ["road", "sky"]})
    b = parse_labelset({"classes": ["road", {"name": "sky", "prompts": ["blue sky"]}]})
    assert a.fingerprint() != b.fingerprint()


def test_voc_colours():
    assert [default_color(i) for i in range(4)] == [(0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 0)]
    assert default_color(15) == (192, 128, 128)


def test_many_classes_use_16_bit_ignore():
    ls = parse_labelset({"classes": [f"c{i}" for i in range(300)]})
    assert ls.ignore_index == 65535


@pytest.mark.parametrize("text, where, problem", [
    ("classes: [a]\nfoo: 1\n", 2, "unknown key 'foo'"),
    ("classes:\n  - a\n  - name: b\n    colour: red\n", 4, "unknown key 'colour'"),
    ("classes:\n  - a\n  - A\n", 3, "duplicate class 'A'"),
    ("classes:\n  - name: a\n    prompts: ['x', '  ']\n", 3, "empty prompt"),
    ("classes:\n  - name: a\n    prompts: []\n", 3, "'prompts' must be a non-empty list"),
    ("classes:\n  - name: a\n    color: [1, 2, 300]\n", 3, "bad colour"),
    ("classes:\n  - name: a\n    color: '#12345'\n", 3, "bad colour"),
    ("templates:\n  - 'a photo'\nclasses: [a]\n", 2, "has no '{}'"),
    ("classes: []\n", 1, "non-empty list"),
    ("classes: [a]\nignore: {classes: [b]}\n", 2, "unknown class 'b'"),
    ("classes: [a]\nignore: {min_confidence: 2}\n", 2, "min_confidence"),
    ("classes: [a\n", 2, "invalid YAML"),
    ("classes: [a]\nclasses: [b]\n", 2, "duplicate key 'classes'"),
    ("- a\n- b\n", 1, "mapping with a 'classes' list"),
    ("classes:\n  - [a, b]\n", 2, "a class is a name or a mapping"),
    ("", 1, "empty label set"),
])
def test_errors_name_file_line_and_problem(tmp_path, text, where, problem):
    path = write(tmp_path, text)
    with pytest.raises(LabelSetError) as err:
        load_labelset(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}:{where}: "), msg
    assert problem in msg and "\n" not in msg


def test_too_many_classes():
    with pytest.raises(LabelSetError, match="too many classes"):
        parse_labelset({"classes": [f"c{i}" for i in range(65536)]})


def test_missing_file(tmp_path):
    with pytest.raises(LabelSetError, match="no such file"):
        load_labelset(tmp_path / "none.yaml")
