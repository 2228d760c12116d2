"""The layering of docs/architecture.md: a module imports only modules of its own floor or below,
so the library can be read (and used) from the ground up. Checked on the source, statically."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).parent.parent / "src" / "seglabel"

# Floor of each module, from the ground (0) up; a module not named here fails the test, so a new
# module must be placed deliberately. models/*, exports/*, serve/*, storage/*, corrections/* and distill/* take
# their package's floor.
FLOORS = {
    0: ["errors", "exitcodes", "atomic", "labelset", "images", "checkpoints", "layout", "interrupts", "storage"],
    1: ["text", "refine", "writers", "records", "evaluate", "outputs"],
    2: ["models"],
    3: ["predict", "tta", "loader", "runs", "memory", "decode"],
    4: ["annotate", "preview", "exports", "serve", "corrections"],
    5: ["recipe", "folders", "distill"],
    6: ["cli", "cli_distill", "cli_serve", "cli_import", "cli_handler", "ray", "__main__", "__init__"],
}
FLOOR = {name: floor for floor, names in FLOORS.items() for name in names}


def top_module(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    return rel.parts[0]


def imported(path: Path) -> set[str]:
    """The seglabel modules ``path`` imports (relative imports, at any depth in the file)."""
    rel = path.relative_to(PACKAGE)
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level:
            parents = list(rel.parent.parts)
            base = parents[: len(parents) - (node.level - 1)] if node.level > 1 else parents
            parts = base + (node.module.split(".") if node.module else [])
            if parts:
                found.add(parts[0])
            else:  # "from . import x" at the package root
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("seglabel."):
            found.add(node.module.split(".")[1])
    return found


def test_every_module_has_a_floor():
    modules = {top_module(p) for p in PACKAGE.rglob("*.py")}
    assert modules <= set(FLOOR), f"place these in FLOORS (and docs/architecture.md): {sorted(modules - set(FLOOR))}"


def test_no_module_imports_a_higher_floor():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        me = top_module(path)
        for other in imported(path):
            if other in FLOOR and FLOOR[other] > FLOOR[me]:
                wrong.append(f"{path.relative_to(PACKAGE)} (floor {FLOOR[me]}) imports {other} (floor {FLOOR[other]})")
    assert not wrong, "\n".join(wrong)
