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

Every error names the file, the line and the problem (``LabelSetError``).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

IGNORE_INDEX = 255
IGNORE_INDEX_16BIT = 65535
MAX_CLASSES = IGNORE_INDEX_16BIT  # ids 0..65534; 65535 stays free for ignore

_TOP_KEYS = {"name", "templates", "classes", "catch_all", "ignore"}
_CLASS_KEYS = {"name", "prompts", "color"}
_IGNORE_KEYS = {"min_confidence", "classes"}


class LabelSetError(ValueError):
    """A label set that cannot be used; the message is one line: ``file:line: problem``."""


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
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LabelSetError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise LabelSetError(f"{path}: cannot read: {e}") from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise LabelSetError(f"{where}: invalid YAML: {problem}") from None
    if root is None:
        raise LabelSetError(f"{path}:1: empty label set (it needs a 'classes' list)")
    lines: dict[tuple, int] = {}
    data = _plain(root, (), lines, str(path))
    return parse_labelset(data, source=str(path), lines=lines)


def _plain(node: yaml.Node, at: tuple, lines: dict[tuple, int], source: str) -> Any:
    """Turn a composed YAML node into plain data, recording the line of every path."""
    lines[at] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = _scalar(key_node)
            if key in out:
                raise LabelSetError(f"{source}:{key_node.start_mark.line + 1}: duplicate key '{key}'")
            out[key] = _plain(value_node, at + (key,), lines, source)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_plain(v, at + (i,), lines, source) for i, v in enumerate(node.value)]
    return _scalar(node)


def _scalar(node: yaml.Node) -> Any:
    if not isinstance(node, yaml.ScalarNode):
        return f"<{node.id}>"  # a mapping or list used as a key: reported as an unknown key
    loader = yaml.SafeLoader("")
    try:
        return loader.construct_object(node, deep=True)
    except yaml.YAMLError:
        return node.value


def parse_labelset(data: Any, source: str = "<memory>", lines: dict[tuple, int] | None = None) -> LabelSet:
    """Validate plain data (as read from YAML) and build a ``LabelSet``."""
    lines = lines or {}

    def fail(at: tuple, problem: str) -> None:
        line = None
        for n in range(len(at), -1, -1):  # nearest enclosing node that has a line
            line = lines.get(at[:n])
            if line is not None:
                break
        raise LabelSetError(f"{source}:{line}: {problem}" if line else f"{source}: {problem}")

    if not isinstance(data, dict):
        fail((), "a label set is a mapping with a 'classes' list")
    for key in data:
        if key not in _TOP_KEYS:
            fail((key,), f"unknown key '{key}' (known: {', '.join(sorted(_TOP_KEYS))})")
    name = data.get("name", Path(source).stem if source != "<memory>" else "labels")
    if not isinstance(name, str) or not name.strip():
        fail(("name",), "'name' must be a non-empty string")
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
        key = c.name.casefold()
        if key in seen:
            at = ("classes", i) if i < len(raw_classes) else ("catch_all",)
            fail(at, f"duplicate class '{c.name}' (also class {seen[key]})")
        seen[key] = i

    min_conf, ignored = _parse_ignore(data.get("ignore") or {}, seen, fail)
    classes = [LabelClass(c.name, c.prompts, c.color, ignore=i in ignored, catch_all=c.catch_all)
               for i, c in enumerate(classes)]
    return LabelSet(name=name.strip(), classes=tuple(classes), templates=templates,
                    min_confidence=min_conf, source=source)


def _parse_templates(raw: Any, fail) -> tuple[str, ...] | None:
    if raw in ("maskclip", None):
        return None
    if raw in ("none", False, []):
        return ()
    if not isinstance(raw, list):
        fail(("templates",), "'templates' must be 'maskclip', 'none' or a list of strings with {}")
    for i, t in enumerate(raw):
        if not isinstance(t, str) or "{}" not in t:
            fail(("templates", i), f"template {t!r} has no '{{}}' for the class prompt")
    return tuple(raw)


def _parse_class(raw: Any, at: tuple, index: int, fail) -> LabelClass:
    if isinstance(raw, str):
        raw = {"name": raw}
    if not isinstance(raw, dict):
        fail(at, "a class is a name or a mapping with 'name', 'prompts', 'color'")
    for key in raw:
        if key not in _CLASS_KEYS:
            fail(at + (key,), f"unknown key '{key}' in class (known: {', '.join(sorted(_CLASS_KEYS))})")
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip():
        fail(at + ("name",), "class 'name' must be a non-empty string")
    prompts = raw.get("prompts", [name])
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, list) or not prompts:
        fail(at + ("prompts",), f"class '{name}': 'prompts' must be a non-empty list of strings")
    for j, p in enumerate(prompts):
        if not isinstance(p, str) or not p.strip():
            fail(at + ("prompts", j), f"class '{name}': empty prompt")
    color = _parse_color(raw.get("color"), at + ("color",), name, fail) if "color" in raw else default_color(index)
    return LabelClass(name=name.strip(), prompts=tuple(p.strip() for p in prompts), color=color)


def _parse_color(raw: Any, at: tuple, name: str, fail) -> tuple[int, int, int]:
    if isinstance(raw, str) and raw.startswith("#") and len(raw) == 7:
        try:
            return tuple(int(raw[i:i + 2], 16) for i in (1, 3, 5))  # type: ignore[return-value]
        except ValueError:
            pass
    if (isinstance(raw, list) and len(raw) == 3
            and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in raw)):
        return tuple(raw)  # type: ignore[return-value]
    fail(at, f"class '{name}': bad colour {raw!r} (use [R, G, B] with 0-255 or \"#rrggbb\")")
    raise AssertionError  # unreachable: fail raises


def _parse_ignore(raw: Any, index_of: dict[str, int], fail) -> tuple[float, set[int]]:
    if not isinstance(raw, dict):
        fail(("ignore",), "'ignore' must be a mapping with 'min_confidence' and/or 'classes'")
    for key in raw:
        if key not in _IGNORE_KEYS:
            fail(("ignore", key), f"unknown key '{key}' in ignore (known: {', '.join(sorted(_IGNORE_KEYS))})")
    min_conf = raw.get("min_confidence", 0.0)
    if isinstance(min_conf, bool) or not isinstance(min_conf, (int, float)) or not 0.0 <= min_conf <= 1.0:
        fail(("ignore", "min_confidence"), f"'min_confidence' must be a number in [0, 1], got {min_conf!r}")
    names = raw.get("classes", []) or []
    if not isinstance(names, list):
        fail(("ignore", "classes"), "'ignore.classes' must be a list of class names")
    ignored = set()
    for j, n in enumerate(names):
        key = n.casefold() if isinstance(n, str) else None
        if key not in index_of:
            fail(("ignore", "classes", j), f"ignore.classes names unknown class {n!r}")
        ignored.add(index_of[key])
    return float(min_conf), ignored


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
