"""JSON Lines record files: the one reader, the one set of field checks and the one crash-safe appender.

Training records (`prm_jax.data.records`), evaluation inputs (`prm_jax.evaluation.records`) and the
synthesis stage shards (`data_pipeline.shards`) are all read here, so a file means the same thing
wherever it is read:

- UTF-8, one JSON object per line, blank lines skipped, unknown keys left to the parser (pipelines
  carry metadata). A byte-order mark at the very start of a file (some editors write one) is skipped;
  anywhere else it is malformed JSON.
- Read in binary and decoded line by line (a text-mode reader decodes ahead in chunks and would blame
  an invalid byte on the wrong line), each line bounded by `max_line_bytes`: a longer one is refused
  after reading at most that many bytes, so a corrupt or concatenated file fails fast instead of
  filling host memory.
- Every problem is a `DataError` reading `file:line: field 'name': problem`; ids are unique per file.
- JSON is decoded by `loads` / `raw_decode` only: Python's decoder fails in three ways (a syntax
  error, an integer over `sys.get_int_max_str_digits()` digits, nesting past the recursion limit),
  and these turn all three into one `json.JSONDecodeError`, so no line of any file ends in a
  traceback without its `file:line`.

Each record type supplies a parser from a decoded object to a record, written with `Fields`. Whole
files are written with `prm_jax.files`; files that grow record by record (synthesis shards, days of
accelerator time) with `AppendOnlyWriter`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from os import PathLike
from pathlib import Path
from typing import Any, Generic, NamedTuple, TypeVar

from prm_jax.files import naming_path

_log = logging.getLogger(__name__)

T = TypeVar("T")
PathLikeStr = str | PathLike[str]

#: Longest line read by default (bytes). Far above any real record (a long solution is ~100 KB), low
#: enough that a corrupt or concatenated file fails fast instead of filling host memory.
MAX_LINE_BYTES = 64 * 1024 * 1024


class DataError(ValueError):
    """A record is invalid; the message says where (`file:line`) and which field.

    The location parts are kept as attributes too, so callers (e.g. the tokenizer wrapper that
    re-raises a tokenization problem for a record read from disk) can add or inspect them.
    """

    def __init__(
        self, message: str, *, path: PathLikeStr | None = None, line: int | None = None, field: str | None = None
    ) -> None:
        self.message = message
        self.path = None if path is None else str(path)
        self.line = line
        self.field = field
        super().__init__(self._format())

    def _format(self) -> str:
        prefix = ""
        if self.path is not None:
            prefix = self.path + (f":{self.line}" if self.line is not None else "") + ": "
        elif self.line is not None:
            prefix = f"line {self.line}: "
        if self.field is not None:
            prefix += f"field {self.field!r}: "
        return prefix + self.message

    def located(self, path: PathLikeStr, line: int | None) -> DataError:
        """The same error (same type) with a file location (used when the record came from a file)."""
        return type(self)(self.message, path=path, line=line, field=self.field)


class RecordTooLongError(DataError):
    """A line (or record) over the reader's byte limit: refused before it is parsed."""


def too_long(limit: int, *, path: PathLikeStr, line: int, what: str = "line", knob: str | None = None) -> DataError:
    """The one refusal of an over-long record; `knob` names the setting that raises the limit."""
    hint = f"raise {knob} if such records are intended" if knob else "is the file one JSON record per line?"
    return RecordTooLongError(
        f"{what} longer than the limit of {limit} bytes; refused before it is parsed ({hint})", path=path, line=line
    )


def json_type_name(value: Any) -> str:
    """The JSON name of a decoded value's type, for messages about the file's content."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list | tuple):
        return "array"
    if isinstance(value, Mapping):
        return "object"
    return type(value).__name__


# ---------------------------------------------------------------------------- decoding


class JSONLimitError(json.JSONDecodeError):
    """Well-formed JSON past what Python's decoder reads: an integer of more digits than
    `sys.get_int_max_str_digits()` (a `ValueError` from `int`), or arrays/objects nested deeper than the
    recursion limit (a `RecursionError`). A `json.JSONDecodeError`, so every handler of malformed JSON
    catches it; unlike a syntax error it cannot be a text cut short, so a reader that refills its
    buffer on a syntax error (a streamed JSON array) must not refill for this one."""


_DECODER = json.JSONDecoder()


def _limit_error(error: BaseException, text: str, position: int) -> JSONLimitError:
    if isinstance(error, RecursionError):
        why = (
            f"arrays or objects nested deeper than Python's JSON decoder reads (about {sys.getrecursionlimit()} levels)"
        )
    else:  # int(): the only ValueError json raises that is not a JSONDecodeError
        why = f"a number of more than {sys.get_int_max_str_digits()} digits (Python's limit for reading integers)"
    return JSONLimitError(why, text, position)


def loads(text: str) -> Any:
    """`json.loads` of one JSON text whose every failure is a `json.JSONDecodeError` (see `JSONLimitError`)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise
    except (ValueError, RecursionError) as e:
        raise _limit_error(e, text, 0) from None


