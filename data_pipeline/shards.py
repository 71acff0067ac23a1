"""Workdir layout and crash-safe JSONL shard files.

Layout of a synthesis workdir ``W`` (``S`` = ``shard-00003-of-00008``, one per node/process)::

    W/run_config.json                the labelling-relevant settings of the run (checked on restart)
    W/<stage>/S.jsonl                stage records, append-only (stage = sample|grade|mc|judge)
    W/<stage>/S.errors.jsonl         error records of that stage and shard
    W/<stage>/S.done.json            done marker: the stage finished this shard (with counts)
    W/<stage>/S.lock                 held while a process writes the shard
    W/consensus/shards/S.jsonl       consensus records of one shard, sorted by id
    W/consensus/shards/S.counts.json that shard's counts (input of the summary)
    W/consensus/prm_train.jsonl      the merged training records of all shards, sorted by id
    W/summary.json                   counts of every stage, keep rate, label balance, agreement

Why append-only shards instead of one file written at the end: a labelling run is days of
accelerator time, and a killed node must lose at most the records in flight. Each record is one
``write`` of one line; the file is fsynced every ``fsync_every`` records and when closed. On
reopen the file is scanned: a half-written last line (the process died mid-write, or the machine
lost its page cache) is detected and cut off, every complete line is validated, and the ids
already present are skipped by the stage, so a rerun of the same command continues where the
last one stopped and never writes an id twice. Files derived in one go (consensus, summary) are
written to a temporary name and renamed instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Generic, Iterable, Iterator, TypeVar

from data_pipeline.schemas import DataError

_log = logging.getLogger(__name__)

T = TypeVar("T")

STAGES = ("sample", "grade", "mc", "judge", "consensus")


@dataclasses.dataclass(frozen=True)
class Shard:
    """This process's slice of the problems: shard ``index`` of ``count``."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"invalid shard {self.index} of {self.count}: need 0 <= index < count")

    @property
    def name(self) -> str:
        return f"shard-{self.index:05d}-of-{self.count:05d}"


@dataclasses.dataclass(frozen=True)
class Layout:
    """Paths of a synthesis workdir (see the module docstring)."""

    workdir: Path

    def stage_dir(self, stage: str) -> Path:
        return self.workdir / stage

    def records(self, stage: str, shard: Shard) -> Path:
        if stage == "consensus":
            return self.workdir / "consensus" / "shards" / f"{shard.name}.jsonl"
        return self.stage_dir(stage) / f"{shard.name}.jsonl"

    def errors(self, stage: str, shard: Shard) -> Path:
        return self.stage_dir(stage) / f"{shard.name}.errors.jsonl"

    def done(self, stage: str, shard: Shard) -> Path:
        if stage == "consensus":
            return self.workdir / "consensus" / "shards" / f"{shard.name}.counts.json"
        return self.stage_dir(stage) / f"{shard.name}.done.json"

    def lock(self, stage: str, shard: Shard) -> Path:
        return self.stage_dir(stage) / f"{shard.name}.lock"

    @property
    def final_records(self) -> Path:
        return self.workdir / "consensus" / "prm_train.jsonl"

    @property
    def summary(self) -> Path:
        return self.workdir / "summary.json"

    @property
    def run_config(self) -> Path:
        return self.workdir / "run_config.json"


# ---------------------------------------------------------------------------- reading


def _iter_json_lines(path: Path) -> Iterator[tuple[int, int, bytes, dict[str, Any] | None, str | None]]:
    """(line number, byte offset, raw bytes, object or None, problem or None) per non-blank line."""
    offset = 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            start, offset = offset, offset + len(raw)
            if not raw.strip():
                continue
            problem = None
            obj = None
            if not raw.endswith(b"\n"):
                problem = "half-written last line (no newline)"
            else:
                try:
                    obj = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError as e:
                    problem = f"not valid UTF-8 ({e.reason} at byte {e.start})"
                except json.JSONDecodeError as e:
                    problem = f"malformed JSON: {e.msg} (column {e.colno})"
                else:
                    if not isinstance(obj, dict):
                        problem, obj = f"expected a JSON object, got {type(obj).__name__}", None
            yield number, start, raw, obj, problem


def iter_records(path: str | os.PathLike[str], parse: Callable[[dict[str, Any]], T], *,
                 key: Callable[[T], str] = lambda r: r.id) -> Iterator[tuple[int, T]]:
    """Validated records of a finished file, with their line numbers; duplicate ids are errors.

    ``parse`` is a schema's ``from_json``. Errors are :class:`DataError` with ``file:line``.
    """
    path = Path(path)
    seen: dict[str, int] = {}
    for number, _, _, obj, problem in _iter_json_lines(path):
        if problem is not None:
            raise DataError(problem, path=path, line=number)
        try:
            record = parse(obj)
        except DataError as e:
            raise e.located(path, number) from None
        record_id = key(record)
        if record_id in seen:
            raise DataError(f"duplicate id {record_id!r} (first seen on line {seen[record_id]})",
                            path=path, line=number, field="id")
        seen[record_id] = number
        yield number, record


