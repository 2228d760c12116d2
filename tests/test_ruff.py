"""`ruff check src tests` passes with the configuration in pyproject.toml (issue 25, item 5), so
every `noqa` names a rule that is checked and would fire without it (RUF100). Runs with the
README's test command: ruff is in the test extra."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


def ruff() -> str | None:
    beside = Path(sys.executable).with_name("ruff")  # the test environment's own
    return str(beside) if beside.is_file() else shutil.which("ruff")


def test_ruff_passes():
    exe = ruff()
    if exe is None:
        pytest.skip("ruff is not installed (pip install -e '.[test]' installs it)")
    r = subprocess.run([exe, "check", "--no-cache", "src", "tests"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
