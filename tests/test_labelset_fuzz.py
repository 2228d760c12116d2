"""Property-based: whatever a label set file or structure holds, loading it gives a usable
``LabelSet`` or a one-line ``LabelSetError``, never another exception."""
from __future__ import annotations

import json
import string
import unicodedata

import pytest
import yaml
from hypothesis import HealthCheck, assume, example, given, settings, strategies as st

from seglabel.labelset import LabelSet, LabelSetError, load_labelset, parse_labelset

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                        HealthCheck.too_slow])

# Scalars YAML and JSON give, plus the awkward ones: lone surrogates, line breaks, NaN, huge ints.
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=-2**70, max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["", " ", "maskclip", "none", "#dc143c", "#zzzzzz", "#-1-1-1", "# 1 1 1", "{}",
                     "a {}", "\n", "a\nb", "\u2028", "\ud800", "road", "ROAD", "other"]),
)
keys = st.one_of(st.sampled_from(["name", "templates", "classes", "catch_all", "ignore", "prompts", "color",
                                  "min_confidence", "Name", ""]), st.text(max_size=6), st.integers(), st.none(),
                 st.booleans())
trees = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=5),
                                                      st.dictionaries(keys, inner, max_size=5)), max_leaves=25)

# Label-set-shaped structures: the right keys with values that are sometimes right, sometimes not.
colors = st.one_of(st.lists(st.integers(-5, 300), min_size=0, max_size=4), st.text(alphabet="#0123456789abcdefxyz-+ ",
                                                                                   max_size=8), trees)
names = st.one_of(st.sampled_from(["road", "sky", "Road", "other", " ", "", "a\nb"]), scalars)
prompt_lists = st.one_of(st.lists(names, max_size=3), names, trees)
class_dicts = st.fixed_dictionaries({}, optional={"name": names, "prompts": prompt_lists, "color": colors,
                                                  "extra": trees})
classes = st.one_of(st.lists(st.one_of(names, class_dicts, trees), max_size=6), trees)
labelset_like = st.fixed_dictionaries({}, optional={
    "name": names, "classes": classes,
    "templates": st.one_of(st.lists(st.one_of(st.sampled_from(["a {}.", "{}", "no slot", ""]), scalars), max_size=3),
                           scalars, trees),
    "catch_all": st.one_of(names, class_dicts, trees),
    "ignore": st.one_of(st.fixed_dictionaries({}, optional={
        "min_confidence": st.one_of(st.floats(-1, 2), scalars), "classes": st.one_of(st.lists(names, max_size=3), trees),
        "bogus": scalars}), trees),
    "unknown": trees,
})


def check_outcome(load) -> None:
    """``load()`` returns a usable label set or raises a one-line LabelSetError; anything else fails."""
    try:
        ls = load()
    except LabelSetError as e:
        message = str(e)
        assert message and len(message.splitlines()) == 1, repr(message)
        message.encode("utf-8")  # printable: no lone surrogates
        return
    assert isinstance(ls, LabelSet) and len(ls) >= 1
    for c in ls.classes:
        assert c.name.strip() == c.name and c.name and c.prompts and all(p.strip() for p in c.prompts)
        # one line of text each: nothing that would split a line of CVAT's labelmap.txt
        assert len(c.name.splitlines()) == 1 and all(len(p.splitlines()) == 1 for p in c.prompts)
        assert all(unicodedata.category(ch) != "Cc" for ch in c.name + "".join(c.prompts))
        assert len(c.color) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in c.color)
    assert all(isinstance(w, str) and len(w.splitlines()) == 1 for w in ls.warnings)
    assert len({n.casefold() for n in ls.names}) == len(ls)
    assert 0.0 <= ls.min_confidence <= 1.0
    assert ls.templates is None or all("{}" in t for t in ls.templates)
    # what annotate and distill do with it next: record it, hash it, read it back
    text = json.dumps(ls.to_dict(), ensure_ascii=False).encode("utf-8")
    again = parse_labelset(json.loads(text))
    assert again.classes == ls.classes and again.fingerprint() == ls.fingerprint()


