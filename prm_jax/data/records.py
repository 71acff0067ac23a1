"""Training records and their JSONL readers, validated on read.

Training files are produced by `data_pipeline` (or by users) and consumed by a long sharded run,
so a bad record must be caught before any accelerator time is spent, and the error must point at
the exact line to fix. Every reader here therefore validates each record as it streams it and
raises `DataError` with `file:line: field 'name': reason`.

Formats (JSONL read by `prm_jax.jsonl` like every record file: UTF-8, one object per line, blank
lines skipped, unknown keys ignored so that pipelines can carry metadata such as `source`):

* PRM: `{"id": str, "problem": str, "steps": [str, ...], "labels": [0 | 1 | float, ...]}` with
  one label per step. Hard labels (the paper's final recipe: 1 when at least one Monte Carlo
  completion from the step is correct) are the JSON integers `0`/`1`; soft labels (the fraction
  of correct completions) are JSON floats in `[0, 1]`. Booleans are rejected: `true` is an
  `int` in Python, and accepting it would hide a producer that wrote the wrong type.
* SFT (causal-LM fine-tuning of the policy): `{"id": str, "prompt": str, "completion": str}`;
  `prompt` is the user message, `completion` the assistant text.

Ids must be unique within a file: they are how outputs, resumptions and consensus filtering refer
back to a record, so a duplicate means the file was assembled wrongly.

Text follows `prm_jax.tokenization.text_problem`, the rule synthesis input and evaluation records
follow too: no problem or step holds the step separator or a chat control token (`<|im_end|>`,
`<|im_start|>`, ...; `CONTROL_TOKENS`), and no SFT prompt or completion a chat control token. A
tokenizer would read them as control tokens (a fake turn boundary, a step end), so they are
refused at the line that holds them, before any accelerator time; the tokenizer's own further
special tokens are refused when the record is tokenized (`build_prm_input`, `tokenize_sft`).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from os import PathLike
from typing import Any

from prm_jax.jsonl import MAX_LINE_BYTES, DataError, Fields, iter_records, json_type_name
from prm_jax.tokenization import CHAT_CONTROL_TOKENS, CONTROL_TOKENS, text_problem

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


def _check_labels(labels: Any, num_steps: int) -> tuple[tuple[float, ...], bool]:
    """Validate a label list; return the labels as floats and whether all were hard (int) labels."""
    if isinstance(labels, str | bytes) or not isinstance(labels, list | tuple):
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
                raise DataError(f"label {i} is the integer {label}; hard labels must be 0 or 1", field="labels")
            values.append(float(label))
        elif isinstance(label, float):
            if math.isnan(label) or not 0.0 <= label <= 1.0:
                raise DataError(f"label {i} is {label!r}; soft labels must be floats in [0, 1]", field="labels")
            hard = False
            values.append(label)
        else:
            raise DataError(
                f"label {i} is a {json_type_name(label)}; expected 0, 1 or a float in [0, 1]", field="labels"
            )
    return tuple(values), hard


@dataclass(frozen=True)
class PRMRecord:
    """One step-labelled solution: the unit of PRM training data.

    Attributes:
        id: Stable, file-unique identifier.
        problem: The problem statement (the user turn).
        steps: The solution's steps, verbatim (split on blank lines upstream).
        labels: One label per step, as floats: the probability that the step is correct. Hard
            labels are exactly 0.0/1.0.
        hard_labels: Whether the labels are hard. From a file this is `True` when every label
            was a JSON integer (`0`/`1`) and `False` when any was a float (a soft, Monte
            Carlo-style value, even if it happens to be `1.0`); left as `None` when
            constructing a record in code, it is inferred from the values (all in `{0, 1}`).
    """

    id: str
    problem: str
    steps: tuple[str, ...]
    labels: tuple[float, ...]
    hard_labels: bool | None = None

    def __post_init__(self) -> None:
        """Validate programmatic construction with the same rules as the file reader."""
        f = Fields(self.__dict__)
        f.string("id", non_empty=True)
        _check_text(f, "problem", CONTROL_TOKENS)
        steps = f.strings("steps", item="step", non_empty=True)
        for i, step in enumerate(steps):
            why = text_problem(step, CONTROL_TOKENS)
            if why is not None:
                raise f.fail("steps", f"step {i} {why}")
        labels = self.labels
        if isinstance(labels, list | tuple):
            # Programmatic labels may be floats 0.0/1.0 meant as hard labels; accept any number
            # in [0, 1] (bools still rejected) and infer hardness from the values.
            for i, label in enumerate(labels):
                if isinstance(label, bool) or not isinstance(label, int | float):
                    raise DataError(f"label {i} is {label!r}, expected a number in [0, 1]", field="labels")
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
            raise DataError(f"expected a bool, got {type(self.hard_labels).__name__}", field="hard_labels")
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
        f = Fields(self.__dict__)
        f.string("id", non_empty=True)
        _check_text(f, "prompt", CHAT_CONTROL_TOKENS)
        _check_text(f, "completion", CHAT_CONTROL_TOKENS)


def _check_text(f: Fields, key: str, tokens: tuple[str, ...]) -> None:
    """A string field that `text_problem` accepts."""
    why = text_problem(f.string(key), tokens)
    if why is not None:
        raise f.fail(key, why)


def file_sha256(path: str | PathLike[str]) -> str:
    """SHA-256 of a data file's bytes, streamed: what a run records so that resuming over an edited
    input (which would mix two datasets) is refused."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _parse_prm(obj: dict[str, Any]) -> PRMRecord:
    f = Fields(obj)
    record_id, problem = f.string("id", non_empty=True), f.string("problem")
    steps = f.strings("steps", item="step", non_empty=True)
    labels, hard = _check_labels(f.get("labels"), len(steps))
    return PRMRecord(id=record_id, problem=problem, steps=steps, labels=labels, hard_labels=hard)


