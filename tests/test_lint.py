"""The tree is formatted and linted by ruff (configured in pyproject.toml) in one docstring dialect.

Docstrings and comments write code in single backticks (Markdown, Google-style sections); rST's
double backticks and its cross-reference roles (colon, role name, colon) are the other dialect, which the tree no longer uses.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_RST = re.compile(r"``[^`\n]+``|:(?:py:)?(?:func|class|data|meth|mod|attr|obj|exc|const):`")


def _ruff(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ruff", *args], cwd=ROOT, capture_output=True, text=True)


@pytest.fixture(scope="module", autouse=True)
def _needs_ruff() -> None:
    if _ruff("--version").returncode != 0:
        pytest.fail("ruff is not installed; it comes with the test extra: pip install -e '.[test]'")


def test_ruff_check_passes() -> None:
    result = _ruff("check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format_leaves_every_file_unchanged() -> None:
    result = _ruff("format", "--check", ".")
    assert result.returncode == 0, f"run `ruff format .`:\n{result.stdout}{result.stderr}"


def test_one_docstring_dialect() -> None:
    tracked = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True)
    if tracked.returncode != 0 or shutil.which("git") is None:
        pytest.skip("not a git checkout")
    offenders = [
        f"{name}:{number}: {line.strip()}"
        for name in tracked.stdout.split()
        if (ROOT / name).is_file()
        for number, line in enumerate((ROOT / name).read_text(encoding="utf-8").splitlines(), 1)
        if _RST.search(line)
    ]
    assert not offenders, "rST markup; write code in single backticks:\n" + "\n".join(offenders[:20])