def raw_decode(text: str, position: int = 0) -> tuple[Any, int]:
    """`json.JSONDecoder().raw_decode(text, position)` (one value and where it ends) with `loads`'s errors."""
    try:
        return _DECODER.raw_decode(text, position)
    except json.JSONDecodeError:
        raise
    except (ValueError, RecursionError) as e:
        raise _limit_error(e, text, position) from None


def json_problem(error: json.JSONDecodeError) -> str:
    """What a decode failure means, for a `file:line` message (the column only where it is known)."""
    if isinstance(error, JSONLimitError):
        return f"unreadable JSON: {error.msg}"
    return f"malformed JSON: {error.msg} (column {error.colno})"


# ---------------------------------------------------------------------------- reading


class Line(NamedTuple):
    """One non-blank line of a JSONL file: its decoded object, or the error saying why there is none."""

    number: int  # 1-based
    offset: int  # byte offset of its start (where a torn tail is cut)
    obj: dict[str, Any] | None
    error: DataError | None
    ended: bool  # ends with a newline; only a file's last line can lack one


def scan_lines(path: PathLikeStr, *, max_line_bytes: int = MAX_LINE_BYTES, knob: str | None = None) -> Iterator[Line]:
    """Every non-blank line of `path`, decoded, without raising for a bad line.

    The readers below raise at the first `Line.error`; readers that turn bad lines into error
    records (synthesis's problem reader) or repair a torn tail (`AppendOnlyWriter`) go on. A line
    over `max_line_bytes` costs at most that much memory: its rest is skipped in bounded chunks.
    """
    with open(path, "rb") as f:
        number = offset = 0
        while raw := f.readline(max_line_bytes + 1):
            number += 1
            start, offset = offset, offset + len(raw)
            if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
                yield Line(number, start, None, too_long(max_line_bytes, path=path, line=number, knob=knob), False)
                while rest := f.readline(max_line_bytes):  # only when the caller reads on
                    offset += len(rest)
                    if rest.endswith(b"\n"):
                        break
                continue
            ended, obj, problem = raw.endswith(b"\n"), None, None
            try:
                text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
                if not text.strip():
                    continue
                obj = loads(text)
            except UnicodeDecodeError as e:
                problem = f"not valid UTF-8 ({e.reason} at byte {e.start})"
            except json.JSONDecodeError as e:
                # A line without a newline is the file's last: most likely a writer killed mid-line.
                torn = "" if ended else "; the last line has no newline (was its writer killed mid-write?)"
                problem = json_problem(e) + torn
            if problem is None and not isinstance(obj, dict):
                problem, obj = f"expected a JSON object, got {json_type_name(obj)}", None
            error = None if problem is None else DataError(problem, path=path, line=number)
            yield Line(number, start, obj, error, ended)


def iter_objects(
    path: PathLikeStr, *, max_line_bytes: int = MAX_LINE_BYTES, knob: str | None = None
) -> Iterator[tuple[int, dict[str, Any]]]:
    """`(line number, object)` for each non-blank line; raises `DataError` at the first bad line."""
    for line in scan_lines(path, max_line_bytes=max_line_bytes, knob=knob):
        if line.error is not None:
            raise line.error
        yield line.number, line.obj


def _parsed(
    path: PathLikeStr, lines: Iterable[tuple[int, dict[str, Any]]], parse: Callable[[dict[str, Any]], T]
) -> Iterator[tuple[int, T]]:
    """`(line, parse(object))` with unique ids; parse errors are located at `path:line`."""
    seen: dict[str, int] = {}
    for number, obj in lines:
        try:
            record = parse(obj)
        except DataError as e:
            raise e.located(path, number) from None
        record_id = record.id
        if record_id in seen:
            message = f"duplicate id {record_id!r} (first seen on line {seen[record_id]})"
            raise DataError(message, path=path, line=number, field="id")
        seen[record_id] = number
        yield number, record


