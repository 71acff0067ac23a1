"""Evaluation input files: ProcessBench records, Best-of-N records and critic predictions.

Evaluation runs are expensive (a 7B PRM over 3,400 ProcessBench solutions, or 8 responses for
thousands of problems), so every record is validated while it is streamed, before any of it reaches
an accelerator, and a bad record is reported as ``file:line: field 'name': reason`` (an
:class:`EvaluationDataError`, a ``ValueError``).

Container formats (sniffed from the content, not the extension, because ``datasets``' ``to_json``
writes JSON Lines into ``.json`` files by default):

* **JSON Lines**: one object per line, UTF-8, blank lines skipped;
* **a JSON array** of objects (how the official ProcessBench release stores each subset); it is
  decoded one element at a time, so memory stays at one record plus a read buffer. Error
  locations name the line where the element starts and its index in the array.

Unknown keys are ignored (pipelines carry metadata); ids must be strings, unique across everything
one run reads, because predictions and outputs are joined on them.

Schemas (one per file; each reader accepts exactly one):

* ProcessBench: ``{"id", "problem", "steps": [str, ...], "label": int, "generator"?: str,
  "final_answer_correct"?: bool, "subset"?: str}``; ``label`` is the index of the earliest wrong
  step or -1, so ``-1 <= label < len(steps)``. Without ``subset`` the subset is the file's stem
  (``gsm8k.json`` -> ``gsm8k``).
* Best-of-N: ``{"id", "problem", "answer": str | number, "responses": [{"steps": [str, ...],
  "correct": bool, "final_answer"?: str | null}, ...], "dataset"?: str}``; without ``dataset``
  the dataset is the file's stem.
* Predictions (any external critic): ``{"id", "pred": int | null}``; ``null`` means the critic
  gave no usable verdict (counted as unparseable and scored as wrong).
"""

from __future__ import annotations

import codecs
import dataclasses
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any, Callable, TypeVar

from prm_jax.data.records import DataError, json_type_name

__all__ = [
    "EvaluationDataError",
    "ProcessBenchRecord",
    "BoNResponse",
    "BoNRecord",
    "Prediction",
    "iter_json_objects",
    "input_files",
    "read_processbench",
    "read_bon",
    "read_predictions",
]

PathLikeStr = str | PathLike[str]
T = TypeVar("T")

_READ_CHUNK = 1 << 20  # bytes per read when streaming a JSON array


#: Longest record (one JSONL line, one JSON array element) read by default: a ProcessBench record
#: is a few KB and a Best-of-N record of 64 long responses a few MB; a larger one is refused
#: before it is parsed or tokenized, so its cost stays bounded.
MAX_RECORD_BYTES = 16 * 2**20


class EvaluationDataError(DataError):
    """An evaluation input is invalid; the message says where (``file:line``) and which field."""


# ---------------------------------------------------------------------------- field checks


def _require(obj: dict[str, Any], name: str) -> Any:
    if name not in obj:
        raise EvaluationDataError("missing", field=name)
    return obj[name]