def _parse_sft(obj: dict[str, Any]) -> SFTRecord:
    f = Fields(obj)
    return SFTRecord(f.get("id"), f.get("prompt"), f.get("completion"))  # typed by __post_init__


def iter_prm_records_with_lines(path: str | PathLike[str]) -> Iterator[tuple[int, PRMRecord]]:
    """Like `read_prm_records`, also yielding each record's 1-based line number.

    Callers that process records further (tokenization) use the line number to report later
    problems at the right place in the file.
    """
    return _iter_parsed(path, _parse_prm)


def iter_sft_records_with_lines(path: str | PathLike[str]) -> Iterator[tuple[int, SFTRecord]]:
    """Like `read_sft_records`, also yielding each record's 1-based line number."""
    return _iter_parsed(path, _parse_sft)


def _iter_parsed(path: str | PathLike[str], parse: Callable[[dict[str, Any]], Any]) -> Iterator[tuple[int, Any]]:
    # The limit is looked up per call, so it can be lowered for a test.
    return iter_records(path, parse, max_line_bytes=MAX_LINE_BYTES)


def read_prm_records(path: str | PathLike[str]) -> Iterator[PRMRecord]:
    """Stream validated `PRMRecord`s from a JSONL file.

    Raises:
        DataError: At the first invalid line (`file:line: field 'x': reason`): malformed JSON,
            a non-object line, a missing or wrongly typed field, an empty `id` or step list,
            a label count different from the step count, a label that is not `0`/`1` or a
            float in `[0, 1]` (booleans and NaN rejected), or a duplicate `id`.
    """
    for _, record in iter_prm_records_with_lines(path):
        yield record


def read_sft_records(path: str | PathLike[str]) -> Iterator[SFTRecord]:
    """Stream validated `SFTRecord`s from a JSONL file.

    Raises:
        DataError: At the first invalid line: malformed JSON, a non-object line, a missing or
            non-string `id`/`prompt`/`completion`, an empty `id`, or a duplicate `id`.
    """
    for _, record in iter_sft_records_with_lines(path):
        yield record


def prm_labels_are_hard(path: str | PathLike[str]) -> bool:
    """Whether every record of a PRM file has hard (integer 0/1) labels.

    Reads (and validates) the whole file. Use it to choose `TokenizeConfig.soft_labels`: a file
    with any float label holds soft labels and must be trained with `soft_labels=True` or be
    binarised upstream.
    """
    return all(record.hard_labels for record in read_prm_records(path))
