"""Label sets: the classes to label, their prompts, colours and ignore rules, read from YAML.

A label set file looks like this (every key but ``classes`` is optional)::

    name: street
    templates: maskclip          # maskclip (85 prompt templates) | none | a list of strings with {}
    classes:
      - road                     # a bare string: the name is the prompt
      - name: person
        prompts: [person, pedestrian]
        color: [220, 20, 60]     # or "#dc143c"
    catch_all: other             # an extra last class for pixels that match none of the others
    ignore:
      min_confidence: 0.0        # pixels whose top probability is lower are written as ignore
      classes: [other]           # predicted, but written as ignore

Every error names the file, the line and the problem (``LabelSetError``). Names, prompts and
templates are one line of text: control characters (tab, line breaks, NUL, ...) are refused, since
they would split a class over two lines of CVAT's labelmap.txt and shift every later class. Things
that load but deserve a look (two classes sharing a prompt, a name CVAT's labelmap.txt cannot hold)
are listed in ``LabelSet.warnings``.
"""
from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import UsageError

IGNORE_INDEX = 255
IGNORE_INDEX_16BIT = 65535
MAX_CLASSES = IGNORE_INDEX_16BIT  # ids 0..65534; 65535 stays free for ignore

_TOP_KEYS = {"name", "templates", "classes", "catch_all", "ignore"}
_CLASS_KEYS = {"name", "prompts", "color"}
_IGNORE_KEYS = {"min_confidence", "classes"}


class LabelSetError(UsageError):
    """A label set that cannot be used; the message is one line: ``file:line: problem``."""

    def __init__(self, message: str) -> None:
        super().__init__(_one_line(str(message)))


# Characters str.splitlines() breaks at; escaped so that every error message is one line.
_LINE_BREAKS = {c: c.encode("unicode_escape").decode("ascii")
                for c in "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"}
_MAX_NODES = 200_000  # YAML nodes a label set may expand to (aliases can multiply them)
_MAX_DEPTH = 50  # nesting; a label set needs 4
# Bytes a label set file may hold, checked before parsing: the YAML parser is pure Python (about
# 50,000 nodes a second on one core), so a 50 MB file would take minutes; the most classes a label
# set may have (65,535) take about 1 MiB as bare names.
MAX_FILE_BYTES = 4 << 20


def _one_line(text: str) -> str:
    text = "".join(_LINE_BREAKS.get(c, c) for c in text)
    # lone surrogates (not valid Unicode text) would break printing and JSON
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


@dataclass(frozen=True)
class LabelClass:
    name: str
    prompts: tuple[str, ...]
    color: tuple[int, int, int]
    ignore: bool = False  # predicted like any class, written as the ignore index
    catch_all: bool = False


@dataclass(frozen=True)
class LabelSet:
    name: str
    classes: tuple[LabelClass, ...]
    # None: the 85 MaskCLIP templates (resolved in text.py); (): prompts used as they are
    templates: tuple[str, ...] | None = None
    min_confidence: float = 0.0
    source: str = "<memory>"
    # what loads but deserves a look, one line each (file:line: ...); not part of the label set's
    # identity (equality, fingerprint)
    warnings: tuple[str, ...] = field(default=(), compare=False)

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_names(cls, names: list[str], name: str = "labels", **kwargs: Any) -> "LabelSet":
        return parse_labelset({"name": name, "classes": list(names), **kwargs})

    @classmethod
    def load(cls, path: str | Path) -> "LabelSet":
        return load_labelset(path)

    # -- views --------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.classes)

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.classes]

    @property
    def prompts(self) -> list[str]:
        """Every prompt of every class, in class order (see ``prompt_class``)."""
        return [p for c in self.classes for p in c.prompts]

    @property
    def prompt_class(self) -> list[int]:
        """Class index of each entry of ``prompts``."""
        return [i for i, c in enumerate(self.classes) for _ in c.prompts]

    @property
    def ignore_index(self) -> int:
        return IGNORE_INDEX if len(self.classes) < IGNORE_INDEX else IGNORE_INDEX_16BIT

    @property
    def palette(self) -> list[tuple[int, int, int]]:
        return [c.color for c in self.classes]

    def to_dict(self) -> dict[str, Any]:
        """A plain form that ``parse_labelset`` reads back to an equal label set."""
        out: dict[str, Any] = {"name": self.name}
        out["templates"] = "maskclip" if self.templates is None else (list(self.templates) or "none")
        out["classes"] = [
            {"name": c.name, "prompts": list(c.prompts), "color": list(c.color)}
            for c in self.classes if not c.catch_all
        ]
        for c in self.classes:
            if c.catch_all:
                out["catch_all"] = {"name": c.name, "prompts": list(c.prompts), "color": list(c.color)}
        out["ignore"] = {"min_confidence": self.min_confidence,
                         "classes": [c.name for c in self.classes if c.ignore]}
        return out

    def fingerprint(self) -> str:
        """Stable hash of everything that changes the labels (names, prompts, templates, ignore)."""
        blob = json.dumps(self.to_dict(), sort_keys=True, ensure_ascii=False).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# -- loading ----------------------------------------------------------------------------------