def _string(value: Any, name: str, *, non_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise EvaluationDataError(f"expected a string, got {json_type_name(value)}", field=name)
    if non_empty and not value.strip():
        raise EvaluationDataError("must be a non-empty string", field=name)
    return value


def _integer(value: Any, name: str) -> int:
    # bool is an int in Python; a producer writing `true` for an index has a bug worth naming.
    if isinstance(value, bool) or not isinstance(value, int):
        raise EvaluationDataError(f"expected an integer, got {json_type_name(value)}", field=name)
    return value


def _boolean(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise EvaluationDataError(f"expected true or false, got {json_type_name(value)}", field=name)
    return value


def _steps(value: Any, name: str = "steps") -> tuple[str, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, list):
        raise EvaluationDataError(f"expected an array of step strings, got {json_type_name(value)}", field=name)
    if not value:
        raise EvaluationDataError("the step list is empty; a solution needs at least one step", field=name)
    for i, step in enumerate(value):
        if not isinstance(step, str):
            raise EvaluationDataError(f"step {i} is a {json_type_name(step)}, expected a string", field=name)
    return tuple(value)


# ---------------------------------------------------------------------------- containers


def _decode_line(raw: bytes, path: PathLikeStr, line_number: int) -> str:
    try:
        # utf-8-sig on the first line tolerates a byte-order mark written by some editors.
        return raw.decode("utf-8-sig" if line_number == 1 else "utf-8")
    except UnicodeDecodeError as e:
        raise EvaluationDataError(f"not valid UTF-8 ({e.reason} at byte {e.start})", path=path, line=line_number) from e


def _first_char(path: Path) -> str | None:
    """The first non-whitespace character of a file (after a BOM), or None if it has none."""
    with open(path, "rb") as f:
        while chunk := f.read(4096):
            text = chunk.decode("utf-8-sig", errors="replace").lstrip()
            if text:
                return text[0]
    return None


def _too_long(path: PathLikeStr, line: int, limit: int) -> EvaluationDataError:
    return EvaluationDataError(
        f"record is longer than the limit of {limit} bytes (--max_record_bytes); it is refused before it is "
        "parsed or tokenized. Raise the limit if such records are intended", path=path, line=line)


def _iter_jsonl(path: Path, max_record_bytes: int) -> Iterator[tuple[str, Any]]:
    # Binary mode, decoded line by line: a text-mode reader decodes ahead in chunks and would
    # blame an invalid byte on the wrong line. A line longer than the limit is refused after
    # reading at most the limit (never held, parsed or tokenized whole).
    with open(path, "rb") as f:
        line_number = 0
        while raw := f.readline(max_record_bytes + 1):
            line_number += 1
            if len(raw) > max_record_bytes and not raw.endswith(b"\n"):
                raise _too_long(path, line_number, max_record_bytes)
            line = _decode_line(raw, path, line_number)
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise EvaluationDataError(f"malformed JSON: {e.msg} (column {e.colno})", path=path, line=line_number) from e
            yield f"{path}:{line_number}", obj


def _iter_json_array(path: Path, max_record_bytes: int) -> Iterator[tuple[str, Any]]:
    """Decode a top-level JSON array element by element from a bounded read buffer.

    Only the element being decoded (plus at most one read chunk) is held in memory; consumed
    text is dropped as the buffer advances, and newlines are counted so that errors can name the
    line where an element starts.
    """
    decoder = json.JSONDecoder()
    utf8 = codecs.getincrementaldecoder("utf-8-sig")()
    with open(path, "rb") as f:
        buffer, position, line, eof = "", 0, 1, False

        def fill() -> bool:
            """Append one chunk to the buffer; False at end of file."""
            nonlocal buffer, position, eof
            if eof:
                return False
            raw = f.read(_READ_CHUNK)
            try:
                text = utf8.decode(raw, final=not raw)
            except UnicodeDecodeError as e:
                where = line + buffer.count("\n", position)
                raise EvaluationDataError(f"not valid UTF-8 ({e.reason})", path=path, line=where) from e
            eof = not raw
            if position > _READ_CHUNK:  # drop consumed text so the buffer stays bounded
                buffer, position = buffer[position:], 0
            buffer += text
            return bool(raw)

        def skip_space() -> str | None:
            """Advance past whitespace (counting lines); the next character, or None at EOF."""
            nonlocal position, line
            while True:
                while position < len(buffer) and buffer[position] in " \t\r\n":
                    line += buffer[position] == "\n"
                    position += 1
                if position < len(buffer):
                    return buffer[position]
                if not fill():
                    return None

        if skip_space() != "[":
            raise EvaluationDataError("expected a JSON array", path=path, line=line)
        position += 1
        index = 0
        while True:
            char = skip_space()
            if char is None:
                raise EvaluationDataError("malformed JSON array: missing closing ']'", path=path, line=line)
            if index > 0:
                if char == "]":
                    break
                if char != ",":
                    raise EvaluationDataError(f"malformed JSON array: expected ',' or ']', got {char!r}", path=path, line=line)
                position += 1
                char = skip_space()
                if char is None:
                    raise EvaluationDataError("malformed JSON array: missing closing ']'", path=path, line=line)
            elif char == "]":
                break
            while True:
                try:
                    obj, end = decoder.raw_decode(buffer, position)
                    break
                except json.JSONDecodeError as e:
                    # An element cut by the chunk boundary fails like a malformed one; read on
                    # until the element is complete or the file ends.
                    into_element = e.pos - position  # fill() may shift the buffer
                    if len(buffer) - position > max_record_bytes:
                        raise _too_long(path, line, max_record_bytes) from None
                    if not fill():
                        where = line + buffer.count("\n", position, position + into_element)
                        raise EvaluationDataError(f"malformed JSON: {e.msg} (element {index})", path=path, line=where) from e
            if end - position > max_record_bytes:
                raise _too_long(path, line, max_record_bytes)
            yield f"{path}:{line}", obj
            line += buffer.count("\n", position, end)
            position = end
            index += 1
        position += 1
        if skip_space() is not None:
            raise EvaluationDataError("unexpected content after the closing ']'", path=path, line=line)


def iter_json_objects(
    path: PathLikeStr, max_record_bytes: int = MAX_RECORD_BYTES
) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(location, object)`` for each record of a JSON Lines file or a JSON array file.

    ``location`` is ``"path:line"`` (plus the element index for arrays), used in every later
    error about the record.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    first = _first_char(path)
    if first is None:
        return
    items = _iter_json_array(path, max_record_bytes) if first == "[" else _iter_jsonl(path, max_record_bytes)
    for location, obj in items:
        if not isinstance(obj, dict):
            raise EvaluationDataError(f"expected a JSON object, got {json_type_name(obj)}", path=location)
        yield location, obj


def input_files(path: PathLikeStr) -> list[Path]:
    """The data files a ``--data`` argument names: the file itself, or a directory's
    ``*.jsonl``/``*.json`` files sorted by name (hidden files skipped; so ``gsm8k, math, olympiadbench, omnimath``
    come out in ProcessBench's own order)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(
            p for p in path.iterdir() if p.is_file() and p.suffix in (".jsonl", ".json") and not p.name.startswith(".")
        )
        if not files:
            raise FileNotFoundError(f"{path}: no *.jsonl or *.json files")
        return files
    raise FileNotFoundError(f"{path}: no such file or directory")


def _subset_name(path: Path) -> str:
    return path.name.split(".")[0]


def _validated(
    files: Iterable[Path], parse: Callable[[dict[str, Any], str], T], id_of: Callable[[T], str],
    max_record_bytes: int = MAX_RECORD_BYTES,
) -> Iterator[T]:
    """Parse every object of every file; field errors get the location; ids must be unique."""
    seen: dict[str, str] = {}
    for path in files:
        for location, obj in iter_json_objects(path, max_record_bytes):
            try:
                record = parse(obj, _subset_name(path))
            except EvaluationDataError as e:
                raise EvaluationDataError(e.message, path=location, field=e.field) from None
            record_id = id_of(record)
            if record_id in seen:
                raise EvaluationDataError(
                    f"duplicate id {record_id!r} (first seen at {seen[record_id]}); ids must be unique across all inputs",
                    path=location, field="id",
                )
            seen[record_id] = location
            yield dataclasses.replace(record, source=location)


# ---------------------------------------------------------------------------- ProcessBench


@dataclass(frozen=True)
class ProcessBenchRecord:
    """One ProcessBench solution with the index of its earliest wrong step.

    Attributes:
        id: Unique id (official ids look like ``"gsm8k-12"``).
        subset: Which subset it is scored in (the ``subset`` field, else the file's stem).
        problem: The problem statement.
        steps: The solution's paragraphs, as given.
        label: Earliest wrong step, or -1 when every step is right.
        final_answer_correct: Whether the final answer matches the reference (None if the file
            does not say); correct answers with ``label != -1`` are the "flawed process" cases.
        generator: The policy that wrote the solution (metadata).
        source: ``path:line`` of the record, for later error messages.
    """

    id: str
    subset: str
    problem: str
    steps: tuple[str, ...]
    label: int
    final_answer_correct: bool | None = None
    generator: str = ""
    source: str = ""

    def __post_init__(self) -> None:
        """Enforce the label range, also for records built in code."""
        if not -1 <= self.label < len(self.steps):
            raise EvaluationDataError(
                f"label {self.label} is out of range for {len(self.steps)} steps (expected -1 or 0..{len(self.steps) - 1})",
                field="label",
            )


def _parse_processbench(obj: dict[str, Any], default_subset: str) -> ProcessBenchRecord:
    record_id = _string(_require(obj, "id"), "id", non_empty=True)
    problem = _string(_require(obj, "problem"), "problem")
    steps = _steps(_require(obj, "steps"))
    label = _integer(_require(obj, "label"), "label")
    subset = _string(obj["subset"], "subset", non_empty=True) if "subset" in obj else default_subset
    final = obj.get("final_answer_correct")
    final = None if final is None else _boolean(final, "final_answer_correct")
    generator = obj.get("generator")
    generator = "" if generator is None else _string(generator, "generator")
    return ProcessBenchRecord(record_id, subset, problem, steps, label, final, generator)


def read_processbench(path: PathLikeStr, *, max_record_bytes: int = MAX_RECORD_BYTES) -> Iterator[ProcessBenchRecord]:
    """Stream ProcessBench records from a file or a directory of subset files, validated."""
    yield from _validated(input_files(path), _parse_processbench, lambda r: r.id, max_record_bytes)


# ---------------------------------------------------------------------------- Best-of-N


@dataclass(frozen=True)
class BoNResponse:
    """One sampled response: its steps, whether its final answer is right, and (optionally) that
    answer as the grader extracted it (used for majority voting)."""

    steps: tuple[str, ...]
    correct: bool
    final_answer: str | None = None


@dataclass(frozen=True)
class BoNRecord:
    """One problem with its N sampled responses (the unit of Best-of-N evaluation)."""

    id: str
    dataset: str
    problem: str
    answer: str
    responses: tuple[BoNResponse, ...]
    source: str = ""


def _parse_response(obj: Any, index: int) -> BoNResponse:
    field = f"responses[{index}]"
    if not isinstance(obj, dict):
        raise EvaluationDataError(f"expected an object, got {json_type_name(obj)}", field=field)
    if "steps" not in obj:
        raise EvaluationDataError("missing", field=f"{field}.steps")
    steps = _steps(obj["steps"], f"{field}.steps")
    if "correct" not in obj:
        raise EvaluationDataError("missing", field=f"{field}.correct")
    correct = _boolean(obj["correct"], f"{field}.correct")
    final = obj.get("final_answer")
    if final is not None:
        if isinstance(final, bool) or not isinstance(final, (str, int, float)):
            raise EvaluationDataError(f"expected a string, number or null, got {json_type_name(final)}", field=f"{field}.final_answer")
        final = str(final)
    return BoNResponse(steps, correct, final)


def _parse_bon(obj: dict[str, Any], default_dataset: str) -> BoNRecord:
    record_id = _string(_require(obj, "id"), "id", non_empty=True)
    problem = _string(_require(obj, "problem"), "problem")
    answer = _require(obj, "answer")
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise EvaluationDataError(f"expected a string or number, got {json_type_name(answer)}", field="answer")
    responses = _require(obj, "responses")
    if not isinstance(responses, list):
        raise EvaluationDataError(f"expected an array of responses, got {json_type_name(responses)}", field="responses")
    if not responses:
        raise EvaluationDataError("no responses; Best-of-N needs at least one", field="responses")
    dataset = _string(obj["dataset"], "dataset", non_empty=True) if "dataset" in obj else default_dataset
    parsed = tuple(_parse_response(r, i) for i, r in enumerate(responses))
    return BoNRecord(record_id, dataset, problem, str(answer), parsed)


def read_bon(path: PathLikeStr, *, max_record_bytes: int = MAX_RECORD_BYTES) -> Iterator[BoNRecord]:
    """Stream Best-of-N records from a file or a directory of per-dataset files, validated."""
    yield from _validated(input_files(path), _parse_bon, lambda r: r.id, max_record_bytes)


# ---------------------------------------------------------------------------- predictions


@dataclass(frozen=True)
class Prediction:
    """An external critic's verdict for one ProcessBench record (None = no usable verdict)."""

    id: str
    pred: int | None
    source: str = ""


def _parse_prediction(obj: dict[str, Any], _: str) -> Prediction:
    record_id = _string(_require(obj, "id"), "id", non_empty=True)
    pred = _require(obj, "pred")
    if pred is not None:
        pred = _integer(pred, "pred")
        if pred < -1:
            raise EvaluationDataError(f"{pred} is not a step index (expected -1, a step index, or null)", field="pred")
    return Prediction(record_id, pred)


def read_predictions(path: PathLikeStr) -> Iterator[Prediction]:
    """Stream ``{id, pred}`` predictions (one file, JSON Lines or a JSON array), validated."""
    yield from _validated([Path(path)], _parse_prediction, lambda r: r.id)
