from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import write_images
from seglabel.labelset import MAX_FILE_BYTES, LabelSetError, default_color, load_labelset, parse_labelset
from seglabel.writers import RUN_FILE
from test_annotate_cli import run
from test_export import make_output


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


# -- one line of text per name (issue 15, item 5) ------------------------------------------------------
@pytest.mark.parametrize("text, where, shown", [
    ('classes:\n  - "road\\nsky"\n  - car\n', 2, "class 'road\\nsky': the name holds a control character (\\n)"),
    ("classes:\n  - name: a\n    prompts: ['x', \"b\\tc\"]\n", 3, "prompt 'b\\tc' holds a control character (\\t)"),
    ('classes:\n  - "a\\0b"\n', 2, "(U+0000)"),
    ('classes:\n  - "a\\Lb"\n', 2, "(U+2028)"),  # YAML's escape for the Unicode line separator
    ('classes:\n  - "a\\x85b"\n', 2, "(U+0085)"),
    ('classes:\n  - "a\\x1b[31mb"\n', 2, "(U+001B)"),
    ('name: "x\\ry"\nclasses: [a]\n', 1, "'name' 'x\\ry' holds a control character (\\r)"),
    ('templates: ["a {}\\x07photo"]\nclasses: [a]\n', 1, "(U+0007)"),
])
def test_control_characters_are_refused_with_file_and_line(tmp_path, text, where, shown):
    path = write(tmp_path, text)
    with pytest.raises(LabelSetError) as err:
        load_labelset(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}:{where}: ") and shown in msg, msg
    assert len(msg.splitlines()) == 1 and "control character" in msg


def test_surrounding_whitespace_is_dropped_not_refused(tmp_path):
    # a YAML block scalar ends with a newline; names and prompts are stripped as before
    ls = load_labelset(write(tmp_path, "classes:\n  - name: |\n      road\n    prompts: [\"  street\\n\"]\n"))
    assert ls.names == ["road"] and ls.prompts == ["street"]


def test_labelsets_check_refuses_a_name_with_a_line_break(tmp_path):
    path = write(tmp_path, 'classes:\n  - sky\n  - "road\\nsky"\n')
    r = run("labelsets", "check", str(path))
    assert r.returncode == 2 and r.stdout == ""
    [line] = r.stderr.splitlines()
    assert line == (f"seglabel: error: {path}:3: class 'road\\nsky': the name holds a control character (\\n); "
                    "names and prompts must be one line of text")


def test_export_of_a_run_recorded_with_a_line_break_in_a_name_is_refused(tmp_path):
    """The export that broke: a run recorded before names were checked held 'road\\nsky', and CVAT's
    labelmap.txt got one line more than there are classes (every later class id off by one). Its
    export now stops with one line and writes nothing."""
    out = make_output(tmp_path, {"a": np.array([[0, 1, 2]], np.uint8)})
    record = json.loads((out / RUN_FILE).read_text())
    record["labelset"]["classes"][1]["name"] = "road\nsky"
    (out / RUN_FILE).write_text(json.dumps(record))
    for fmt in ("cvat", "labelstudio"):
        r = run("export", str(out), "--format", fmt)
        assert r.returncode == 2, r.stderr
        [line] = r.stderr.splitlines()
        assert str(out / RUN_FILE) in line and "'road\\nsky'" in line and "control character" in line
        assert not (out / "export").exists()


def test_a_name_cvat_reads_as_a_comment_is_warned_and_its_cvat_export_refused(tmp_path):
    """Datumaro skips labelmap.txt lines starting with '#': a class named '#1' would vanish from
    CVAT's labels and shift every later class id by one."""
    path = write(tmp_path, "classes:\n  - sky\n  - '#1'\n  - car\n")
    r = run("labelsets", "check", str(path))
    assert r.returncode == 0 and r.stdout.startswith(f"{path}: ok, 3 classes")
    [warning] = r.stderr.splitlines()
    assert warning.startswith(f"seglabel: warning: {path}:3: class '#1': ") and "comment" in warning
    labelset = {"name": "x", "templates": "none", "classes": ["sky", "#1", "car"]}
    out = make_output(tmp_path / "run", {"a": np.array([[0, 1, 2]], np.uint8)}, labelset)
    r = run("export", str(out), "--format", "cvat")
    assert r.returncode == 2 and "'#1'" in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr
    assert not (out / "export" / "cvat" / "segmentation_mask_1.1.zip").exists()
    r = run("export", str(out), "--format", "labelstudio")  # other formats take the name
    assert r.returncode == 0, r.stderr


