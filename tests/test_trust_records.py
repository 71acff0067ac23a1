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


# ---------------------------------------------------------------------------- item 7: one answer-validity rule

MALFORMED_GOLDS = ["\\frac{1}{", "x}{y"]


@pytest.mark.parametrize("gold", MALFORMED_GOLDS)
def test_the_problem_reader_refuses_a_gold_the_box_would_rebalance(tmp_path, gold):
    path = tmp_path / "problems.jsonl"
    good = json.dumps({"id": "ok", "problem": "1+1?", "answer": "2"})
    path.write_text(good + "\n" + json.dumps({"id": "bad", "problem": "What is x?", "answer": gold}) + "\n")
    ok, bad = read_problems(path)
    assert isinstance(ok, Problem)
    assert isinstance(bad, ErrorRecord) and bad.error == "bad_gold" and bad.source == f"{path}:2"
    assert "unbalanced braces" in bad.message and repr(gold) in bad.message


@pytest.mark.parametrize(
    "gold, answer",
    [
        ("\\frac{1}{", "\\frac{1}{2}"),  # was `incorrect` for every answer: every MC label 0
        ("x}{y", "x"),  # was `correct`: the box closed after x
        ("x}{y", "x}{y"),  # the string fast path must not call it equal to itself
    ],
)
def test_the_grader_calls_a_malformed_gold_bad_gold(gold, answer):
    from data_pipeline.grading import BAD_GOLD, GradingPool

    with GradingPool(workers=0) as pool:
        assert pool.grade(gold, answer) == BAD_GOLD


def test_a_malformed_answer_matches_nothing():
    from prm_jax.answers import INCORRECT, equivalent_answers, grade_answer

    assert grade_answer("x", "x}{y") == INCORRECT
    assert not equivalent_answers("x}{y", "x") and not equivalent_answers("x", "x}{y")
    assert equivalent_answers("\\{1,2\\}", "\\{1, 2\\}")  # escaped braces count, and balance