def iter_records(
    path: PathLikeStr, parse: Callable[[dict[str, Any]], T], *, max_line_bytes: int = MAX_LINE_BYTES
) -> Iterator[tuple[int, T]]:
    """Validated records of a JSONL file with their line numbers, streamed; duplicate ids are errors.

    Args:
        path: The file.
        parse: The record type's parser: a decoded object to a record (with an `id`), raising
            `DataError` (with a field, no location) for an invalid one; the location is added here.
        max_line_bytes: The longest line read (see `scan_lines`).
    """
    return _parsed(path, iter_objects(path, max_line_bytes=max_line_bytes), parse)


def read_records(path: PathLikeStr, parse: Callable[[dict[str, Any]], T], **kwargs: Any) -> list[T]:
    """Every record of `iter_records`, as a list."""
    return [record for _, record in iter_records(path, parse, **kwargs)]


# ---------------------------------------------------------------------------- fields


class Fields:
    """Typed access to one decoded JSON object; every failure is a `DataError` naming the field.

    The one set of field checks of every record type. Nested objects carry a prefix, so a message
    names the exact place (`responses[2].steps`). Booleans are never integers or numbers here:
    `true` is an `int` in Python, and accepting it would hide a producer that wrote the wrong type.
    """

    def __init__(self, obj: Any, prefix: str = "") -> None:
        if not isinstance(obj, Mapping):
            raise DataError(f"expected a JSON object, got {json_type_name(obj)}", field=prefix or None)
        self.obj = obj
        self.prefix = prefix

    def name(self, key: str) -> str:
        return f"{self.prefix}.{key}" if self.prefix else key

    def fail(self, key: str, message: str) -> DataError:
        return DataError(message, field=self.name(key))

    def get(self, key: str) -> Any:
        if key not in self.obj:
            raise self.fail(key, "missing")
        return self.obj[key]

    def absent(self, key: str) -> bool:
        """Missing or null: how an optional field is left out."""
        return self.obj.get(key) is None

    def string(
        self, key: str, *, non_empty: bool = False, choices: tuple[str, ...] | None = None, optional: bool = False
    ) -> str | None:
        """A string; `non_empty` also refuses whitespace only; `optional`: None when absent."""
        if optional and self.absent(key):
            return None
        value = self.get(key)
        if not isinstance(value, str):
            raise self.fail(key, f"expected a string, got {json_type_name(value)}")
        if non_empty and not value.strip():
            raise self.fail(key, "must be a non-empty string")
        if choices is not None and value not in choices:
            raise self.fail(key, f"{value!r} is not one of {list(choices)}")
        return value

    def integer(
        self, key: str, *, minimum: int | None = None, maximum: int | None = None, optional: bool = False
    ) -> int | None:
        """An integer in `[minimum, maximum]` (bounds optional); `optional`: None when absent."""
        if optional and self.absent(key):
            return None
        value = self.get(key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key, f"expected an integer, got {json_type_name(value)}")
        if minimum is not None and value < minimum:
            raise self.fail(key, f"{value} is below the minimum {minimum}")
        if maximum is not None and value > maximum:
            raise self.fail(key, f"{value} is above the maximum {maximum}")
        return value

    def probability(self, key: str) -> float:
        """A number in [0, 1] (NaN is not), as a float."""
        value = self.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
            raise self.fail(key, f"expected a number in [0, 1], got {value!r}")
        return float(value)

    def boolean(self, key: str, *, optional: bool = False) -> bool | None:
        """`true` or `false`; `optional`: None when absent."""
        if optional and self.absent(key):
            return None
        value = self.get(key)
        if not isinstance(value, bool):
            raise self.fail(key, f"expected true or false, got {json_type_name(value)}")
        return value

    def array(self, key: str, *, of: str = "") -> list[Any]:
        """An array; `of` names its elements in the message."""
        value = self.get(key)
        if not isinstance(value, list):
            raise self.fail(key, f"expected an array{' of ' + of if of else ''}, got {json_type_name(value)}")
        return value

    def strings(self, key: str, *, item: str = "item", non_empty: bool = False) -> tuple[str, ...]:
        """An array of strings (a tuple also passes: records built in code); `item` names an element."""
        value = self.get(key)
        if not isinstance(value, list | tuple):
            noun = "strings" if item == "item" else f"{item} strings"
            raise self.fail(key, f"expected an array of {noun}, got {json_type_name(value)}")
        if non_empty and not value:
            raise self.fail(key, f"the {item} list is empty; a solution needs at least one {item}")
        for i, element in enumerate(value):
            if not isinstance(element, str):
                raise self.fail(key, f"{item} {i} is a {json_type_name(element)}, expected a string")
        return tuple(value)

    def object(self, key: str) -> Fields:
        """A nested object, its fields named `key.field`."""
        return Fields(self.get(key), self.name(key))

    def objects(self, key: str, *, of: str = "") -> list[Fields]:
        """An array of objects, their fields named `key[i].field`."""
        return [Fields(element, f"{self.name(key)}[{i}]") for i, element in enumerate(self.array(key, of=of))]