# -- size bound (issue 15, item 13) ---------------------------------------------------------------------
def test_a_50_mb_label_set_is_refused_by_its_size_before_parsing(tmp_path):
    path = tmp_path / "huge.yaml"
    with open(path, "w") as f:  # valid YAML: parsing it whole takes minutes in pure Python
        f.write("name: huge\nclasses:\n")
        f.write("  - class\n" * (50 * 10**6 // 10))
    assert path.stat().st_size > 50 * 10**6
    r = run("labelsets", "check", str(path))  # (run's 300 s timeout: a hang fails, not passes)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.splitlines() == [
        f"seglabel: error: {path}: too large for a label set: 47.7 MiB (at most {MAX_FILE_BYTES >> 20} MiB)"]


def test_size_bound_is_exact(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_bytes(b"classes: [a]\n" + b"#" * MAX_FILE_BYTES)
    with pytest.raises(LabelSetError, match=r"too large for a label set: 4\.0 MiB"):
        load_labelset(path)
    path.write_bytes(b"classes: [a]\n" + b"#" * (MAX_FILE_BYTES - 13))  # exactly at the bound: read
    assert load_labelset(path).names == ["a"]


def test_parsing_stops_at_the_node_bound(tmp_path, monkeypatch):
    """A dense list is refused once it has more nodes than a label set may, without reading on:
    the broken end of this file is never reached."""
    import seglabel.labelset as labelset

    monkeypatch.setattr(labelset, "_MAX_NODES", 1000)
    path = write(tmp_path, "classes: [" + "a, " * 5000 + "@ broken")
    with pytest.raises(LabelSetError) as err:
        load_labelset(path)
    assert str(err.value) == f"{path}:1: too large (more than 1000 entries)"


# -- classes sharing a prompt (issue 15, item 18) ---------------------------------------------------------
def test_classes_sharing_a_prompt_are_warned(tmp_path):
    path = write(tmp_path, """
classes:
  - road
  - sky
  - name: street
    prompts: [street, ' Road ']
  - name: lane
    prompts: [ROAD]
catch_all: {name: other, prompts: [sky]}
""")
    ls = load_labelset(path)
    assert ls.warnings == (
        f"{path}:5: classes 'road', 'street' and 'lane' share the prompt 'road': wherever it scores highest they "
        "tie and 'road', listed first, gets the pixel; give each class prompts of its own",
        f"{path}:9: classes 'sky' and 'other' share the prompt 'sky': wherever it scores highest they tie and "
        "'sky', listed first, gets the pixel; give each class prompts of its own",
    )
    # a prompt repeated within one class is harmless; warnings are no part of the identity
    ok = parse_labelset({"classes": [{"name": "a", "prompts": ["x", "X"]}, "b"]})
    assert ok.warnings == ()
    again = parse_labelset(ls.to_dict())
    assert again.classes == ls.classes and again.fingerprint() == ls.fingerprint() and len(again.warnings) == 2


def test_shared_prompt_warnings_from_labelsets_check_and_annotate(tmp_path):
    path = write(tmp_path, "classes:\n  - road\n  - name: street\n    prompts: [road]\n")
    expected = (f"seglabel: warning: {path}:3: classes 'road' and 'street' share the prompt 'road': wherever "
                "it scores highest they tie and 'road', listed first, gets the pixel; give each class prompts of its own")
    r = run("labelsets", "check", str(path))
    assert r.returncode == 0 and r.stdout == f"{path}: ok, 2 classes, 2 prompts\n"
    assert r.stderr.splitlines() == [expected]
    photos = tmp_path / "photos"
    write_images(photos, ["a.png"])
    r = run("annotate", str(photos), "--labels", str(path), "--out", str(tmp_path / "out"), "--dry-run")
    assert r.returncode == 0, r.stderr
    assert r.stderr.splitlines()[0] == expected
