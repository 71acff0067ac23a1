"""Evaluation input files: ProcessBench records, Best-of-N records and critic predictions.

Evaluation runs are expensive (a 7B PRM over 3,400 ProcessBench solutions, or 8 responses for
thousands of problems), so every record is validated while it is streamed, before any of it reaches
an accelerator, and a bad record is reported as `file:line: field 'name': reason` (an
`EvaluationDataError`, a `ValueError`).

Container formats (sniffed from the content, not the extension, because `datasets`' `to_json`
writes JSON Lines into `.json` files by default):

* **JSON Lines**, read by `prm_jax.jsonl` like every other record file;
* **a JSON array** of objects (how the official ProcessBench release stores each subset); it is
  decoded one element at a time, so memory stays at one record plus a read buffer. Error
  locations name the line where the element starts and its index in the array; an element past
  Python's decoder (a 5,000-digit integer, nesting past the recursion limit: `prm_jax.jsonl`'s
  `JSONLimitError`) is refused there at once.

Unknown keys are ignored (pipelines carry metadata); ids must be strings, unique across everything
one run reads, because predictions and outputs are joined on them.

Text follows `prm_jax.tokenization.text_problem`, the rule of synthesis input and training records:
no problem or step may hold the step separator or a chat control token (`CONTROL_TOKENS`; the scorer
adds its tokenizer's own special tokens), refused at `file:line` naming `problem`, `steps` or
`responses[j].steps`. A Best-of-N gold `answer` follows `prm_jax.answers.answer_problem`, the
grader's rule (non-blank, balanced braces): the responses' `correct` flags were graded against it.

Schemas (one per file; each reader accepts exactly one):

* ProcessBench: `{"id", "problem", "steps": [str, ...], "label": int, "generator"?: str,
  "final_answer_correct"?: bool, "subset"?: str}`; `label` is the index of the earliest wrong
  step or -1, so `-1 <= label < len(steps)`. Without `subset` the subset is the file's stem
  (`gsm8k.json` -> `gsm8k`).
* Best-of-N: `{"id", "problem", "answer": str | number, "responses": [{"steps": [str, ...],
  "correct": bool, "final_answer"?: str | null}, ...], "dataset"?: str}`; without `dataset`
  the dataset is the file's stem.
* Predictions (any external critic): `{"id", "pred": int | null}`; `null` means the critic
  gave no usable verdict (counted as unparseable and scored as wrong).
"""

from __future__ import annotations

import codecs
import dataclasses
import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any, TypeVar

from prm_jax.answers import answer_problem
from prm_jax.files import NotRegularFileError, check_regular_file
from prm_jax.jsonl import (
    DataError,
    Fields,
    JSONLimitError,
    iter_objects,
    json_problem,
    json_type_name,
    raw_decode,
    too_long,
)
from prm_jax.tokenization import CONTROL_TOKENS, text_problem

__all__ = [
    "EvaluationDataError",
    "ProcessBenchRecord",
    "BoNResponse",
    "BoNRecord",
    "Prediction",
    "iter_json_objects",
    "solution_text_problem",
    "input_files",
    "read_processbench",
    "read_bon",
    "read_predictions",
]

PathLikeStr = str | PathLike[str]
T = TypeVar("T")

_READ_CHUNK = 1 << 20  # bytes per read when streaming a JSON array
_KNOB = "--max_record_bytes"


#: Longest record (one JSONL line, one JSON array element) read by default: a ProcessBench record
#: is a few KB and a Best-of-N record of 64 long responses a few MB; a larger one is refused
#: before it is parsed or tokenized, so its cost stays bounded.
MAX_RECORD_BYTES = 16 * 2**20


class EvaluationDataError(DataError):
    """An evaluation input is invalid; the message says where (`file:line`) and which field."""


# ---------------------------------------------------------------------------- containers


