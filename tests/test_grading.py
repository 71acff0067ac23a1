"""Answer grading: math-verify equivalences, gold formats, and the hard-timeout worker pool."""

from __future__ import annotations

import os
import time

import pytest

from data_pipeline.grading import GradingPool
from data_pipeline.problems import gold_answer

EQUIVALENT = [
    # fractions vs decimals
    ("0.5", "\\frac{1}{2}"),
    ("\\frac{1}{2}", "0.5"),
    ("\\frac{1}{3}", "\\frac{2}{6}"),
    # \frac vs \dfrac / \tfrac
    ("\\frac{3}{4}", "\\dfrac{3}{4}"),
    ("\\dfrac{3}{4}", "\\tfrac34"),
    # units and \text{}
    ("10", "10\\text{ cm}"),
    ("10\\text{ cm}", "10"),
    ("18", "18 \\text{ apples}"),
    ("10", "\\$10"),
    ("\\text{(B)}", "B"),
    # sets (order does not matter)
    ("\\{1,2,3\\}", "\\{3,2,1\\}"),
    # intervals
    ("(1,2]", "(1, 2]"),
    ("[0, \\infty)", "[0,\\infty)"),
    ("(-\\infty, 2) \\cup (3, \\infty)", "(-\\infty,2)\\cup(3,\\infty)"),
    # percentages
    ("50\\%", "50"),
    ("50\\%", "0.5"),
    ("25\\%", "\\frac{1}{4}"),
    # other spellings
    ("1000", "1,000"),
    ("\\sqrt{2}/2", "\\frac{\\sqrt{2}}{2}"),
    ("3\\sqrt{3}", "\\sqrt{27}"),
    ("x=3", "3"),
    ("2", "2.0"),
]

NOT_EQUIVALENT = [
    ("\\frac{1}{3}", "0.33"),
    ("\\frac{3}{4}", "\\frac{4}{3}"),
    ("0.5", "5"),
    ("10\\text{ cm}", "11"),
    ("10", "100"),
    ("\\{1,2\\}", "\\{1,2,3\\}"),
    ("(1,2)", "[1,2]"),
    ("(1,2]", "[1,2)"),
    ("[0,\\infty)", "(0,\\infty)"),
    ("50\\%", "5"),
    ("\\frac{1}{2}", "\\frac{1}{2}x"),
    ("2", "3"),
]

POWER_TOWER = "9^{9^{9^{9^{9}}}}"


@pytest.fixture(scope="module")
def inline():
    return GradingPool(workers=0)


@pytest.mark.parametrize("gold, answer", EQUIVALENT)
def test_equivalent_answers_are_correct(inline, gold, answer) -> None:
    assert inline.grade(gold, answer) == "correct"


@pytest.mark.parametrize("gold, answer", NOT_EQUIVALENT)
def test_different_answers_are_incorrect(inline, gold, answer) -> None:
    assert inline.grade(gold, answer) == "incorrect"


def test_missing_answer_needs_no_worker(inline) -> None:
    assert inline.grade_many([("4", None), ("4", "  ")]) == ["no_answer", "no_answer"]


@pytest.mark.parametrize(
    "raw, gold",
    [
        ("42", "42"),
        ("  \\frac{1}{2} ", "\\frac{1}{2}"),
        ("$3$", "3"),
        ("She pays 5 * 3 = 15 dollars.\n#### 15", "15"),  # GSM8K
        ("#### 1,000", "1,000"),
        ("So $x = \\boxed{\\frac{\\sqrt{3}}{2}}$.", "\\frac{\\sqrt{3}}{2}"),  # MATH
        ("\\boxed{1} then \\boxed{2}", "2"),  # the last box
        ("", None),
        ("#### ", None),
        ("\\boxed{", None),
    ],
)
def test_gold_formats(raw, gold) -> None:
    assert gold_answer(raw) == gold


def test_workers_grade_like_inline_and_adversarial_input_times_out() -> None:
    pairs = [EQUIVALENT[0], NOT_EQUIVALENT[0], ("1", POWER_TOWER), EQUIVALENT[10], ("4", None)]
    with GradingPool(workers=2, timeout_s=2.0) as pool:
        start = time.monotonic()
        statuses = pool.grade_many(pairs)
        first = time.monotonic() - start
        pids = pool.worker_pids()
        assert statuses == ["correct", "incorrect", "timeout", "correct", "no_answer"]
        # Start-up (~1 s) + one 2 s timeout; far below the hours sympy would spend.
        assert first < 15, first
        assert pool.stats.timeouts == 1 and pool.stats.worker_restarts == 1
        # The hung worker was killed and replaced; the pool keeps working.
        start = time.monotonic()
        assert pool.grade_many([("3", "3.0"), ("1", POWER_TOWER)]) == ["correct", "timeout"]
        assert time.monotonic() - start < 1.0  # the timeout is cached: no second 2 s wait
        assert pool.grade("\\frac{1}{2}", "0.50") == "correct"
    for pid in pids:  # closed pools leave no processes behind
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
