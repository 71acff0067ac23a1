"""The tree is formatted and linted by ruff (configured in pyproject.toml) in one docstring dialect.

Docstrings and comments write code in single backticks (Markdown, Google-style sections); rST's
double backticks and its cross-reference roles (colon, role name, colon) are the other dialect, which the tree no longer uses.
"""

from __future__ import annotations

import re
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


def _python_files() -> list[Path]:
    """The project's Python source: every package, launcher, benchmark and test (no venvs or caches)."""
    roots = ("prm_jax", "data_pipeline", "launch", "configs", "bench", "tests", ".ci")
    return sorted(p for root in roots for p in (ROOT / root).rglob("*.py") if "__pycache__" not in p.parts)


def test_one_docstring_dialect() -> None:
    files = _python_files()
    assert len(files) > 100, f"found only {len(files)} Python files under {ROOT}"
    offenders = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in files
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if _RST.search(line)
    ]
    assert not offenders, "rST markup; write code in single backticks:\n" + "\n".join(offenders[:20])