# ---------------------------------------------------------------------------- appending


class AppendOnlyWriter(Generic[T]):
    """Appends records to a JSONL file; reopening repairs a torn tail and resumes by id.

    Each record is one `write` of one line. On reopen, a damaged last line (the process died
    mid-write, or the machine lost its page cache) is cut off, every other line is validated (damage
    there cannot come from a kill, so it is an error), and the ids present are kept in `ids`: a
    rerun of the same command continues where the last one stopped and never writes an id twice.

    Args:
        path: The file (created with its directory if missing).
        parse: The record type's parser; existing lines are validated on open, so a resume never
            builds on a corrupted file.
        fsync_every: fsync after this many records (and on close), bounding what a machine crash
            can lose; a process kill loses nothing already written.
        fsync_seconds: ... or after this many seconds, whichever comes first.
        max_line_bytes: The longest line written (a longer record is refused before it is written,
            so a reopen never meets a line it cannot read back) and read back on reopen.

    Records are objects with `id` and `to_json()`; `write` skips (and reports) a record whose id is
    already in the file.
    """

    def __init__(
        self,
        path: PathLikeStr,
        parse: Callable[[dict[str, Any]], T],
        *,
        fsync_every: int = 64,
        fsync_seconds: float = 10.0,
        max_line_bytes: int = MAX_LINE_BYTES,
    ) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.ids: set[str] = set()
        self.dropped_tail = False
        self._fsync_every = max(1, fsync_every)
        self._fsync_seconds = fsync_seconds
        self._unsynced = 0
        self._last_sync = time.monotonic()
        self._max_line_bytes = max_line_bytes
        if self.path.exists():
            self._repair_and_load(parse, max_line_bytes)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def _repair_and_load(self, parse: Callable[[dict[str, Any]], T], max_line_bytes: int) -> None:
        torn_at: int | None = None  # offset of a damaged last line

        def intact() -> Iterator[tuple[int, dict[str, Any]]]:
            nonlocal torn_at
            previous: Line | None = None  # one line of look-ahead: only the last line may be damaged
            for line in scan_lines(self.path, max_line_bytes=max_line_bytes):
                if previous is not None:
                    if previous.error is not None:
                        raise DataError(
                            f"{previous.error.message}; only the last line of an appended file may be damaged "
                            "(by a kill mid-write), so this file was modified or corrupted",
                            path=self.path,
                            line=previous.number,
                        )
                    yield previous.number, previous.obj
                previous = line
            if previous is not None and (previous.error is not None or not previous.ended):
                torn_at = previous.offset
            elif previous is not None:
                yield previous.number, previous.obj

        self.ids = {record.id for _, record in _parsed(self.path, intact(), parse)}
        if torn_at is not None:
            _log.warning("%s: dropping a half-written last line (the previous run was killed mid-write)", self.path)
            with open(self.path, "r+b") as f:
                f.truncate(torn_at)
                f.flush()
                os.fsync(f.fileno())
            self.dropped_tail = True

    def write(self, record: Any) -> bool:
        """Append one record (an object with `id` and `to_json`); False if its id is present."""
        if record.id in self.ids:
            return False
        line = json.dumps(record.to_json(), ensure_ascii=False, sort_keys=True, allow_nan=False) + "\n"
        data = line.encode("utf-8")
        if len(data) - 1 > self._max_line_bytes:
            raise DataError(
                f"record {record.id!r} is {len(data) - 1} bytes as JSON, over the {self._max_line_bytes}-byte line "
                "limit of this file; it was not written",
                path=self.path,
            )
        written = 0
        with naming_path(self.path):  # a full disk names this file (a torn line is cut on reopen)
            while written < len(data):  # one write() in practice; loop for partial writes
                written += os.write(self._fd, data[written:])
        self.ids.add(record.id)
        self._unsynced += 1
        if self._unsynced >= self._fsync_every or time.monotonic() - self._last_sync > self._fsync_seconds:
            self.sync()
        return True

    def sync(self) -> None:
        with naming_path(self.path):
            os.fsync(self._fd)
        self._unsynced = 0
        self._last_sync = time.monotonic()

    def close(self) -> None:
        if self._fd >= 0:
            self.sync()
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> AppendOnlyWriter[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
