"""Writes that a reader never sees half done: write beside the target, fsync, rename.

Every file prm-jax writes in one piece (JSON summaries, run records, JSONL splits, safetensors
shards, plots, remote code) goes through `atomic_file`; a killed or failed writer leaves the
previous file (or none) in place, never a truncated one. Directories built beside their target
(an HF export, a run's tokenizer, an overwritten model checkpoint) take its place through
`replace_directory`. Appending record by record is `prm_jax.jsonl.AppendOnlyWriter`'s job.

A staging directory is owned by its writer through a lock file beside it (`prm_jax.run_lock`: an
flock that dies with its process, and the holder's name): the next `staged_directory` on the same
target removes what dead writers left (a killed 7B export leaves ~15 GB) and never touches a live
writer's. A write that fails with an
OSError naming no file (a full disk during `write`) gets the path it was writing, so the message
can name it. Files read whole (`read_regular_text`) must be regular and bounded: a FIFO would
block the reader forever and `/dev/zero` would fill its memory.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import re
import shutil
import stat
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from prm_jax import run_lock

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
        with naming_path(path):
            with open(tmp, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        _fsync_directory(path.parent)  # the rename itself survives a power loss
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def naming_path(path: str | Path) -> Iterator[None]:
    """An OSError without a file name (ENOSPC from `write` or `fsync`) raised in the block gets
    `path`, so the report can say where the disk filled up instead of "path unknown". Any writer
    that streams into a file it opened itself (appends, Orbax items) wraps its writes in it."""
    try:
        yield
    except OSError as error:
        if error.filename is None and error.errno is not None:  # (without errno, str() would show None)
            error.filename = str(path)
        raise


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
    and is absent only between two renames (never during a whole delete). The aside name extends
    `staging`'s, so a writer killed between the renames leaves it under its own lock, and the next
    `staged_directory` puts it back.
    """
    staging, target = Path(staging), Path(target)
    # A unique name: a leftover of a run killed while deleting cannot block the next swap.
    old = staging.with_name(f"{staging.name}.old-{uuid.uuid4().hex[:12]}")
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


def _staging_prefix(target: Path) -> str:
    return f".{target.name}.tmp-"


#: `.NAME.tmp-<id>` (the staging directory) and what shares its id: `.lock` (the writer's lock),
#: `.old-<id>` (the replaced directory, moved aside), `.orbax-checkpoint-tmp*` (Orbax's own staging).
_STAGING_ID = re.compile(r"([0-9a-f]{12})(.*)", re.DOTALL)
_LOCK_SUFFIX = ".lock"


@contextlib.contextmanager
def _writer_lock(lock: Path, target: Path) -> Iterator[None]:
    """Holds the staging's lock file `lock` (`prm_jax.run_lock.hold`: flock'ed, naming this process)
    for the writer's lifetime, and removes it at the end (the staging is gone by then: swapped in or
    removed). It waits rather than refuse: the only other process that may hold a fresh writer's
    lock is a cleaner that found it before its staging existed, and that one removes it (`hold`
    then takes the new file). On a file system without flock the lock file alone marks the staging
    as someone's, and `remove_stale_staging`, unable to tell whether its writer lives, leaves it."""
    refusal = f"{lock} is held by {{holder}}"  # never raised: the hold waits
    with run_lock.hold(
        lock,
        tool=f"a write of {target.name}",
        refusal=refusal,
        wait=True,
        required=False,
        on_release=lambda: lock.unlink(missing_ok=True),
    ):
        yield


def _size(path: Path) -> int:
    if not path.is_dir() or path.is_symlink():
        return path.lstat().st_size
    return sum(p.lstat().st_size for p in path.rglob("*"))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _human(size: int) -> str:
    if size < 1000:
        return f"{size} bytes"
    value = float(size)
    for unit in ("KB", "MB", "GB"):
        value /= 1000
        if value < 1000 or unit == "GB":
            break
    return f"{value:.1f} {unit}"


def remove_stale_staging(target: str | Path) -> list[str]:
    """Removes what writers of `target` that died left beside it; returns one line per thing done.

    A writer's entries (`.NAME.tmp-<id>*`) are removed only when its lock file can be locked, that
    is when no live process holds it: a live concurrent writer's staging is never touched. A
    directory the dead writer had moved aside while `target` is missing (killed between the two
    renames of a swap) is put back at `target` instead. Entries without a lock file (written by a
    prm-jax that took none) are reported, not removed: whether their writer lives cannot be told.
    """
    target = Path(target)
    prefix = _staging_prefix(target)
    by_id: dict[str, list[Path]] = {}
    with contextlib.suppress(FileNotFoundError):
        for entry in target.parent.iterdir():
            match = _STAGING_ID.fullmatch(entry.name[len(prefix) :]) if entry.name.startswith(prefix) else None
            if match:
                by_id.setdefault(match.group(1), []).append(entry)
    report = []
    for writer_id, entries in sorted(by_id.items()):
        lock = target.with_name(f"{prefix}{writer_id}{_LOCK_SUFFIX}")
        if lock not in entries:
            report += [
                f"left {entry} ({_human(_size(entry))}): staging of an earlier prm-jax without a writer lock; "
                "delete it by hand once no other conversion or save to this path is running"
                for entry in entries
            ]
            continue
        report += _remove_dead_writer(
            target, lock, [e for e in entries if e != lock], len(lock.name) - len(_LOCK_SUFFIX)
        )
    for line in report:
        _log.warning("%s", line)
    return report