def load_labelset(path: str | Path) -> LabelSet:
    path = Path(path)
    try:
        with open(path, "rb") as f:
            # read one byte past the bound: a pipe or a growing file has no trustworthy size
            raw = f.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise LabelSetError(f"{path}: no such file") from None
    except OSError as e:
        raise LabelSetError(f"{path}: cannot read: {e}") from None
    if len(raw) > MAX_FILE_BYTES:
        try:
            size = f"{path.stat().st_size / 2**20:.1f} MiB"
        except OSError:
            size = f"more than {MAX_FILE_BYTES >> 20} MiB"
        raise LabelSetError(f"{path}: too large for a label set: {size} (at most {MAX_FILE_BYTES >> 20} MiB)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LabelSetError(f"{path}: cannot read: {e}") from None
    try:
        root = yaml.compose(text, Loader=_CountingLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(e, "problem", None) or (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise LabelSetError(f"{where}: invalid YAML: {problem}") from None
    except RecursionError:
        raise LabelSetError(f"{path}: invalid YAML: nested too deeply") from None
    except _TooManyNodes as e:
        raise LabelSetError(f"{path}:{e.line}: too large (more than {_MAX_NODES} entries)") from None
    if root is None:
        raise LabelSetError(f"{path}:1: empty label set (it needs a 'classes' list)")
    lines: dict[tuple, int] = {}
    data = _plain(root, (), lines, str(path), [0], set())
    return parse_labelset(data, source=str(path), lines=lines)


class _CountingLoader(yaml.SafeLoader):
    """Stops composing once a document has more nodes than any label set can use, so a huge
    flat list is refused after a few seconds of parsing instead of minutes."""

    def compose_document(self):
        self._nodes = 0
        return super().compose_document()

    def compose_node(self, parent, index):
        self._nodes = getattr(self, "_nodes", 0) + 1
        if self._nodes > _MAX_NODES:
            raise _TooManyNodes(self.peek_event().start_mark.line + 1)
        return super().compose_node(parent, index)


class _TooManyNodes(Exception):
    def __init__(self, line: int) -> None:
        super().__init__(line)
        self.line = line


def _plain(node: yaml.Node, at: tuple, lines: dict[tuple, int], source: str,
           count: list[int], open_nodes: set[int]) -> Any:
    """Turn a composed YAML node into plain data, recording the line of every path. Aliases
    that refer to themselves, or that expand to a huge tree ("billion laughs"), are errors."""
    line = node.start_mark.line + 1
    lines[at] = line
    count[0] += 1
    if count[0] > _MAX_NODES:
        raise LabelSetError(f"{source}:{line}: too large (more than {_MAX_NODES} entries once aliases are expanded)")
    if len(at) > _MAX_DEPTH:
        raise LabelSetError(f"{source}:{line}: nested too deeply (more than {_MAX_DEPTH} levels)")
    if isinstance(node, (yaml.MappingNode, yaml.SequenceNode)):
        if id(node) in open_nodes:
            raise LabelSetError(f"{source}:{line}: an alias refers to a node that contains it")
        open_nodes.add(id(node))
        try:
            if isinstance(node, yaml.SequenceNode):
                return [_plain(v, at + (i,), lines, source, count, open_nodes) for i, v in enumerate(node.value)]
            out: dict[Any, Any] = {}
            for key_node, value_node in node.value:
                key = _scalar(key_node)
                if key in out:
                    raise LabelSetError(f"{source}:{key_node.start_mark.line + 1}: duplicate key {_show(key)}")
                out[key] = _plain(value_node, at + (key,), lines, source, count, open_nodes)
            return out
        finally:
            open_nodes.discard(id(node))
    return _scalar(node)


def _show(value: Any, limit: int = 60) -> str:
    """A user-given value in a message: quoted, one line (control characters escaped), not too long."""
    if isinstance(value, str):
        text = "'" + "".join(_escaped(c) if _is_control(c) else c for c in value) + "'"
    else:
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 4] + "...'"


def _is_control(c: str) -> bool:
    """Characters that break or hide a line of text: C0 and C1 controls (tab, line feed, NUL,
    escape, ...), DEL, and Unicode's line and paragraph separators."""
    return unicodedata.category(c) in ("Cc", "Zl", "Zp")


def _escaped(c: str) -> str:
    return c.encode("unicode_escape").decode("ascii")


def _control(text: str) -> str | None:
    """How the first control character of ``text`` is written (e.g. ``\\n``, ``U+0085``), or None."""
    for c in text:
        if _is_control(c):
            return _escaped(c) if c in "\t\n\r" else f"U+{ord(c):04X}"
    return None


_SCALARS = yaml.SafeLoader("")  # only its constructors are used (safe types, no side effects)


def _scalar(node: yaml.Node) -> Any:
    if not isinstance(node, yaml.ScalarNode):
        return f"<{node.id}>"  # a mapping or list used as a key: reported as an unknown key
    loader = _SCALARS
    loader.constructed_objects.clear()
    loader.recursive_objects.clear()
    try:
        value = loader.construct_object(node, deep=True)
    except Exception:  # noqa: BLE001 - bad explicit tags (!!bool x, !!timestamp 2020-99-99): keep the text
        return node.value
    try:
        hash(value)
    except TypeError:
        return node.value
    return value


def parse_labelset(data: Any, source: str = "<memory>", lines: dict[tuple, int] | None = None) -> LabelSet:
    """Validate plain data (as read from YAML) and build a ``LabelSet``."""
    lines = lines or {}

    def where(at: tuple) -> str:
        line = None
        for n in range(len(at), -1, -1):  # nearest enclosing node that has a line
            line = lines.get(at[:n])
            if line is not None:
                break
        return f"{source}:{line}" if line else source

    def fail(at: tuple, problem: str) -> None:
        raise LabelSetError(f"{where(at)}: {problem}")

    if not isinstance(data, dict):
        fail((), "a label set is a mapping with a 'classes' list")
    for key in data:
        if key not in _TOP_KEYS:
            fail((key,), f"unknown key {_show(key)} (known: {', '.join(sorted(_TOP_KEYS))})")
    name = data.get("name", Path(source).stem if source != "<memory>" else "labels")
    if not _text(name):
        fail(("name",), "'name' must be a non-empty string")
    if bad := _control(name.strip()):
        fail(("name",), f"'name' {_show(name)} holds a control character ({bad}); it must be one line of text")
    templates = _parse_templates(data.get("templates", "maskclip"), fail)

    raw_classes = data.get("classes")
    if not isinstance(raw_classes, list) or not raw_classes:
        fail(("classes",), "'classes' must be a non-empty list")
    classes = [_parse_class(raw, ("classes", i), i, fail) for i, raw in enumerate(raw_classes)]
    if "catch_all" in data and data["catch_all"] is not None:
        raw = data["catch_all"]
        c = _parse_class(raw, ("catch_all",), len(classes), fail)
        classes.append(LabelClass(c.name, c.prompts, c.color, catch_all=True))
    if len(classes) > MAX_CLASSES:
        fail(("classes",), f"too many classes: {len(classes)} (at most {MAX_CLASSES})")

    seen: dict[str, int] = {}
    for i, c in enumerate(classes):
        key = name_key(c.name)
        if key in seen:
            at = ("classes", i) if i < len(raw_classes) else ("catch_all",)
            fail(at, f"duplicate class '{c.name}' (also class {seen[key]})")
        seen[key] = i

    min_conf, ignored = _parse_ignore(data.get("ignore") or {}, seen, fail)
    classes = [LabelClass(c.name, c.prompts, c.color, ignore=i in ignored, catch_all=c.catch_all)
               for i, c in enumerate(classes)]

    def class_at(i: int) -> tuple:
        return ("classes", i) if i < len(raw_classes) else ("catch_all",)

    warnings = [_one_line(f"{where(at)}: {problem}") for at, problem in _warnings(classes, class_at)]
    return LabelSet(name=name.strip(), classes=tuple(classes), templates=templates,
                    min_confidence=min_conf, source=source, warnings=tuple(warnings))


def _warnings(classes: list[LabelClass], class_at) -> list[tuple[tuple, str]]:
    """(where, problem) of what loads but deserves a look, in class order."""
    out = []
    # Prompts the text encoders cannot tell apart (CLIP's tokenizer lower-cases and collapses
    # whitespace) give two classes the same score; argmax then always picks the first one.
    owners: dict[str, list[tuple[int, str]]] = {}
    for i, c in enumerate(classes):
        for p in c.prompts:
            key = name_key(" ".join(p.split()))
            if all(j != i for j, _ in owners.get(key, [])):
                owners.setdefault(key, []).append((i, p))
    for i, c in enumerate(classes):
        problem = labelmap_problem(c.name)
        if problem:
            out.append((i, class_at(i), f"class {_show(c.name)}: {problem}; `seglabel export --format cvat` "
                                        "will refuse this label set (the other exports take it)"))
    for key, shared in owners.items():
        if len(shared) < 2:
            continue
        names = [classes[i].name for i, _ in shared]
        listed = ", ".join(_show(n) for n in names[:-1][:5]) + (" ..." if len(names) > 6 else "")
        out.append((shared[1][0], class_at(shared[1][0]),
                    f"classes {listed} and {_show(names[-1])} share the prompt {_show(shared[0][1])}: wherever "
                    f"it scores highest they tie and {_show(names[0])}, listed first, gets the pixel; "
                    "give each class prompts of its own"))
    out.sort(key=lambda w: w[0])
    return [(at, problem) for _, at, problem in out]


def name_key(name: str) -> str:
    """What makes two names the same name: equal after Unicode normalisation (NFC: a composed
    "é" and "e" + combining accent are one) and case folding ("Straße" and "STRASSE")."""
    return unicodedata.normalize("NFC", unicodedata.normalize("NFC", name).casefold())


def labelmap_problem(name: str) -> str | None:
    """Why a class name cannot be a line of CVAT's labelmap.txt (``name:R,G,B:parts:actions``, read
    by Datumaro: lines stripped, those starting with '#' skipped, the rest split at every ':'),
    or None. A skipped line would shift every later class id by one."""
    if ":" in name:
        return "CVAT's labelmap.txt cannot hold a ':' in a name (it separates the fields)"
    if name.startswith("#"):
        return "CVAT's labelmap.txt reads a line starting with '#' as a comment"
    return None


def _parse_templates(raw: Any, fail) -> tuple[str, ...] | None:
    if raw is None or (isinstance(raw, str) and raw == "maskclip"):
        return None
    if raw is False or (isinstance(raw, str) and raw == "none") or (isinstance(raw, list) and not raw):
        return ()
    if not isinstance(raw, list):
        fail(("templates",), "'templates' must be 'maskclip', 'none' or a list of strings with {}")
    for i, t in enumerate(raw):
        if not isinstance(t, str) or "{}" not in t or not _text(t):
            fail(("templates", i), f"template {_show(t)} has no '{{}}' for the class prompt")
        if bad := _control(t.strip()):
            fail(("templates", i), f"template {_show(t)} holds a control character ({bad}); "
                                   "a template must be one line of text")
    return tuple(raw)


def _parse_class(raw: Any, at: tuple, index: int, fail) -> LabelClass:
    if isinstance(raw, str):
        raw = {"name": raw}
    if not isinstance(raw, dict):
        fail(at, "a class is a name or a mapping with 'name', 'prompts', 'color'")
    for key in raw:
        if key not in _CLASS_KEYS:
            fail(at + (key,), f"unknown key {_show(key)} in class (known: {', '.join(sorted(_CLASS_KEYS))})")
    name = raw.get("name")
    if not _text(name):
        fail(at + ("name",), "class 'name' must be a non-empty string")
    if bad := _control(name.strip()):  # surrounding whitespace (a YAML block's last newline) is dropped
        fail(at + ("name",), f"class {_show(name)}: the name holds a control character ({bad}); "
                             "names and prompts must be one line of text")
    prompts = raw.get("prompts", [name])
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, list) or not prompts:
        fail(at + ("prompts",), f"class {_show(name)}: 'prompts' must be a non-empty list of strings")
    for j, p in enumerate(prompts):
        if not _text(p):
            fail(at + ("prompts", j), f"class {_show(name)}: empty prompt")
        if bad := _control(p.strip()):
            fail(at + ("prompts", j), f"class {_show(name)}: prompt {_show(p)} holds a control character "
                                      f"({bad}); names and prompts must be one line of text")
    color = _parse_color(raw.get("color"), at + ("color",), name, fail) if "color" in raw else default_color(index)
    return LabelClass(name=name.strip(), prompts=tuple(p.strip() for p in prompts), color=color)


def _parse_color(raw: Any, at: tuple, name: str, fail) -> tuple[int, int, int]:
    if isinstance(raw, str) and re.fullmatch(r"#[0-9a-fA-F]{6}", raw):
        return tuple(int(raw[i:i + 2], 16) for i in (1, 3, 5))  # type: ignore[return-value]
    if (isinstance(raw, list) and len(raw) == 3
            and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in raw)):
        return tuple(raw)  # type: ignore[return-value]
    fail(at, f"class {_show(name)}: bad colour {_show(raw)} (use [R, G, B] with 0-255 or \"#rrggbb\")")
    raise AssertionError  # unreachable: fail raises


