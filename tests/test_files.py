"""prm_jax.files: whole-file writes and directory swaps that a reader never sees half done."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from prm_jax.files import atomic_file, atomic_write, atomic_write_lines, naming_path, replace_directory


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path) -> None:
    target = atomic_write(tmp_path / "a.json", "old")
    with pytest.raises(RuntimeError), atomic_file(target) as f:
        f.write("half")
        raise RuntimeError("killed")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # permissions as for any new file


def test_lines_are_validated_before_they_replace_the_file(tmp_path) -> None:
    target = atomic_write(tmp_path / "x.jsonl", "kept\n")

    def refuse(path: Path) -> None:
        raise ValueError(f"{path.read_text()!r} is not valid")

    with pytest.raises(ValueError, match="'a\\\\nb\\\\n' is not valid"):
        atomic_write_lines(target, ["a", "b\n"], validate=refuse)
    assert target.read_text() == "kept\n"
    assert atomic_write_lines(target, ["a", "b"]) == 2 and target.read_text() == "a\nb\n"


def _directory(path: Path, text: str) -> Path:
    path.mkdir()
    (path / "f").write_text(text)
    return path


def test_replace_directory_swaps_and_is_not_blocked_by_a_leftover(tmp_path) -> None:
    target = _directory(tmp_path / "ckpt", "old")
    _directory(tmp_path / f".ckpt.old-{os.getpid()}", "leftover of a run killed while deleting")
    replace_directory(_directory(tmp_path / ".ckpt.tmp", "new"), target)
    assert (target / "f").read_text() == "new"
    assert not (tmp_path / ".ckpt.tmp").exists()


def test_a_failed_swap_puts_the_previous_directory_back(tmp_path, monkeypatch) -> None:
    target = _directory(tmp_path / "ckpt", "old")
    staging = _directory(tmp_path / ".ckpt.tmp", "new")
    real_rename = Path.rename

    def rename(self: Path, to: Path) -> Path:
        if self == staging:
            raise OSError("interrupted")
        return real_rename(self, to)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(OSError, match="interrupted"):
        replace_directory(staging, target)
    assert (target / "f").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".ckpt.tmp", "ckpt"]


def test_naming_path_names_only_an_os_error_that_has_an_errno(tmp_path) -> None:
    """ENOSPC from write() gets the path; an OSError made from a message alone keeps its message
    (a file name on it would print as "[Errno None] None: '<path>'")."""
    with pytest.raises(OSError) as full, naming_path(tmp_path / "out"):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert full.value.filename == str(tmp_path / "out")
    with pytest.raises(OSError) as plain, naming_path(tmp_path / "out"):
        raise OSError("disk on fire")
    assert str(plain.value) == "disk on fire" and plain.value.filename is None
    with pytest.raises(FileNotFoundError) as named, naming_path(tmp_path / "out"):
        open(tmp_path / "absent")
    assert named.value.filename == str(tmp_path / "absent")  # its own file name is kept
