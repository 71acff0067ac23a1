"""Training records and their JSONL readers, validated on read.

Training files are produced by ``data_pipeline`` (or by users) and consumed by a long sharded run,
so a bad record must be caught before any accelerator time is spent, and the error must point at
the exact line to fix. Every reader here therefore validates each record as it streams it and
raises :class:`DataError` with ``file:line: field 'name': reason``.

Formats (JSONL, UTF-8, one object per line, blank lines skipped, unknown keys ignored so that
pipelines can carry metadata such as ``source`` or ``generator``):

* PRM: ``{"id": str, "problem": str, "steps": [str, ...], "labels": [0 | 1 | float, ...]}`` with
  one label per step. Hard labels (the paper's final recipe: 1 when at least one Monte Carlo
  completion from the step is correct) are the JSON integers ``0``/``1``; soft labels (the fraction
  of correct completions) are JSON floats in ``[0, 1]``. Booleans are rejected: ``true`` is an
  ``int`` in Python, and accepting it would hide a producer that wrote the wrong type.
* SFT (causal-LM fine-tuning of the policy): ``{"id": str, "prompt": str, "completion": str}``;
  ``prompt`` is the user message, ``completion`` the assistant text.

Ids must be unique within a file: they are how outputs, resumptions and consensus filtering refer
back to a record, so a duplicate means the file was assembled wrongly.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from os import PathLike
from typing import Any, BinaryIO

__all__ = [
    "file_sha256",
    "DataError",
    "PRMRecord",
    "SFTRecord",
    "read_prm_records",
    "read_sft_records",
    "iter_prm_records_with_lines",
    "iter_sft_records_with_lines",
    "prm_labels_are_hard",
]


class DataError(ValueError):
    """A training record is invalid; the message says where (``file:line``) and which field.

    The location parts are kept as attributes too, so callers (e.g. the tokenizer wrapper that
    re-raises a tokenization problem for a record read from disk) can add or inspect them.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | PathLike[str] | None = None,
        line: int | None = None,
        field: str | None = None,
    ) -> None:
        self.message = message
        self.path = None if path is None else str(path)
        self.line = line
        self.field = field
        super().__init__(self._format())

    def _format(self) -> str:
        prefix = ""
        if self.path is not None:
            prefix = self.path + (f":{self.line}" if self.line is not None else "")
            prefix += ": "
        elif self.line is not None:
            prefix = f"line {self.line}: "
        if self.field is not None:
            prefix += f"field {self.field!r}: "
        return prefix + self.message

    def located(self, path: str | PathLike[str], line: int) -> DataError:
        """The same error with a file location (used when the record came from a file)."""
        return DataError(self.message, path=path, line=line, field=self.field)