def _parse_ignore(raw: Any, index_of: dict[str, int], fail) -> tuple[float, set[int]]:
    if not isinstance(raw, dict):
        fail(("ignore",), "'ignore' must be a mapping with 'min_confidence' and/or 'classes'")
    for key in raw:
        if key not in _IGNORE_KEYS:
            fail(("ignore", key), f"unknown key {_show(key)} in ignore (known: {', '.join(sorted(_IGNORE_KEYS))})")
    min_conf = raw.get("min_confidence", 0.0)
    if isinstance(min_conf, bool) or not isinstance(min_conf, (int, float)) or not 0.0 <= min_conf <= 1.0:
        fail(("ignore", "min_confidence"), f"'min_confidence' must be a number in [0, 1], got {_show(min_conf)}")
    names = raw.get("classes", []) or []
    if not isinstance(names, list):
        fail(("ignore", "classes"), "'ignore.classes' must be a list of class names")
    ignored = set()
    for j, n in enumerate(names):
        key = name_key(n) if isinstance(n, str) else None
        if key not in index_of:
            fail(("ignore", "classes", j), f"ignore.classes names unknown class {_show(n)}")
        ignored.add(index_of[key])
    return float(min_conf), ignored


def _text(value: Any) -> bool:
    """A non-empty string of valid Unicode text (no lone surrogates: they cannot be written out)."""
    if not isinstance(value, str) or not value.strip():
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def default_color(index: int) -> tuple[int, int, int]:
    """The PASCAL VOC colour map: distinct, well known, defined for any index."""
    r = g = b = 0
    c = index
    for shift in range(7, -1, -1):
        r |= ((c >> 0) & 1) << shift
        g |= ((c >> 1) & 1) << shift
        b |= ((c >> 2) & 1) << shift
        c >>= 3
    return (r, g, b)
