"""One error contract (issue 25, item 1): seglabel refuses with its own errors, only those map to
their exit codes, and anything else is an unexpected error: one line, exit 1, a hint, and with
SEGLABEL_DEBUG=1 the traceback (of any error)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from seglabel import cli, exitcodes
from seglabel.errors import SeglabelError, UsageError

SRC = Path(__file__).parent.parent / "src" / "seglabel"


def bare_raises(name: str, root: Path = SRC) -> list[str]:
    """``raise NAME(...)`` / ``raise NAME`` in the sources under ``root``, as file:line."""
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Raise) and node.exc is not None:
                called = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
                if isinstance(called, ast.Name) and called.id == name:
                    found.append((str(path.relative_to(root)), node.lineno))
    return [f"{file}:{line}" for file, line in sorted(found)]


def test_no_bare_value_error_in_the_library():
    """seglabel refuses with UsageError (exit 2, nothing written) or another error of errors.py's
    hierarchy, never a bare ValueError, which the command line would take for a bug (exit 1)."""
    assert bare_raises("ValueError") == [], "raise seglabel's own error (errors.py) instead"


def test_the_scan_finds_a_bare_raise(tmp_path):
    (tmp_path / "m.py").write_text("def f(x):\n    if x:\n        raise ValueError('no')\n    raise ValueError\n"
                                   "raise UsageError('fine')\n")
    assert bare_raises("ValueError", tmp_path) == ["m.py:3", "m.py:4"]


def failing_eval(monkeypatch, error: BaseException) -> None:
    """``seglabel eval`` whose scoring raises ``error`` (as torch, numpy or a bug of ours might)."""
    def evaluate_folders(*args, **kwargs):
        raise error

    monkeypatch.setattr("seglabel.evaluate.evaluate_folders", evaluate_folders)


def eval_args(tmp_path: Path, small_labelset: Path) -> list[str]:
    return ["eval", "--pred", str(tmp_path), "--gt", str(tmp_path), "-l", str(small_labelset)]


def test_an_unexpected_error_is_one_line_exit_1_and_a_hint(tmp_path, small_labelset, monkeypatch, capsys):
    monkeypatch.delenv("SEGLABEL_DEBUG", raising=False)
    failing_eval(monkeypatch, ValueError("operands could not be broadcast together"))
    assert cli.run(eval_args(tmp_path, small_labelset)) == exitcodes.ERROR  # not 2: it was no refusal
    err = capsys.readouterr().err
    assert err == ("seglabel: error: ValueError: operands could not be broadcast together (unexpected; "
                   "SEGLABEL_DEBUG=1 shows the traceback)\n")


def test_seglabel_errors_keep_their_exit_codes(tmp_path, small_labelset, monkeypatch, capsys):
    monkeypatch.delenv("SEGLABEL_DEBUG", raising=False)
    for error, code in ((UsageError("--x 3: must be at least 4"), exitcodes.USAGE),
                        (SeglabelError("x.png: cannot write (No space left on device)"), exitcodes.ERROR)):
        failing_eval(monkeypatch, error)
        assert cli.run(eval_args(tmp_path, small_labelset)) == code
        assert capsys.readouterr().err == f"seglabel: error: {error}\n"  # no hint: seglabel said what it was


@pytest.mark.parametrize("error, code", [(ValueError("boom"), exitcodes.ERROR),
                                         (UsageError("--x 3: must be at least 4"), exitcodes.USAGE)])
def test_seglabel_debug_shows_the_traceback_of_any_error(tmp_path, small_labelset, monkeypatch, capsys, error,
                                                         code):
    monkeypatch.setenv("SEGLABEL_DEBUG", "1")
    failing_eval(monkeypatch, error)
    assert cli.run(eval_args(tmp_path, small_labelset)) == code
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):\n") and "in evaluate_folders" in err
    assert err.splitlines()[-1] == f"seglabel: error: {type(error).__name__ + ': ' if code == 1 else ''}{error}"