def _check_str(value: Any, name: str, *, non_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise DataError(f"expected a string, got {json_type_name(value)}", field=name)
    if non_empty and not value:
        raise DataError("must be a non-empty string", field=name)
    return value


def json_type_name(value: Any) -> str:
    """The JSON name of a decoded value's type, for messages about the file's content."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _check_labels(labels: Any, num_steps: int) -> tuple[tuple[float, ...], bool]:
    """Validate a label list; return the labels as floats and whether all were hard (int) labels."""
    if isinstance(labels, (str, bytes)) or not isinstance(labels, (list, tuple)):
        raise DataError(f"expected an array of numbers, got {json_type_name(labels)}", field="labels")
    if len(labels) != num_steps:
        raise DataError(f"{len(labels)} labels for {num_steps} steps", field="labels")
    values: list[float] = []
    hard = True
    for i, label in enumerate(labels):
        if isinstance(label, bool):
            raise DataError(
                f"label {i} is a boolean ({json.dumps(label)}); write hard labels as the "
                "integers 0/1 and soft labels as floats in [0, 1]",
                field="labels",
            )
        if isinstance(label, int):
            if label not in (0, 1):
                raise DataError(
                    f"label {i} is the integer {label}; hard labels must be 0 or 1",
                    field="labels",
                )
            values.append(float(label))
        elif isinstance(label, float):
            if math.isnan(label) or not 0.0 <= label <= 1.0:
                raise DataError(
                    f"label {i} is {label!r}; soft labels must be floats in [0, 1]",
                    field="labels",
                )
            hard = False
            values.append(label)
        else:
            raise DataError(
                f"label {i} is a {json_type_name(label)}; expected 0, 1 or a float in [0, 1]",
                field="labels",
            )
    return tuple(values), hard


def _check_steps(steps: Any) -> tuple[str, ...]:
    if isinstance(steps, (str, bytes)) or not isinstance(steps, (list, tuple)):
        raise DataError(
            f"expected an array of step strings, got {json_type_name(steps)}", field="steps"
        )
    if len(steps) == 0:
        raise DataError("the step list is empty; a PRM record needs at least one step",
                        field="steps")
    for i, step in enumerate(steps):
        if not isinstance(step, str):
            raise DataError(f"step {i} is a {json_type_name(step)}, expected a string", field="steps")
    return tuple(steps)


@dataclass(frozen=True)
class PRMRecord:
    """One step-labelled solution: the unit of PRM training data.

    Attributes:
        id: Stable, file-unique identifier.
        problem: The problem statement (the user turn).
        steps: The solution's steps, verbatim (split on blank lines upstream).
        labels: One label per step, as floats: the probability that the step is correct. Hard
            labels are exactly 0.0/1.0.
        hard_labels: Whether the labels are hard. From a file this is ``True`` when every label
            was a JSON integer (``0``/``1``) and ``False`` when any was a float (a soft, Monte
            Carlo-style value, even if it happens to be ``1.0``); left as ``None`` when
            constructing a record in code, it is inferred from the values (all in ``{0, 1}``).
    """

    id: str
    problem: str
    steps: tuple[str, ...]
    labels: tuple[float, ...]
    hard_labels: bool | None = None

    def __post_init__(self) -> None:
        """Validate programmatic construction with the same rules as the file reader."""
        _check_str(self.id, "id", non_empty=True)
        _check_str(self.problem, "problem")
        steps = _check_steps(self.steps)
        labels = self.labels
        if isinstance(labels, (list, tuple)):
            # Programmatic labels may be floats 0.0/1.0 meant as hard labels; accept any number
            # in [0, 1] (bools still rejected) and infer hardness from the values.
            for i, label in enumerate(labels):
                if isinstance(label, bool) or not isinstance(label, (int, float)):
                    raise DataError(f"label {i} is {label!r}, expected a number in [0, 1]",
                                    field="labels")
            as_float = [float(x) for x in labels]
            _check_labels(as_float, len(steps))
            values = tuple(as_float)
        else:
            values, _ = _check_labels(labels, len(steps))
        object.__setattr__(self, "steps", steps)
        object.__setattr__(self, "labels", values)
        if self.hard_labels is None:
            object.__setattr__(self, "hard_labels", all(v in (0.0, 1.0) for v in values))
        elif not isinstance(self.hard_labels, bool):
            raise DataError(f"expected a bool, got {type(self.hard_labels).__name__}",
                            field="hard_labels")
        elif self.hard_labels and any(v not in (0.0, 1.0) for v in values):
            raise DataError("hard_labels=True but some labels are not 0/1", field="labels")


@dataclass(frozen=True)
class SFTRecord:
    """One prompt/completion pair for causal-LM fine-tuning (e.g. of the policy model).

    Attributes:
        id: Stable, file-unique identifier.
        prompt: The user message; rendered with the chat template and not trained on.
        completion: The assistant text; trained on, followed by the tokenizer's EOS token.
    """

    id: str
    prompt: str
    completion: str

    def __post_init__(self) -> None:
        """Validate programmatic construction with the same rules as the file reader."""
        _check_str(self.id, "id", non_empty=True)
        _check_str(self.prompt, "prompt")
        _check_str(self.completion, "completion")


def _iter_objects(path: str | PathLike[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, object)`` for each non-blank line; JSON errors name the line.

    The file is streamed, never read whole, so multi-GB training files cost constant memory.
    """
    # Binary mode, decoded line by line: a text-mode reader decodes ahead in chunks and would
    # blame an invalid byte on the wrong line.
    with open(path, "rb") as f:
        for line_number, raw in enumerate(_bounded_lines(f, path), start=1):
            try:
                # utf-8-sig on the first line tolerates a byte-order mark written by some editors.
                line = raw.decode("utf-8-sig" if line_number == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"not valid UTF-8 ({e.reason} at byte {e.start})", path=path,
                                line=line_number) from e
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"malformed JSON: {e.msg} (column {e.colno})", path=path,
                                line=line_number) from e
            if not isinstance(obj, dict):
                raise DataError(f"expected a JSON object, got {json_type_name(obj)}", path=path,
                                line=line_number)
            yield line_number, obj