def _first_char(path: Path) -> str | None:
    """The first non-whitespace character of a file (after a BOM), or None if it has none."""
    with open(path, "rb") as f:
        while chunk := f.read(4096):
            text = chunk.decode("utf-8-sig", errors="replace").lstrip()
            if text:
                return text[0]
    return None


def _iter_json_array(path: Path, max_record_bytes: int) -> Iterator[tuple[int, Any]]:
    """Decode a top-level JSON array element by element from a bounded read buffer.

    Only the element being decoded (plus at most one read chunk) is held in memory; consumed
    text is dropped as the buffer advances, and newlines are counted so that errors can name the
    line where an element starts.
    """
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
                raise DataError(f"not valid UTF-8 ({e.reason})", path=path, line=where) from e
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
            raise DataError("expected a JSON array", path=path, line=line)
        position += 1
        index = 0
        while True:
            char = skip_space()
            if char is None:
                raise DataError("malformed JSON array: missing closing ']'", path=path, line=line)
            if index > 0:
                if char == "]":
                    break
                if char != ",":
                    raise DataError(f"malformed JSON array: expected ',' or ']', got {char!r}", path=path, line=line)
                position += 1
                char = skip_space()
                if char is None:
                    raise DataError("malformed JSON array: missing closing ']'", path=path, line=line)
            elif char == "]":
                break
            while True:
                try:
                    obj, end = raw_decode(buffer, position)
                    break
                except JSONLimitError as e:
                    # Well-formed but past Python's decoder (a 5,000-digit integer, nesting past the
                    # recursion limit): more text cannot cure it, so it is reported at once, not read
                    # on to the end of the file. The one exception is a buffer ending inside a
                    # number: the chunk boundary may have cut a long float (legal) before its '.'.
                    if eof or not buffer[-1:].isdigit():
                        raise DataError(f"{json_problem(e)} (element {index})", path=path, line=line) from None
                    if len(buffer) - position > max_record_bytes:
                        raise too_long(max_record_bytes, path=path, line=line, what="record", knob=_KNOB) from None
                    fill()
                except json.JSONDecodeError as e:
                    # An element cut by the chunk boundary fails like a malformed one; read on
                    # until the element is complete or the file ends.
                    into_element = e.pos - position  # fill() may shift the buffer
                    if len(buffer) - position > max_record_bytes:
                        raise too_long(max_record_bytes, path=path, line=line, what="record", knob=_KNOB) from None
                    if not fill():
                        where = line + buffer.count("\n", position, position + into_element)
                        raise DataError(f"malformed JSON: {e.msg} (element {index})", path=path, line=where) from e
            if end - position > max_record_bytes:
                raise too_long(max_record_bytes, path=path, line=line, what="record", knob=_KNOB)
            yield line, obj
            line += buffer.count("\n", position, end)
            position = end
            index += 1
        position += 1
        if skip_space() is not None:
            raise DataError("unexpected content after the closing ']'", path=path, line=line)


