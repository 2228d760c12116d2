"""One way the library talks to the user (issue 25, item 4): ``logging.getLogger("seglabel")``;
the command line alone decides how it looks (``cli_handler.printed_messages``)."""
from __future__ import annotations

import ast
import logging
from pathlib import Path

import pytest
import typer

from seglabel.cli_handler import guarded

SRC = Path(__file__).parent.parent / "src" / "seglabel"
COMMAND_LINE = {"cli.py", "cli_distill.py", "cli_serve.py", "cli_handler.py", "__main__.py"}


def talking(root: Path = SRC) -> list[str]:
    """Library code that talks to the user other than through logging: ``print(...)``,
    ``warnings.warn(...)``, and string constants that start with "warning:" (returned for a
    caller to print), as file:line."""
    found = []
    for path in sorted(root.rglob("*.py")):
        if path.name in COMMAND_LINE:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            call = node.func if isinstance(node, ast.Call) else None
            if (isinstance(call, ast.Name) and call.id == "print") or (
                    isinstance(call, ast.Attribute) and call.attr == "warn" and getattr(call.value, "id", "") == "warnings"):
                found.append((str(path.relative_to(root)), node.lineno, ast.unparse(call)))
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and \
                    node.value.lower().startswith("warning:"):
                found.append((str(path.relative_to(root)), node.lineno, repr(node.value[:30])))
    return [f"{file}:{line}: {what}" for file, line, what in sorted(found)]


def test_library_code_talks_through_logging_only():
    assert talking() == [], "log through logging.getLogger('seglabel') instead"


def test_the_scan_finds_each_other_way(tmp_path):
    (tmp_path / "m.py").write_text("import warnings\nprint('x')\nwarnings.warn('y')\ndef f():\n"
                                   "    return 'warning: z'\nlog.warning('fine')\n")
    (tmp_path / "cli.py").write_text("print('the command line may')\n")
    assert talking(tmp_path) == ["m.py:2: print", "m.py:3: warnings.warn", "m.py:5: 'warning: z'"]


def command(quiet: bool = False) -> int:
    log = logging.getLogger("seglabel")
    log.info("epoch 1 of 2")
    log.warning("a class can never win a pixel")
    logging.getLogger("seglabel.models").warning("from below, same logger tree")
    return 0


@pytest.mark.parametrize("quiet", [False, True])
def test_the_command_line_prints_each_message_once_as_today(capsys, quiet):
    root = logging.getLogger()
    extra = logging.StreamHandler()  # an application's own root handler must not print them again
    root.addHandler(extra)
    logger = logging.getLogger("seglabel")
    before = (logger.level, logger.propagate, list(logger.handlers))
    try:
        with pytest.raises(typer.Exit) as done:
            guarded(command)(quiet=quiet)
    finally:
        root.removeHandler(extra)
    assert done.value.exit_code == 0
    expected = [] if quiet else ["epoch 1 of 2"]  # -q: warnings only
    assert capsys.readouterr().err.splitlines() == expected + [
        "seglabel: warning: a class can never win a pixel", "seglabel: warning: from below, same logger tree"]
    assert (logger.level, logger.propagate, list(logger.handlers)) == before  # left as it was found


def test_messages_are_one_line_each(capsys):
    def odd() -> int:
        logging.getLogger("seglabel").warning("photo\nname.png: \x1b[31mred")
        return 0

    with pytest.raises(typer.Exit):
        guarded(odd)()
    assert capsys.readouterr().err == "seglabel: warning: photo\\nname.png: \\x1b[31mred\n"