@FUZZ
@given(trees)
def test_random_structures(data):
    check_outcome(lambda: parse_labelset(data))


@FUZZ
@given(labelset_like)
@example({"classes": ["a", "A"]})
@example({"classes": [{"name": "x", "color": "#-1-1-1"}]})
@example({"classes": ["a\nb", "A\nB"]})
@example({"classes": ["ok"], "templates": 0})
@example({"classes": ["\ud800"]})
@example({"classes": ["x"], "ignore": {"classes": [["unhashable"]]}})
def test_labelset_shaped_structures(data):
    check_outcome(lambda: parse_labelset(data))


@FUZZ
@given(labelset_like)
def test_the_same_structures_as_yaml_files(tmp_path_factory, data):
    try:
        text = yaml.safe_dump(data, allow_unicode=True)
    except (yaml.YAMLError, UnicodeEncodeError):
        assume(False)
    path = tmp_path_factory.mktemp("ls") / "ls.yaml"
    try:
        path.write_text(text, encoding="utf-8")
    except UnicodeEncodeError:
        assume(False)
    check_outcome(lambda: load_labelset(path))


yaml_bits = st.sampled_from([
    "classes:", "classes: [", "]", "- ", "  - ", "name:", "prompts:", "color:", "ignore:", "catch_all:",
    "templates:", "min_confidence:", "&a", "*a", "*b", "&b", "!!python/object:os.system", "!!binary",
    "!!bool", "!!timestamp", "!!float", "!!set", "<<:", "? ", "{", "}", "[", ",", ":", "'", '"', "\\",
    "#", "---", "...", "%YAML 1.1", "\t", "\n", "\n  ", "road", "sky", "0.5", "1e999", "-1", "~", "null",
    "true", "#ff00ff", "[1, 2, 3]", "'{}'", "\x00", "\ufeff", "\u2028", "|", ">",
])


@FUZZ
@given(st.lists(st.one_of(yaml_bits, st.text(alphabet=string.printable, max_size=5)), max_size=40))
@example(["classes: &x [a, *x]"])
@example(["a: &a [x, x, x, x, x, x, x, x, x, x]\n", "b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\n",
          "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]\n", "d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]\n",
          "e: [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]\nclasses: [a]\n"])
@example(["classes: " + "[" * 2000 + "]" * 2000])
@example(["classes: [a]\nname: !!bool maybe\n"])
@example(["classes:\n  - name: !!timestamp 2020-99-99\n"])
@example(["classes: [!!python/object/apply:os.system ['touch /tmp/x']]"])
def test_random_yaml_text(tmp_path_factory, parts):
    path = tmp_path_factory.mktemp("ls") / "ls.yaml"
    path.write_text(" ".join(parts), encoding="utf-8", errors="surrogatepass")
    check_outcome(lambda: load_labelset(path))


@pytest.mark.parametrize("text, message", [
    ("classes: &x [a, *x]\n", "alias refers to a node that contains it"),
    ("classes: " + "[" * 2000 + "]" * 2000 + "\n", "nested too deeply"),
    ("classes:\n  - name: x\n    color: '#-1-1-1'\n", "bad colour"),
    ('classes: ["a\\nb", "A\\nB"]\n', "class 'a\\nb': the name holds a control character (\\n)"),
    ('classes: ["\\ud800"]\n', "class 'name' must be a non-empty string"),
])
def test_what_the_fuzzing_found(tmp_path, text, message):
    path = tmp_path / "ls.yaml"
    path.write_text(text)
    with pytest.raises(LabelSetError) as err:
        load_labelset(path)
    assert message in str(err.value) and len(str(err.value).splitlines()) == 1


def test_a_python_tag_is_not_run(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "ls.yaml"
    path.write_text(f"classes: [!!python/object/apply:os.system ['touch {marker}']]\n")
    with pytest.raises(LabelSetError, match="non-empty string|a class is"):
        load_labelset(path)
    assert not marker.exists()
