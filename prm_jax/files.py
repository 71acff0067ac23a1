"""Writes that a reader never sees half done: write beside the target, fsync, rename.

Every file prm-jax writes in one piece (JSON summaries, run records, JSONL splits, safetensors
shards, plots, remote code) goes through `atomic_file`; a killed or failed writer leaves the
previous file (or none) in place, never a truncated one. Directories built beside their target
(an HF export, a run's tokenizer, an overwritten model checkpoint) take its place through
`replace_directory`. Appending record by record is `prm_jax.jsonl.AppendOnlyWriter`'s job.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

_log = logging.getLogger(__name__)


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "w") -> Iterator[IO[Any]]:
    """A file open for writing under a temporary name beside `path`, renamed over it on success.

    On a clean exit the file is flushed, fsynced and renamed onto `path` (atomic on POSIX); on an
    exception the temporary file is removed and `path` is left as it was. Parent directories are
    created. `mode` is "w" (UTF-8 text) or "wb".
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"mode={mode!r}; atomic_file writes with 'w' or 'wb'")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Unique per process and thread; opened normally so the file gets the usual umask permissions.
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
    try:
        with open(tmp, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_directory(path.parent)  # the rename itself survives a power loss
    finally:
        tmp.unlink(missing_ok=True)


def _fsync_directory(directory: Path) -> None:
    # After the rename: the swap has happened, so a filesystem that cannot fsync a directory
    # (some network and FUSE mounts) must not turn it into a reported failure.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def replace_directory(staging: str | Path, target: str | Path) -> Path:
    """Puts the complete directory `staging` at `target`, replacing whatever was there.

    The old directory is renamed aside first and deleted last, so `target` is never half-written
    and is absent only between two renames (never during a whole delete).
    """
    staging, target = Path(staging), Path(target)
    # A unique name: a leftover of a run killed while deleting cannot block the next swap.
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:12]}")
    if target.exists():
        target.rename(old)
    try:
        staging.rename(target)
    except BaseException:
        if old.exists() and not target.exists():
            old.rename(target)  # the swap failed: the previous directory is put back
        raise
    _fsync_directory(target.parent)
    shutil.rmtree(old, ignore_errors=True)
    if old.exists():
        _log.warning("could not delete %s (the directory %s replaced); remove it by hand", old, target)
    return target


@contextlib.contextmanager
def staged_directory(target: str | Path) -> Iterator[Path]:
    """A fresh path beside `target` to build a directory at, put in `target`'s place on success.

    The path does not exist yet (writers such as Orbax insist on creating it); on a clean exit it
    replaces `target` (`replace_directory`), on an exception it is removed and `target` is left
    as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:12]}")
    try:
        yield staging
        replace_directory(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # nothing left after a swap


def atomic_write(path: str | Path, data: str | bytes) -> Path:
    """Writes `data` (text as UTF-8) as the whole of `path`, atomically."""
    with atomic_file(path, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
    return Path(path)


def atomic_write_json(path: str | Path, payload: Any, *, indent: int | None = 2) -> Path:
    """`payload` as sorted-key JSON plus a newline, atomically."""
    return atomic_write(path, json.dumps(payload, indent=indent, sort_keys=True) + "\n")


def atomic_write_lines(
    path: str | Path, lines: Iterable[str], *, validate: Callable[[Path], None] | None = None
) -> int:
    """Writes one line per item (a newline added where missing) atomically; returns the count.

    `validate`, when given, reads the finished temporary file before it replaces `path`; raising
    there leaves `path` untouched.
    """
    path = Path(path)
    count = 0
    with atomic_file(path, "w") as f:
        for line in lines:
            f.write(line if line.endswith("\n") else line + "\n")
            count += 1
        if validate is not None:
            f.flush()
            validate(Path(f.name))
    return count