def _remove_dead_writer(target: Path, lock: Path, entries: list[Path], staging_length: int) -> list[str]:
    """What `remove_stale_staging` did with one writer's entries (nothing if it is alive); their
    names extend the staging name, `staging_length` characters long."""
    try:
        with run_lock.abandoned(lock) as dead:
            if dead is None:
                return []  # a live writer, or finished (or cleaned) since the listing
            writer = run_lock.describe_holders(dead) if dead else "an unknown process"
            done = []
            for entry in sorted(entries):
                if entry.name[staging_length:].startswith(".old-") and not os.path.lexists(target):
                    entry.rename(target)
                    done.append(f"put back {target} from {entry.name} (its writer, {writer}, died mid-swap)")
                    continue
                size = _size(entry)
                _remove(entry)
                done.append(f"removed {entry} ({_human(size)}), left by a writer that died: {writer}")
            lock.unlink(missing_ok=True)
            return done
    except run_lock.LocksUnsupportedError:
        return [f"left {', '.join(map(str, entries))}: this file system cannot tell whether its writer lives"]


@contextlib.contextmanager
def staged_directory(target: str | Path) -> Iterator[Path]:
    """A fresh path beside `target` to build a directory at, put in `target`'s place on success.

    The path does not exist yet (writers such as Orbax insist on creating it); on a clean exit it
    replaces `target` (`replace_directory`), on an exception it is removed and `target` is left
    as it was. What killed writers of `target` left beside it is removed first
    (`remove_stale_staging`, logged); this writer's lock keeps later ones off its staging. An
    OSError naming no file (a full disk mid-write) is given `target`.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(target)
    writer_id = uuid.uuid4().hex[:12]
    staging = target.with_name(f"{_staging_prefix(target)}{writer_id}")
    with _writer_lock(target.with_name(f"{staging.name}{_LOCK_SUFFIX}"), target):
        try:
            with naming_path(target):  # the user's path, not the hidden staging name
                yield staging
                replace_directory(staging, target)
        finally:
            for leftover in target.parent.glob(f"{glob.escape(staging.name)}*"):
                if leftover.name != f"{staging.name}{_LOCK_SUFFIX}":
                    _remove(leftover)  # nothing left after a swap; all of it after a failure


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


class NotRegularFileError(ValueError):
    """A file read whole is not a regular file (a FIFO, a device, ...) or is larger than its cap."""


_FILE_TYPES = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe; reading it would wait for a writer forever)"),
    (stat.S_ISCHR, "a character device (reading it may never end)"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _file_problem(path: Path, mode: int, size: int, max_bytes: int | None) -> str | None:
    for test, kind in _FILE_TYPES:
        if test(mode):
            return f"{path} is not a regular file but {kind}: point at the file itself"
    if not stat.S_ISREG(mode):
        return f"{path} is not a regular file: point at the file itself"
    if max_bytes is not None and size > max_bytes:
        return f"{path} is {_human(size)}, more than the {_human(max_bytes)} such a file can be: is it the right file?"
    return None


def check_regular_file(path: str | Path, *, max_bytes: int | None = None) -> Path:
    """`path` (symlinks followed) when it is a regular file of at most `max_bytes`, else
    `NotRegularFileError` naming it and what it is; FileNotFoundError when it is absent."""
    path = Path(path)
    info = path.stat()  # FileNotFoundError (a dangling link too) names the path
    problem = _file_problem(path, info.st_mode, info.st_size, max_bytes)
    if problem:
        raise NotRegularFileError(problem)
    return path


def read_regular_bytes(path: str | Path, *, max_bytes: int) -> bytes:
    """The whole of `path`, refused in one line (`NotRegularFileError`) unless it is a regular file
    of at most `max_bytes`.

    Opened without blocking and checked on the open descriptor, so a FIFO cannot hang the call and
    a file swapped after a check cannot slip through; at most `max_bytes` are ever read.
    """
    path = Path(path)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(fd)
        problem = _file_problem(path, info.st_mode, info.st_size, max_bytes)
        if problem:
            raise NotRegularFileError(problem)
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:  # grew since the stat
        raise NotRegularFileError(_file_problem(path, stat.S_IFREG, len(data), max_bytes) or str(path))
    return data


def read_regular_text(path: str | Path, *, max_bytes: int) -> str:
    """`read_regular_bytes` decoded as UTF-8 (ValueError naming the file when it is not UTF-8)."""
    try:
        return read_regular_bytes(path, max_bytes=max_bytes).decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