def read_records(path: str | os.PathLike[str], parse: Callable[[dict[str, Any]], T]) -> list[T]:
    return [record for _, record in iter_records(path, parse)]


def read_records_if_exists(path: Path, parse: Callable[[dict[str, Any]], T]) -> list[T]:
    return read_records(path, parse) if path.exists() else []


# ---------------------------------------------------------------------------- writing


class AppendOnlyWriter(Generic[T]):
    """Appends records to a JSONL shard; reopening repairs a torn tail and resumes by id.

    Args:
        path: The shard file (created with its directory if missing).
        parse: The schema's ``from_json``: existing lines are validated on open, so a resume never
            builds on a corrupted file.
        fsync_every: fsync after this many records (and on close), bounding what a machine crash
            can lose; a process kill loses nothing already written.
        fsync_seconds: ... or after this many seconds, whichever comes first.

    ``write`` skips (and reports) a record whose id is already in the file, so re-deriving a
    record after a restart can never duplicate it.
    """

    def __init__(self, path: str | os.PathLike[str], parse: Callable[[dict[str, Any]], T], *,
                 fsync_every: int = 64, fsync_seconds: float = 10.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.ids: set[str] = set()
        self.dropped_tail = False
        self._fsync_every = max(1, fsync_every)
        self._fsync_seconds = fsync_seconds
        self._unsynced = 0
        self._last_sync = time.monotonic()
        if self.path.exists():
            self._repair_and_load(parse)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def _repair_and_load(self, parse: Callable[[dict[str, Any]], T]) -> None:
        lines = list(_iter_json_lines(self.path))
        cut: int | None = None
        for position, (number, offset, _, obj, problem) in enumerate(lines):
            last = position == len(lines) - 1
            if problem is not None:
                if not last:
                    raise DataError(f"{problem}; only the last line of a shard may be damaged "
                                    "(by a kill mid-write), so this file was modified or corrupted",
                                    path=self.path, line=number)
                cut = offset
                break
            try:
                record = parse(obj)
            except DataError as e:
                raise e.located(self.path, number) from None
            if record.id in self.ids:
                raise DataError(f"duplicate id {record.id!r}", path=self.path, line=number, field="id")
            self.ids.add(record.id)
        if cut is not None:
            _log.warning("%s: dropping a half-written last line (the previous run was killed mid-write)",
                         self.path)
            with open(self.path, "r+b") as f:
                f.truncate(cut)
                f.flush()
                os.fsync(f.fileno())
            self.dropped_tail = True

    def write(self, record: Any) -> bool:
        """Append one record (an object with ``id`` and ``to_json``); False if its id is present."""
        if record.id in self.ids:
            return False
        line = json.dumps(record.to_json(), ensure_ascii=False, sort_keys=True, allow_nan=False) + "\n"
        data = line.encode("utf-8")
        written = 0
        while written < len(data):  # one write() in practice; loop for partial writes
            written += os.write(self._fd, data[written:])
        self.ids.add(record.id)
        self._unsynced += 1
        if self._unsynced >= self._fsync_every or time.monotonic() - self._last_sync > self._fsync_seconds:
            self.sync()
        return True

    def sync(self) -> None:
        os.fsync(self._fd)
        self._unsynced = 0
        self._last_sync = time.monotonic()

    def close(self) -> None:
        if self._fd >= 0:
            self.sync()
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "AppendOnlyWriter[T]":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a whole file via a temporary name and a rename: readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, payload: Any) -> None:
    atomic_write_bytes(path, (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def atomic_write_lines(path: Path, lines: Iterable[str], *, validate: Callable[[Path], None] | None = None) -> int:
    """Write JSONL lines to a temporary file, optionally validate it, then rename; returns the count."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    count = 0
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for line in lines:
                f.write(line if line.endswith("\n") else line + "\n")
                count += 1
            f.flush()
            os.fsync(f.fileno())
        if validate is not None:
            validate(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return count


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"malformed JSON: {e.msg}", path=path, line=e.lineno) from None


class ShardLockedError(RuntimeError):
    """Another process holds a stage shard's lock (the message names the lock file)."""


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (two processes writing one shard would duplicate ids).

    The lock dies with its process, so a killed run never leaves a stale lock behind.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ShardLockedError(
                f"{path} is locked: another process is writing this stage and shard. Give each "
                "process its own --shard_index, or wait for the other one to finish") from None
        yield
    finally:
        os.close(fd)