def iter_json_objects(
    path: PathLikeStr, max_record_bytes: int = MAX_RECORD_BYTES
) -> Iterator[tuple[int, dict[str, Any]]]:
    """`(line, object)` for each record of a JSON Lines file or a JSON array file.

    `line` is where the record starts, used in every later error about the record.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    first = _first_char(path)
    if first is None:
        return
    if first != "[":
        yield from iter_objects(path, max_line_bytes=max_record_bytes, knob=_KNOB)
        return
    for line, obj in _iter_json_array(path, max_record_bytes):
        if not isinstance(obj, dict):
            raise DataError(f"expected a JSON object, got {json_type_name(obj)}", path=path, line=line)
        yield line, obj


def input_files(path: PathLikeStr) -> list[Path]:
    """The data files a `--data` argument names: the file itself, or a directory's
    `*.jsonl`/`*.json` files sorted by name (hidden files skipped; so `gsm8k, math, olympiadbench, omnimath`
    come out in ProcessBench's own order).

    Every such name must be a regular file (a symlink to one is fine: the Hub cache links its
    files): one that is a dangling symlink, a directory, a FIFO or a device is refused, naming it,
    rather than left out, which would average the F1 over fewer subsets without a word."""
    path = Path(path)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".jsonl", ".json") and not p.name.startswith("."))
        for file in files:
            problem = _not_a_regular_file(file)
            if problem is not None:
                raise EvaluationDataError(
                    f"{problem}; every *.jsonl/*.json file in a --data folder is read as a subset"
                )
        if not files:
            raise FileNotFoundError(f"{path}: no *.jsonl or *.json files")
        return files
    problem = _not_a_regular_file(path) if path.is_symlink() or path.exists() else None
    if problem is not None:
        raise EvaluationDataError(problem)
    raise FileNotFoundError(f"{path}: no such file or directory")


def _not_a_regular_file(path: Path) -> str | None:
    """Why `path` cannot be read as a data file (naming it), or None for a regular file: the one
    regular-file rule (`prm_jax.files.check_regular_file`), plus a dangling symlink's target."""
    if path.is_symlink() and not path.exists():
        return f"{path}: a dangling symlink (to {os.readlink(path)}); remove it or point it at the subset's file"
    try:
        check_regular_file(path)
    except NotRegularFileError as error:
        return f"{error} (a data file must be a regular file, or a symlink to one)"
    return None


def _subset_name(path: Path) -> str:
    return path.name.split(".")[0]


def _validated(
    files: Iterable[Path], parse: Callable[[Fields, str], T], max_record_bytes: int = MAX_RECORD_BYTES
) -> Iterator[T]:
    """Parse every object of every file; ids must be unique; every error is an `EvaluationDataError`."""
    seen: dict[str, str] = {}
    try:
        for path in files:
            for line, obj in iter_json_objects(path, max_record_bytes):
                try:
                    record = parse(Fields(obj), _subset_name(path))
                except DataError as e:
                    raise e.located(path, line) from None
                location = f"{path}:{line}"
                if record.id in seen:
                    raise DataError(
                        f"duplicate id {record.id!r} (first seen at {seen[record.id]}); ids must be unique across all "
                        "inputs",
                        path=path,
                        line=line,
                        field="id",
                    )
                seen[record.id] = location
                yield dataclasses.replace(record, source=location)
    except DataError as e:  # the containers and the shared field checks raise the base type
        raise EvaluationDataError(e.message, path=e.path, line=e.line, field=e.field) from e.__cause__


# ---------------------------------------------------------------------------- ProcessBench


@dataclass(frozen=True)
class ProcessBenchRecord:
    """One ProcessBench solution with the index of its earliest wrong step.

    Attributes:
        id: Unique id (official ids look like `"gsm8k-12"`).
        subset: Which subset it is scored in (the `subset` field, else the file's stem).
        problem: The problem statement.
        steps: The solution's paragraphs, as given.
        label: Earliest wrong step, or -1 when every step is right.
        final_answer_correct: Whether the final answer matches the reference (None if the file
            does not say); correct answers with `label != -1` are the "flawed process" cases.
        generator: The policy that wrote the solution (metadata).
        source: `path:line` of the record, for later error messages.
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


def solution_text_problem(
    problem: str | None, steps: Sequence[str], tokens: Sequence[str] = CONTROL_TOKENS
) -> tuple[str, str] | None:
    """The first text of a solution that `prm_jax.tokenization.text_problem` refuses, as `(field, reason)`
    (field `problem` or `steps`), or None; `problem=None` checks the steps only.

    The readers apply it with `CONTROL_TOKENS` (no tokenizer at read time, so a bad record stops the
    run before any model loads) and the scorer's `prepare_input` with the tokenizer's own special
    tokens added: a separator inside a step would be scored as a step end, a `<|im_end|>` inside a
    problem would close the user turn of the prompt.
    """
    if problem is not None and (why := text_problem(problem, tokens)) is not None:
        return "problem", why
    for i, step in enumerate(steps):
        if (why := text_problem(step, tokens)) is not None:
            return "steps", f"step {i} {why}"
    return None


def _refuse_text(f: Fields, problem: str | None, steps: Sequence[str]) -> None:
    """`solution_text_problem` as a `DataError` naming the field (with `f`'s prefix: `responses[2].steps`)."""
    found = solution_text_problem(problem, steps)
    if found is not None:
        raise f.fail(*found)


def _parse_processbench(f: Fields, default_subset: str) -> ProcessBenchRecord:
    record_id, problem = f.string("id", non_empty=True), f.string("problem")
    steps = f.strings("steps", item="step", non_empty=True)
    _refuse_text(f, problem, steps)
    label = f.integer("label")
    subset = f.string("subset", non_empty=True) if "subset" in f.obj else default_subset
    final = f.boolean("final_answer_correct", optional=True)
    generator = f.string("generator", optional=True) or ""
    return ProcessBenchRecord(record_id, subset, problem, steps, label, final, generator)


def read_processbench(path: PathLikeStr, *, max_record_bytes: int = MAX_RECORD_BYTES) -> Iterator[ProcessBenchRecord]:
    """Stream ProcessBench records from a file or a directory of subset files, validated."""
    yield from _validated(input_files(path), _parse_processbench, max_record_bytes)


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


def _scalar(f: Fields, key: str, expected: str) -> str:
    """A string or a number (an answer), as text."""
    value = f.get(key)
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise f.fail(key, f"expected {expected}, got {json_type_name(value)}")
    return str(value)


def _parse_response(f: Fields) -> BoNResponse:
    steps = f.strings("steps", item="step", non_empty=True)
    _refuse_text(f, None, steps)
    correct = f.boolean("correct")
    final = None if f.absent("final_answer") else _scalar(f, "final_answer", "a string, number or null")
    return BoNResponse(steps, correct, final)


def _parse_bon(f: Fields, default_dataset: str) -> BoNRecord:
    record_id, problem = f.string("id", non_empty=True), f.string("problem")
    _refuse_text(f, problem, ())
    answer = _scalar(f, "answer", "a string or number")
    # The rule the grader applies to a gold: the responses' `correct` flags were graded against this
    # answer, and against a gold like `x}{y` or `\\frac{1}{` grading is wrong in silence.
    why = answer_problem(answer)
    if why is not None:
        raise f.fail("answer", f"the gold answer {why}; the responses' 'correct' flags cannot have been graded right")
    responses = f.objects("responses", of="responses")
    if not responses:
        raise f.fail("responses", "no responses; Best-of-N needs at least one")
    dataset = f.string("dataset", non_empty=True) if "dataset" in f.obj else default_dataset
    return BoNRecord(record_id, dataset, problem, answer, tuple(_parse_response(r) for r in responses))


def read_bon(path: PathLikeStr, *, max_record_bytes: int = MAX_RECORD_BYTES) -> Iterator[BoNRecord]:
    """Stream Best-of-N records from a file or a directory of per-dataset files, validated."""
    yield from _validated(input_files(path), _parse_bon, max_record_bytes)


# ---------------------------------------------------------------------------- predictions


@dataclass(frozen=True)
class Prediction:
    """An external critic's verdict for one ProcessBench record (None = no usable verdict)."""

    id: str
    pred: int | None
    source: str = ""


def _parse_prediction(f: Fields, _: str) -> Prediction:
    record_id, pred = f.string("id", non_empty=True), f.get("pred")
    if pred is not None:
        pred = f.integer("pred")
        if pred < -1:
            raise f.fail("pred", f"{pred} is not a step index (expected -1, a step index, or null)")
    return Prediction(record_id, pred)


def read_predictions(path: PathLikeStr) -> Iterator[Prediction]:
    """Stream `{id, pred}` predictions (one file, JSON Lines or a JSON array), validated."""
    yield from _validated([Path(path)], _parse_prediction)
