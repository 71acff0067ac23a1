"""Issue 26, records: one JSON line decoder, one answer-validity rule, one text-validity rule.

Each test fails on the code before the fix: a decode failure past `JSONDecodeError` was a traceback
without `file:line`; a malformed gold re-balanced by `\\boxed{...}` graded every answer wrongly; a
control token or separator inside a problem or step reached a prompt as a control token.
"""

from __future__ import annotations

import json

import pytest

from data_pipeline.problems import read_problems
from data_pipeline.schemas import ErrorRecord, Problem
from prm_jax.data.records import read_prm_records
from prm_jax.jsonl import DataError

# ---------------------------------------------------------------------------- item 13: one bounded decoder

DEEP = "[" * 100_000 + "]" * 100_000  # past any recursion limit
HUGE_INT = "1" * 5_000  # past Python's 4,300-digit limit for int()

GOOD_PRM = {"id": "a", "problem": "p", "steps": ["x"], "labels": [1]}


@pytest.mark.parametrize(
    "value, why", [(DEEP, "nested deeper"), (HUGE_INT, "more than 4300 digits")], ids=["deep", "huge_int"]
)
def test_every_decode_failure_is_a_json_decode_error(value, why):
    from prm_jax.jsonl import JSONLimitError, loads, raw_decode

    for decode in (loads, raw_decode):
        with pytest.raises(json.JSONDecodeError, match=why) as info:
            decode('{"labels": ' + value + "}")
        assert isinstance(info.value, JSONLimitError)


@pytest.mark.parametrize("value", [DEEP, HUGE_INT], ids=["deep", "huge_int"])
def test_a_training_file_line_past_the_decoder_limits_names_its_line(tmp_path, value):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(GOOD_PRM) + "\n" + '{"id": "b", "labels": ' + value + "}\n")
    with pytest.raises(DataError, match=r"train\.jsonl:2: unreadable JSON: "):
        list(read_prm_records(path))


@pytest.mark.parametrize("value", [DEEP, HUGE_INT], ids=["deep", "huge_int"])
def test_synthesis_turns_a_line_past_the_decoder_limits_into_an_error_record(tmp_path, value):
    """The documented contract: each bad problem line becomes an ErrorRecord; the run goes on."""
    path = tmp_path / "problems.jsonl"
    good = json.dumps({"id": "p2", "problem": "1+1?", "answer": "2"})
    path.write_text('{"id": "p1", "problem": "x", "answer": ' + value + "}\n" + good + "\n")
    first, second = read_problems(path)
    assert isinstance(first, ErrorRecord) and first.error == "malformed_json"
    assert first.source == f"{path}:1" and "unreadable JSON" in first.message
    assert isinstance(second, Problem) and second.id == "p2"