def file_sha256(path: str | PathLike[str]) -> str:
    """SHA-256 of a data file's bytes, streamed: what a run records so that resuming over an edited
    input (which would mix two datasets) is refused."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


#: Longest JSONL line read (bytes). Far above any real record (a long solution is ~100 KB), low
#: enough that a corrupt or concatenated file fails fast instead of filling host memory.
MAX_LINE_BYTES = 64 * 1024 * 1024


def _bounded_lines(f: BinaryIO, path: str | PathLike[str]) -> Iterator[bytes]:
    """The file's lines; one longer than :data:`MAX_LINE_BYTES` is refused without reading it whole."""
    line_number = 0
    while True:
        raw = f.readline(MAX_LINE_BYTES + 1)
        if not raw:
            return
        line_number += 1
        if len(raw) > MAX_LINE_BYTES:
            raise DataError(
                f"line longer than {MAX_LINE_BYTES // (1024 * 1024)} MiB; no record is that long "
                "(is the file JSONL, one record per line?)",
                path=path, line=line_number,
            )
        yield raw


def _require(obj: dict[str, Any], name: str) -> Any:
    if name not in obj:
        raise DataError("missing", field=name)
    return obj[name]


def _check_unique(record_id: str, seen: dict[str, int], line: int) -> None:
    if record_id in seen:
        raise DataError(f"duplicate id {record_id!r} (first seen on line {seen[record_id]})",
                        field="id")
    seen[record_id] = line


def _parse_prm(obj: dict[str, Any]) -> PRMRecord:
    record_id = _check_str(_require(obj, "id"), "id", non_empty=True)
    problem = _check_str(_require(obj, "problem"), "problem")
    steps = _check_steps(_require(obj, "steps"))
    labels, hard = _check_labels(_require(obj, "labels"), len(steps))
    return PRMRecord(id=record_id, problem=problem, steps=steps, labels=labels, hard_labels=hard)


def _parse_sft(obj: dict[str, Any]) -> SFTRecord:
    record_id = _check_str(_require(obj, "id"), "id", non_empty=True)
    prompt = _check_str(_require(obj, "prompt"), "prompt")
    completion = _check_str(_require(obj, "completion"), "completion")
    return SFTRecord(id=record_id, prompt=prompt, completion=completion)


def iter_prm_records_with_lines(path: str | PathLike[str]) -> Iterator[tuple[int, PRMRecord]]:
    """Like :func:`read_prm_records`, also yielding each record's 1-based line number.

    Callers that process records further (tokenization) use the line number to report later
    problems at the right place in the file.
    """
    return _iter_parsed(path, _parse_prm)


def iter_sft_records_with_lines(path: str | PathLike[str]) -> Iterator[tuple[int, SFTRecord]]:
    """Like :func:`read_sft_records`, also yielding each record's 1-based line number."""
    return _iter_parsed(path, _parse_sft)


def _iter_parsed(path: str | PathLike[str], parse) -> Iterator[tuple[int, Any]]:
    """``(line, parse(object))`` for each JSON line, ids unique; errors located at path:line."""
    seen: dict[str, int] = {}
    for line, obj in _iter_objects(path):
        try:
            record = parse(obj)
            _check_unique(record.id, seen, line)
        except DataError as e:
            raise e.located(path, line) from None
        yield line, record


def read_prm_records(path: str | PathLike[str]) -> Iterator[PRMRecord]:
    """Stream validated :class:`PRMRecord` s from a JSONL file.

    Raises:
        DataError: At the first invalid line (``file:line: field 'x': reason``): malformed JSON,
            a non-object line, a missing or wrongly typed field, an empty ``id`` or step list,
            a label count different from the step count, a label that is not ``0``/``1`` or a
            float in ``[0, 1]`` (booleans and NaN rejected), or a duplicate ``id``.
    """
    for _, record in iter_prm_records_with_lines(path):
        yield record


def read_sft_records(path: str | PathLike[str]) -> Iterator[SFTRecord]:
    """Stream validated :class:`SFTRecord` s from a JSONL file.

    Raises:
        DataError: At the first invalid line: malformed JSON, a non-object line, a missing or
            non-string ``id``/``prompt``/``completion``, an empty ``id``, or a duplicate ``id``.
    """
    for _, record in iter_sft_records_with_lines(path):
        yield record


def prm_labels_are_hard(path: str | PathLike[str]) -> bool:
    """Whether every record of a PRM file has hard (integer 0/1) labels.

    Reads (and validates) the whole file. Use it to choose ``TokenizeConfig.soft_labels``: a file
    with any float label holds soft labels and must be trained with ``soft_labels=True`` or be
    binarised upstream.
    """
    return all(record.hard_labels for record in read_prm_records(path))
