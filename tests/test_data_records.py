"""JSONL record readers: valid files stream as records, every invalid line is named precisely."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

import prm_jax.data.records as records_module
from prm_jax.data.records import (
    DataError,
    PRMRecord,
    SFTRecord,
    prm_labels_are_hard,
    read_prm_records,
    read_sft_records,
)

GOOD_PRM = [
    {"id": "a", "problem": "1+1?", "steps": ["1+1=2", "\\boxed{2}"], "labels": [1, 1]},
    {
        "id": "b",
        "problem": "2*3?",
        "steps": ["2*3=5", "\\boxed{5}"],
        "labels": [0, 0],
        "source": "extra keys are ignored",
    },
]


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _prm_file(tmp_path: Path, bad_line: str) -> Path:
    """Two good records, a blank line, then the bad line: the bad line is line 4."""
    return _write(tmp_path / "train.jsonl", [json.dumps(GOOD_PRM[0]), json.dumps(GOOD_PRM[1]), "", bad_line])


_DELETE = object()  # marks a key to remove in _prm


def _prm(**overrides) -> str:
    record = {"id": "c", "problem": "p", "steps": ["s0", "s1", "s2", "s3"], "labels": [1, 1, 0, 0]}
    record.update(overrides)
    for key in [k for k, v in overrides.items() if v is _DELETE]:
        del record[key]
    return json.dumps(record)


def test_reads_hard_and_soft_records_and_skips_blank_lines(tmp_path):
    soft = {"id": "s", "problem": "q", "steps": ["x", "y"], "labels": [0.625, 0.0]}
    path = _write(
        tmp_path / "train.jsonl", ["", json.dumps(GOOD_PRM[0]), "   ", json.dumps(GOOD_PRM[1]), json.dumps(soft), ""]
    )
    records = list(read_prm_records(path))
    assert [r.id for r in records] == ["a", "b", "s"]
    assert records[0] == PRMRecord("a", "1+1?", ("1+1=2", "\\boxed{2}"), (1.0, 1.0), True)
    assert records[1].labels == (0.0, 0.0) and records[1].hard_labels is True
    assert records[2].labels == (0.625, 0.0) and records[2].hard_labels is False
    assert all(isinstance(v, float) for r in records for v in r.labels)
    assert isinstance(records[0].steps, tuple)
    assert prm_labels_are_hard(path) is False
    hard_only = _write(tmp_path / "hard.jsonl", [json.dumps(r) for r in GOOD_PRM])
    assert prm_labels_are_hard(hard_only) is True


def test_float_one_and_zero_count_as_soft_labels_from_a_file(tmp_path):
    """A JSON float is a soft label even when it equals 0 or 1: the file's type says how it
    was produced."""
    record = {"id": "f", "problem": "q", "steps": ["x"], "labels": [1.0]}
    path = _write(tmp_path / "f.jsonl", [json.dumps(record)])
    (parsed,) = read_prm_records(path)
    assert parsed.labels == (1.0,) and parsed.hard_labels is False


@pytest.mark.parametrize(
    "bad_line, field, fragment",
    [
        ('{"id": "c", "problem": ', None, "malformed JSON"),
        ("[1, 2, 3]", None, "expected a JSON object, got array"),
        (_prm(id=_DELETE), "id", "missing"),
        (_prm(id=7), "id", "expected a string, got number"),
        (_prm(id=""), "id", "non-empty"),
        (_prm(problem=_DELETE), "problem", "missing"),
        (_prm(problem=["p"]), "problem", "expected a string, got array"),
        (_prm(steps="s0\n\ns1"), "steps", "expected an array of step strings, got string"),
        (_prm(steps=[], labels=[]), "steps", "the step list is empty"),
        (_prm(steps=["s0", 3, "s2", "s3"]), "steps", "step 1 is a number"),
        (_prm(labels=[1, 1, 0]), "labels", "3 labels for 4 steps"),
        (_prm(labels=[1, 1, 0, 0, 1]), "labels", "5 labels for 4 steps"),
        (_prm(labels=_DELETE), "labels", "missing"),
        (_prm(labels=None), "labels", "expected an array of numbers, got null"),
        (_prm(labels=[1, 2, 0, 0]), "labels", "label 1 is the integer 2"),
        (_prm(labels=[1, -1, 0, 0]), "labels", "label 1 is the integer -1"),
        (_prm(labels=[1, 1.5, 0, 0]), "labels", "label 1 is 1.5"),
        (_prm(labels=[1, -0.25, 0, 0]), "labels", "label 1 is -0.25"),
        (_prm(labels=[True, 1, 0, 0]), "labels", "label 0 is a boolean"),
        (_prm(labels=[1, "1", 0, 0]), "labels", "label 1 is a string"),
        (_prm(labels=[1, None, 0, 0]), "labels", "label 1 is a null"),
        (_prm(id="a"), "id", "duplicate id 'a' (first seen on line 1)"),
    ],
)
def test_prm_validation_errors_name_file_line_and_field(tmp_path, bad_line, field, fragment):
    path = _prm_file(tmp_path, bad_line)
    with pytest.raises(DataError) as info:
        list(read_prm_records(path))
    message = str(info.value)
    prefix = f"{path}:4: " + (f"field {field!r}: " if field else "")
    assert message.startswith(prefix), message
    assert fragment in message, message
    assert info.value.line == 4 and info.value.field == field
    assert isinstance(info.value, ValueError)


def test_exact_message_for_label_count(tmp_path):
    path = _prm_file(tmp_path, _prm(labels=[1, 1, 0]))
    with pytest.raises(DataError, match=r"train\.jsonl:4: field 'labels': 3 labels for 4 steps$"):
        list(read_prm_records(path))


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_labels_are_rejected(tmp_path, token):
    # json.dumps cannot write these as labels portably; write the line by hand.
    line = '{"id": "c", "problem": "p", "steps": ["x", "y"], "labels": [1, TOKEN]}'.replace("TOKEN", token)
    path = _prm_file(tmp_path, line)
    with pytest.raises(DataError, match=r":4: field 'labels': label 1 is"):
        list(read_prm_records(path))


def test_reading_is_streaming_errors_surface_at_the_bad_line(tmp_path):
    path = _prm_file(tmp_path, "not json")
    iterator = read_prm_records(path)
    assert next(iterator).id == "a"
    assert next(iterator).id == "b"
    with pytest.raises(DataError, match=":4: malformed JSON"):
        next(iterator)


def test_invalid_utf8_is_reported_with_its_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(json.dumps(GOOD_PRM[0]).encode() + b"\n" + b'{"id": "\xff\xfe"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not valid UTF-8"):
        list(read_prm_records(path))


def test_sft_records(tmp_path):
    rows = [
        {"id": "x", "prompt": "What is 2+2?", "completion": "2+2=4.\n\n\\boxed{4}"},
        {"id": "y", "prompt": "Say hi", "completion": "", "meta": 1},
    ]
    path = _write(tmp_path / "sft.jsonl", [json.dumps(r) for r in rows])
    assert list(read_sft_records(path)) == [
        SFTRecord("x", "What is 2+2?", "2+2=4.\n\n\\boxed{4}"),
        SFTRecord("y", "Say hi", ""),
    ]


@pytest.mark.parametrize(
    "bad, field, fragment",
    [
        ({"id": "z", "prompt": "p"}, "completion", "missing"),
        ({"id": "z", "prompt": 1, "completion": "c"}, "prompt", "expected a string, got number"),
        ({"id": None, "prompt": "p", "completion": "c"}, "id", "expected a string, got null"),
        ({"id": "x", "prompt": "p", "completion": "c"}, "id", "duplicate id 'x'"),
    ],
)
def test_sft_validation_errors(tmp_path, bad, field, fragment):
    good = {"id": "x", "prompt": "p", "completion": "c"}
    path = _write(tmp_path / "sft.jsonl", [json.dumps(good), json.dumps(bad)])
    with pytest.raises(DataError) as info:
        list(read_sft_records(path))
    assert str(info.value).startswith(f"{path}:2: field {field!r}: ")
    assert fragment in str(info.value)


def test_programmatic_records_are_validated_and_infer_hardness():
    assert PRMRecord("a", "p", ("x", "y"), (1, 0)).hard_labels is True
    assert PRMRecord("a", "p", ["x", "y"], [1.0, 0.0]).steps == ("x", "y")
    assert PRMRecord("a", "p", ("x", "y"), (0.5, 0.0)).hard_labels is False
    with pytest.raises(DataError, match="field 'labels': 1 labels for 2 steps"):
        PRMRecord("a", "p", ("x", "y"), (1.0,))
    with pytest.raises(DataError, match="field 'labels'"):
        PRMRecord("a", "p", ("x",), (math.nan,))
    with pytest.raises(DataError, match="field 'labels'"):
        PRMRecord("a", "p", ("x",), (True,))
    with pytest.raises(DataError, match="field 'labels': hard_labels=True"):
        PRMRecord("a", "p", ("x",), (0.5,), hard_labels=True)
    with pytest.raises(DataError, match="field 'steps'"):
        PRMRecord("a", "p", (), ())
    with pytest.raises(DataError, match="field 'id'"):
        SFTRecord(3, "p", "c")  # type: ignore[arg-type]


def test_a_byte_order_mark_is_skipped_at_the_start_of_a_file_only(tmp_path):
    """One rule for every record file (`prm_jax.jsonl`): editors' BOM at the start is skipped, one
    anywhere else (e.g. two files concatenated) is malformed JSON."""
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD_PRM[0]).encode() + b"\n")
    assert [r.id for r in read_prm_records(path)] == ["a"]
    path.write_bytes(path.read_bytes() + b"\xef\xbb\xbf" + json.dumps(GOOD_PRM[1]).encode() + b"\n")
    with pytest.raises(DataError, match=r"bom\.jsonl:2: malformed JSON"):
        list(read_prm_records(path))


def test_the_line_limit_counts_the_record_not_its_newline(tmp_path, monkeypatch):
    line = _prm()
    path = _write(tmp_path / "train.jsonl", [line])
    monkeypatch.setattr(records_module, "MAX_LINE_BYTES", len(line))
    assert [r.id for r in read_prm_records(path)] == ["c"]
    monkeypatch.setattr(records_module, "MAX_LINE_BYTES", len(line) - 1)
    message = rf"train\.jsonl:1: line longer than the limit of {len(line) - 1} bytes; refused before it is parsed"
    with pytest.raises(DataError, match=message):
        list(read_prm_records(path))


def test_whitespace_is_not_an_id(tmp_path):
    path = _prm_file(tmp_path, _prm(id="  "))
    with pytest.raises(DataError, match=r"train\.jsonl:4: field 'id': must be a non-empty string"):
        list(read_prm_records(path))
    with pytest.raises(DataError, match="field 'id': must be a non-empty string"):
        SFTRecord(" ", "p", "c")
